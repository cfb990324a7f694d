"""The one Kaplan-Meier figure of predicted risk groups, `cmoe-predict`'s and the federated server's.

Matplotlib only (imported when a figure is drawn), no MLflow.

One panel per cancer: a step curve per risk group, labelled "predicted <group> risk (n=...)", the log-rank p-value
in the title, and under the curves the numbers at risk of each group at the panel's time ticks. The groups keep
their colour on every panel (high red, low blue, intermediate grey), so a panel where the groups swap places reads
as swapped, not as a colour change.

A curve comes either from patients (`KMCurve.from_patients`: `cmoe-predict` on a bank) or from binned counts
(`KMCurve.from_counts`: the server's pooled histograms, where no patient's time is known). Numbers at risk at a time
t are the patients followed until t or later; from counts they are exact at the bin edges (ticks fall on edges when
the time step divides them; between edges the next edge's count is shown).

Built with matplotlib's object API (``Figure``, Agg canvas), never pyplot: nothing touches global backend state or
leaks open figures in a long-running server. The PNG is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cancermoe.files import atomic_path
from cancermoe.survival import KMCounts, km_curve_from_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GROUP_COLOURS = {"high": "#c62828", "intermediate": "#757575", "low": "#1565c0"}
OTHER_COLOURS = ("#2e7d32", "#6a1b9a", "#ef6c00", "#00838f")


def group_label(group: str) -> str:
    """How a risk group is named on the figure: "predicted high risk" (the model's prediction, not an outcome)."""
    return f"predicted {group} risk"


@dataclass(frozen=True, eq=False)
class KMCurve:
    """One risk group's product-limit curve and its numbers at risk.

    ``times``/``survival``: the curve's steps (survival just after each time; S(0) = 1 is implied).
    ``at_risk_times``/``at_risk_counts``: increasing times and the patients followed until that time or later;
    the number at risk at t is the count of the first listed time >= t (0 after the last).
    """

    group: str  # "high", "low", "intermediate", ...
    n: int
    deaths: int
    times: np.ndarray
    survival: np.ndarray
    at_risk_times: np.ndarray
    at_risk_counts: np.ndarray

    @property
    def label(self) -> str:
        return f"{group_label(self.group)} (n={self.n})"

    @property
    def last_time(self) -> float:
        """The last time anyone of the group is followed, or its curve's last step (0 for an empty group)."""
        followed = self.at_risk_times[self.at_risk_counts > 0]
        last = float(followed[-1]) if followed.size else 0.0
        return max(last, float(self.times[-1])) if self.times.size else last

    def at_risk(self, times: Sequence[float] | np.ndarray) -> np.ndarray:
        """Patients of the group still followed at each of ``times``."""
        index = np.searchsorted(self.at_risk_times, np.asarray(times, dtype=np.float64), side="left")
        counts = np.append(self.at_risk_counts, 0)
        return counts[index].astype(np.int64)

    @classmethod
    def from_patients(cls, group: str, survival_months: np.ndarray, death: np.ndarray) -> KMCurve:
        """The Kaplan-Meier estimate of patients with these times (months) and death flags (True = died)."""
        time = np.asarray(survival_months, dtype=np.float64)
        death = np.asarray(death, dtype=bool)
        if time.shape != death.shape or time.ndim != 1:
            raise ValueError(f"times {time.shape} and death flags {death.shape} must be 1-D of equal length")
        distinct = np.unique(time)
        followed = len(time) - np.searchsorted(np.sort(time), distinct, side="left")  # time >= t
        died = np.array([np.count_nonzero(death & (time == t)) for t in distinct], dtype=np.int64)
        has_death = died > 0
        survival = np.cumprod(1.0 - died[has_death] / followed[has_death])
        return cls(group, int(time.size), int(death.sum()), distinct[has_death], survival, distinct,
                   followed.astype(np.int64))

    @classmethod
    def from_counts(cls, group: str, counts: KMCounts) -> KMCurve:
        """The life-table curve of binned counts (`cancermoe.survival.km_curve_from_counts`), each bin's drop drawn
        at its right edge (where the survival through the bin is known; an open last bin at its left edge), with
        the numbers at risk at the bin edges."""
        edges = np.asarray(counts.edges, dtype=np.float64)
        survival = km_curve_from_counts(counts)
        has_death = np.asarray(counts.deaths) > 0
        ends = np.where(np.isfinite(edges[1:]), edges[1:], edges[:-1])
        n = int(counts.at_risk[0]) if counts.n_bins else 0
        return cls(group, n, int(np.sum(counts.deaths)), ends[has_death], survival[has_death], edges[:-1],
                   np.asarray(counts.at_risk, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class KMPanel:
    """One cancer: its groups' curves (drawn and tabulated from the highest risk down) and the log-rank p-value."""

    title: str
    curves: list[KMCurve]
    logrank_p: float = math.nan

    def ordered(self) -> list[KMCurve]:
        rank = {"high": 0, "intermediate": 1, "low": 2}
        return sorted(self.curves, key=lambda c: (rank.get(c.group, 3), c.group))


def colour(group: str, index: int) -> str:
    return GROUP_COLOURS.get(group, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def at_risk_ticks(panel: KMPanel, max_ticks: int = 6) -> np.ndarray:
    """Whole-number time ticks from 0 to the last follow-up of the panel's groups."""
    end = max((curve.last_time for curve in panel.curves), default=0.0)
    if end <= 0:
        return np.array([0.0])
    from matplotlib.ticker import MaxNLocator

    ticks = MaxNLocator(nbins=max_ticks - 1, integer=True, min_n_ticks=2).tick_values(0.0, end)
    return ticks[(ticks >= 0) & (ticks <= end)]


def km_figure(panels: Sequence[KMPanel], *, suptitle: str | None = None) -> Figure:
    """The panels (three a row), each with its numbers-at-risk table under it."""
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("km_figure: no panel to draw")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    groups = max(len(p.curves) for p in panels)
    table_height = 0.35 + 0.22 * groups
    figure = Figure(figsize=(5.0 * columns, (3.4 + table_height) * rows), layout="constrained")
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=[3.4, table_height] * rows)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        ax = figure.add_subplot(grid[2 * row, column])
        table = figure.add_subplot(grid[2 * row + 1, column], sharex=ax)
        _draw_panel(ax, table, panel)
    if suptitle:
        figure.suptitle(suptitle)
    return figure


def write_km_figure(panels: Sequence[KMPanel], path: str | Path, *, suptitle: str | None = None) -> Path:
    """`km_figure` as a PNG at ``path`` (written atomically); returns the path."""
    figure = km_figure(panels, suptitle=suptitle)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def _draw_panel(ax, table, panel: KMPanel) -> None:  # noqa: ANN001 - matplotlib Axes
    curves = panel.ordered()
    ticks = at_risk_ticks(panel)
    end = float(ticks[-1]) if ticks.size else 1.0
    end = max(end, max((c.last_time for c in curves), default=0.0), 1.0)
    for index, curve in enumerate(curves):
        times = np.concatenate([[0.0], curve.times, [curve.last_time]])
        survival = np.concatenate([[1.0], curve.survival, [curve.survival[-1] if curve.survival.size else 1.0]])
        keep = times <= curve.last_time
        ax.step(times[keep], survival[keep], where="post", color=colour(curve.group, index), label=curve.label)
    p = panel.logrank_p
    p_text = "n/a" if p is None or not math.isfinite(p) else f"{p:.2g}"
    ax.set_title(f"{panel.title}   (log-rank p = {p_text})")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlim(-0.05 * end, end * 1.03)
    ax.set_xticks(ticks)
    ax.tick_params(labelbottom=False)
    ax.grid(alpha=0.25)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)

    # Numbers at risk: one row per group, one column per tick, in the group's colour.
    table.set_ylim(-0.5, len(curves) - 0.5)
    table.set_yticks(range(len(curves)))
    table.set_yticklabels([c.group for c in curves], fontsize="small")
    for tick_label, (index, curve) in zip(table.get_yticklabels(), enumerate(curves), strict=True):
        tick_label.set_color(colour(curve.group, index))
    table.invert_yaxis()
    for index, curve in enumerate(curves):
        for tick, count in zip(ticks, curve.at_risk(ticks), strict=True):
            table.text(tick, index, str(int(count)), ha="center", va="center", fontsize="small",
                       color=colour(curve.group, index))
    table.set_xlabel("months")
    table.set_title("number at risk", fontsize="small", loc="left")
    table.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
