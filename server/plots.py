"""The run's figures, as PNG files for MLflow artifacts: KM curves, expert routing, c-index over rounds.

Figures are built with matplotlib's object API (``Figure``, Agg canvas), never pyplot, so nothing here touches
global backend state or leaks open figures in a long-running server. Each function writes its PNG atomically
(cancermoe.files: a reader never sees half a file) and returns the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cancermoe.files import atomic_path

ArrayLike = Sequence[float] | np.ndarray


def km_plot(
    curves_by_cancer: Mapping[str, Mapping[str, tuple[ArrayLike, ArrayLike]]],
    logrank_p: Mapping[str, float],
    path: Path,
) -> Path:
    """Kaplan-Meier curves per cancer, one panel each, one step curve per risk group.

    Args:
        curves_by_cancer: cancer -> group label (e.g. "high risk", "low risk") -> (times in months, survival
            probability just after each time), as from ``sksurv.nonparametric.kaplan_meier_estimator``.
        logrank_p: cancer -> log-rank p-value between the groups (shown in the panel title; missing -> "n/a").
        path: where the PNG goes.
    """
    if not curves_by_cancer:
        raise ValueError("km_plot: no cancer to plot")
    cancers = sorted(curves_by_cancer)
    columns = min(3, len(cancers))
    rows = math.ceil(len(cancers) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, cancer in zip(axes, cancers, strict=False):
        for label, (times, survival) in sorted(curves_by_cancer[cancer].items()):
            # The curve starts at S(0) = 1 and holds each value until the next event time.
            times = np.concatenate([[0.0], np.asarray(times, dtype=float)])
            survival = np.concatenate([[1.0], np.asarray(survival, dtype=float)])
            ax.step(times, survival, where="post", label=label)
        p = logrank_p.get(cancer)
        p_text = "n/a" if p is None or not math.isfinite(p) else f"{p:.3g}"
        ax.set_title(f"{cancer}  (log-rank p = {p_text})")
        ax.set_xlabel("months")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0.0, 1.05)
        ax.legend(loc="upper right", fontsize="small")
    for ax in axes[len(cancers) :]:
        ax.set_visible(False)
    return _save(figure, path)


def expert_routing_plot(counts: ArrayLike, modality_names: Sequence[str], path: Path) -> Path:
    """Tokens routed to each expert, stacked by modality (``counts[m, e]`` = tokens of modality m to expert e)."""
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != len(modality_names):
        raise ValueError(f"expert_routing_plot: counts of shape {counts.shape} do not match "
                         f"{len(modality_names)} modality names")
    experts = np.arange(counts.shape[1])
    figure = Figure(figsize=(max(4.0, 0.5 * len(experts) + 2.0), 3.6), layout="constrained")
    ax = figure.subplots()
    bottom = np.zeros(len(experts))
    for modality, row in zip(modality_names, counts, strict=True):
        ax.bar(experts, row, bottom=bottom, label=modality)
        bottom += row
    ax.set_xticks(experts)
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens routed")
    ax.set_title("expert routing by modality")
    ax.legend(fontsize="small")
    return _save(figure, path)


def cindex_over_rounds_plot(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """One line per series (cancer, site, ...) of (round, c-index) points; the dashed line is chance (0.5)."""
    figure = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = figure.subplots()
    for name, points in sorted(history.items()):
        if points:
            rounds, values = zip(*sorted(points), strict=True)
            ax.plot(rounds, values, marker="o", markersize=3, label=name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("c-index")
    ax.set_title("c-index over rounds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path
