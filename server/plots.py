"""The run's figures, as PNG files for MLflow artifacts: KM curves, expert routing, c-index over rounds.

Figures are built with matplotlib's object API (``Figure``, Agg canvas), never pyplot, so nothing here touches
global backend state or leaks open figures in a long-running server. Each function writes its PNG atomically
(cancermoe.files: a reader never sees half a file) and returns the path. The Kaplan-Meier figure is
`cancermoe.km_figure`'s, the one `cmoe-predict` draws too; here it is fed the pooled counts of a round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from cancermoe.files import atomic_path
from cancermoe.km_figure import KMCurve, KMPanel, write_km_figure
from cancermoe.survival import KMCounts

ArrayLike = Sequence[float] | np.ndarray


def km_panels(km_by_cancer: Mapping[str, Mapping[str, Any]]) -> list[KMPanel]:
    """One panel per cancer from a round's KM summaries (`server.strategy.km_summary`: the time edges, and per
    group ``high``/``low`` the pooled at-risk, death and censoring counts per time bin)."""
    panels = []
    for cancer, km in sorted(km_by_cancer.items()):
        edges = np.asarray(km["edges"], dtype=np.float64)
        curves = [KMCurve.from_counts(group, KMCounts(edges, *(np.asarray(km["counts"][group][part], dtype=np.int64)
                                                               for part in ("at_risk", "deaths", "censored"))))
                  for group in ("high", "low")]
        panels.append(KMPanel(cancer, curves, float(km["logrank_p"])))
    return panels


def km_plot(panels: Sequence[KMPanel], path: Path, title: str | None = None) -> Path:
    """Kaplan-Meier curves of the predicted risk groups, a panel per cancer (`cancermoe.km_figure`)."""
    if not panels:
        raise ValueError("km_plot: no cancer to plot")
    return write_km_figure(panels, path, suptitle=title)


def routing_shares(counts: ArrayLike) -> np.ndarray:
    """``counts[m, e]`` (tokens of modality m routed to expert e) as shares of each modality's tokens (rows sum
    to 1; a modality with no token is all zeros)."""
    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def expert_routing_plot(counts: ArrayLike, modality_names: Sequence[str], path: Path, title: str | None = None) -> Path:
    """Expert routing per modality: of each modality's tokens, the share each expert received (grouped bars), so a
    modality of few tokens (CLS: one a patient) reads as clearly as one of many (WSI)."""
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != len(modality_names):
        raise ValueError(f"expert_routing_plot: counts of shape {counts.shape} do not match "
                         f"{len(modality_names)} modality names")
    shares = routing_shares(counts)
    experts = np.arange(counts.shape[1])
    width = 0.8 / len(modality_names)
    figure = Figure(figsize=(max(5.0, 0.9 * len(experts) + 3.0), 3.8), layout="constrained")
    ax = figure.subplots()
    for index, (modality, row, total) in enumerate(zip(modality_names, shares, counts.sum(axis=1), strict=True)):
        ax.bar(experts + (index - (len(modality_names) - 1) / 2) * width, row, width,
               label=f"{modality} ({total:,.0f} routings)")
    ax.axhline(1 / len(experts), color="grey", linestyle="--", linewidth=1, label="even split")
    ax.set_xticks(experts)
    ax.set_xlabel("expert")
    ax.set_ylabel("share of the modality's routings")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1)
    ax.set_title("expert routing by modality" + (f", {title}" if title else ""))
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers: no tick at 1.5
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
