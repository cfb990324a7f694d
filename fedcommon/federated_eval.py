"""Federated evaluation from aggregate counts (pure numpy: no Flower, no MLflow).

A site never sends a patient's risk or survival time. Per evaluation round the
server sends a `RiskTimeGrid` (risk-bin and time-bin edges); each site sends back

- `site_histogram`: patient counts per (risk bin, time bin, event) [R, T, 2];
- `time_histogram` (before training): counts of uncensored times on a fine time
  grid, from which the server picks the discrete survival time bins.

The counts add up across sites. From the sums the server computes

- `cindex_from_histogram`: the CROSS-SITE c-index, pairs across sites included
  ("exact up to binning"). Summing per-site `cancermoe.survival.PairCounts`
  instead gives the site-stratified c-index (pairs within a site only);
- `risk_groups_from_histogram` / `compare_risk_groups`: Kaplan-Meier counts of the
  patients of high and low predicted risk (split at the pooled median, up to a risk
  bin), their curves and the log-rank test;
- `quantile_edges_from_histogram`: federated time-bin edges;
- `risk_thresholds_from_histogram`: the risk-group thresholds stored with the model files;
- `risk_grid_from_quantiles` / `risk_grid_per_cancer`: the next round's risk grid, from this
  round's pooled risk histogram (per cancer: equal shares of each cancer's patients);
- `binning_error_bound`: how far the cross-site c-index can be from the pooled
  patients' exact one.

Conventions as in `cancermoe.survival`: months, censorship 1 = censored and
0 = death observed, higher risk = earlier expected death, left-closed bins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cancermoe.survival import (
    KMCounts,
    PairCounts,
    assign_time_bins,
    km_curve_from_counts,
    logrank_test_from_counts,
)

# ---------------------------------------------------------------------------------------------------------------------
# The grid the server sends


@dataclass(frozen=True, eq=False)
class RiskTimeGrid:
    """Bin edges the server sends to every site for an evaluation round.

    risk_edges: [R + 1] strictly increasing finite risks; a risk below the first edge counts in
        the first bin, above the last edge in the last bin (bins are left-closed, the last one closed);
    time_edges: [T + 1] strictly increasing months, the first 0 and the last +inf, so every
        survival time falls in a bin ``[time_edges[k], time_edges[k + 1])``.
    """

    risk_edges: np.ndarray
    time_edges: np.ndarray

    def __post_init__(self) -> None:
        risk = np.asarray(self.risk_edges, dtype=np.float64)
        time = np.asarray(self.time_edges, dtype=np.float64)
        if risk.ndim != 1 or risk.size < 2 or not np.all(np.isfinite(risk)) or np.any(np.diff(risk) <= 0):
            raise ValueError("risk_edges must be at least 2 strictly increasing finite numbers")
        if time.ndim != 1 or time.size < 2 or np.any(np.isnan(time)) or np.any(np.diff(time) <= 0):
            raise ValueError("time_edges must be at least 2 strictly increasing numbers")
        if time[0] != 0 or time[-1] != np.inf or not np.all(np.isfinite(time[:-1])):
            raise ValueError("time_edges must start at 0, end at +inf and be finite in between")
        object.__setattr__(self, "risk_edges", risk)
        object.__setattr__(self, "time_edges", time)

    @property
    def n_risk_bins(self) -> int:
        return len(self.risk_edges) - 1

    @property
    def n_time_bins(self) -> int:
        return len(self.time_edges) - 1

    def to_config(self) -> dict[str, list[float]]:
        """Plain lists of floats (the last time edge is ``float('inf')``)."""
        return {"risk_edges": self.risk_edges.tolist(), "time_edges": self.time_edges.tolist()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RiskTimeGrid:
        """Inverse of `to_config`; ValueError when a key is missing or the edges are invalid."""
        try:
            return cls(np.asarray(config["risk_edges"], dtype=np.float64),
                       np.asarray(config["time_edges"], dtype=np.float64))
        except KeyError as exc:
            raise ValueError(f"risk/time grid: no {exc.args[0]!r}") from None


def uniform_risk_edges(low: float, high: float, n_bins: int) -> np.ndarray:
    """``n_bins`` equal risk bins over [low, high]."""
    if not (np.isfinite(low) and np.isfinite(high) and low < high) or n_bins < 1:
        raise ValueError(f"need finite low < high and n_bins >= 1, got [{low}, {high}], {n_bins}")
    return np.linspace(low, high, n_bins + 1)


def hazard_risk_edges(n_time_bins: int, n_bins: int) -> np.ndarray:
    """A first-round risk grid that needs nothing from the sites.

    `cancermoe.survival.risk_from_hazard_logits` gives risk = -sum_t S(t) with S in [0, 1] over
    ``n_time_bins`` hazard bins, so every risk lies in [-n_time_bins, 0]: equal bins over that range.
    """
    return uniform_risk_edges(-float(n_time_bins), 0.0, n_bins)


def uniform_time_edges(horizon_months: float, step_months: float) -> np.ndarray:
    """0, step, 2 step, ... up to ``horizon_months``, then +inf: a fine time grid for the histograms."""
    if not (0 < step_months <= horizon_months < np.inf):
        raise ValueError(f"need 0 < step {step_months} <= horizon {horizon_months} < inf")
    return np.append(np.arange(0.0, horizon_months + step_months / 2, step_months), np.inf)


# ---------------------------------------------------------------------------------------------------------------------
# Computed at a site (what leaves: counts only)


def _survival_inputs(survival_months: np.ndarray, censorship: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    time = np.asarray(survival_months, dtype=np.float64)
    censorship = np.asarray(censorship)
    if time.ndim != 1 or time.shape != censorship.shape:
        raise ValueError(f"survival_months {time.shape} and censorship {censorship.shape} must be 1-D of equal length")
    if not np.all(np.isin(censorship, (0, 1))):
        raise ValueError("censorship must be 0 (death observed) or 1 (censored)")
    return time, censorship.astype(np.int64)


def risk_bins(risk: np.ndarray, risk_edges: np.ndarray) -> np.ndarray:
    """Risk bin (int64, 0..R-1) of each risk; risks outside the edges go to the outer bins."""
    risk = np.asarray(risk, dtype=np.float64)
    if not np.all(np.isfinite(risk)):
        raise ValueError("risk must be finite")
    index = np.searchsorted(risk_edges, risk, side="right") - 1
    return np.clip(index, 0, len(risk_edges) - 2).astype(np.int64)


def site_histogram(risk: np.ndarray, survival_months: np.ndarray, censorship: np.ndarray,
                   grid: RiskTimeGrid) -> np.ndarray:
    """Patient counts per (risk bin, time bin, event): int64 [R, T, 2].

    The last axis is the EVENT (index 1 = death observed, censorship 0; index 0 = censored).
    What leaves the site: these counts only. Histograms of several sites on the same grid add up.
    """
    time, censorship = _survival_inputs(survival_months, censorship)
    risk = np.asarray(risk, dtype=np.float64)
    if risk.shape != time.shape:
        raise ValueError(f"risk {risk.shape} and survival_months {time.shape} differ in shape")
    cell = (risk_bins(risk, grid.risk_edges) * grid.n_time_bins + assign_time_bins(time, grid.time_edges)) * 2
    cell += 1 - censorship
    counts = np.bincount(cell, minlength=grid.n_risk_bins * grid.n_time_bins * 2)
    return counts.astype(np.int64).reshape(grid.n_risk_bins, grid.n_time_bins, 2)


def time_histogram(survival_months: np.ndarray, censorship: np.ndarray, time_edges: np.ndarray) -> np.ndarray:
    """Counts of UNCENSORED survival times per bin ``[time_edges[k], time_edges[k + 1])``, int64 [T].

    What leaves the site: these counts only (on a fine grid, e.g. `uniform_time_edges` (240, 0.5)).
    The server sums them and calls `quantile_edges_from_histogram` for the discrete time bins.
    """
    time, censorship = _survival_inputs(survival_months, censorship)
    bins = assign_time_bins(time[censorship == 0], time_edges)
    return np.bincount(bins, minlength=len(time_edges) - 1).astype(np.int64)


@dataclass(frozen=True)
class RiskGroupCounts:
    """Kaplan-Meier counts of the low-risk (risk < threshold) and high-risk (risk >= threshold) patients."""

    low: KMCounts
    high: KMCounts
    threshold: float


# ---------------------------------------------------------------------------------------------------------------------
# Computed at the server, from summed counts


def cindex_from_histogram(hist: np.ndarray) -> PairCounts:
    """Harrell's pair counts from (summed) [R, T, 2] risk x time x event counts (`site_histogram`).

    Time bins stand in for times and risk bins for risks, with Harrell's rules at tied times:
    a death in time bin t is comparable with every patient in a later time bin and with every
    CENSORED patient in bin t (as a death and a censoring at the same time are); two deaths in
    the same bin are not comparable. A comparable pair is concordant when the death's risk bin
    is higher, discordant when lower, tied_risk when the same.

    So the result is exact up to binning: it equals scikit-survival's counts on the pooled
    patients whenever each time bin holds one distinct time value and each risk bin one distinct
    risk (e.g. edges between the distinct values); coarser bins turn some pairs into ties.
    Summing the sites' histograms first makes it the cross-site c-index (pairs across sites count).
    """
    hist = np.asarray(hist)
    if hist.ndim != 3 or hist.shape[2] != 2 or not np.issubdtype(hist.dtype, np.integer) or np.any(hist < 0):
        raise ValueError(f"expected non-negative integer counts [R, T, 2], got {hist.dtype} {hist.shape}")
    censored, deaths = hist[..., 0].astype(np.int64), hist[..., 1].astype(np.int64)
    everyone = censored + deaths  # [R, T]
    later = np.cumsum(everyone[:, ::-1], axis=1)[:, ::-1] - everyone  # patients in a later time bin, per risk bin
    partners = later + censored  # [R, T]: who a death in (any risk bin, time bin t) is comparable with
    lower = _in_lower_risk_bins(partners)
    higher = partners.sum(axis=0, keepdims=True) - lower - partners
    # The standard error's per-patient sums (see PairCounts): every patient of a cell has the same pairs.
    # A death is the earlier patient of its pairs with its partners, and the later one for earlier deaths;
    # a censored patient is the later one for the deaths before or at its time. The earlier patient of a
    # pair is concordant when its risk bin is the higher one.
    deaths_upto = np.cumsum(deaths, axis=1)
    deaths_before = deaths_upto - deaths
    death_b = partners.sum(axis=0, keepdims=True) + deaths_before.sum(axis=0, keepdims=True)
    death_w = lower + 0.5 * partners + _in_higher_risk_bins(deaths_before) + 0.5 * deaths_before
    censored_b = deaths_upto.sum(axis=0, keepdims=True)
    censored_w = _in_higher_risk_bins(deaths_upto) + 0.5 * deaths_upto
    return PairCounts(
        concordant=int((deaths * lower).sum()),
        discordant=int((deaths * higher).sum()),
        tied_risk=int((deaths * partners).sum()),
        tied_time=int((deaths.sum(axis=0) * censored.sum(axis=0)).sum()),
        sum_w2=float((deaths * death_w**2).sum() + (censored * censored_w**2).sum()),
        sum_wb=float((deaths * death_w * death_b).sum() + (censored * censored_w * censored_b).sum()),
        sum_b2=float((deaths * death_b**2).sum() + (censored * censored_b**2).sum()),
    )


def pairs_sharing_a_bin(hist: np.ndarray) -> float:
    """Pairs of patients of a [R, T, 2] histogram, at least one of them a death, that share a risk bin or a
    time bin: the only pairs binning may treat differently from the exact c-index (see `binning_error_bound`).
    They add up over cancers (not over sites: pairs across sites share bins too)."""
    censored, deaths = hist[..., 0].astype(np.float64), hist[..., 1].astype(np.float64)

    def pairs_with_a_death(d: np.ndarray, c: np.ndarray) -> float:
        return float((d * (d - 1) / 2 + d * c).sum())

    return (pairs_with_a_death(deaths.sum(axis=1), censored.sum(axis=1))  # same risk bin
            + pairs_with_a_death(deaths.sum(axis=0), censored.sum(axis=0))  # same time bin
            - pairs_with_a_death(deaths, censored))  # both, counted twice


def binning_error_bound(shared_pairs: float, comparable: int) -> float:
    """How far `cindex_from_histogram` can be from the exact c-index of the same patients, at most.

    A pair of patients in different risk bins and different time bins is compared exactly as the exact
    c-index compares it (bins keep the order of risks and times). Only the ``s`` = ``shared_pairs``
    (`pairs_sharing_a_bin`) may be treated differently, and with ``B`` = ``comparable``, the binned
    comparable pairs, the two c-indices differ by at most ``s / B`` (both lie in an interval that wide).
    Returns ``min(1, s / B)``; NaN without comparable pairs.
    """
    return math.nan if comparable == 0 else min(1.0, shared_pairs / comparable)


def _in_lower_risk_bins(counts: np.ndarray) -> np.ndarray:
    """[R, T] -> per cell, the counts of the same time bin in lower risk bins."""
    return np.cumsum(counts, axis=0) - counts


def _in_higher_risk_bins(counts: np.ndarray) -> np.ndarray:
    """[R, T] -> per cell, the counts of the same time bin in higher risk bins."""
    return counts.sum(axis=0, keepdims=True) - np.cumsum(counts, axis=0)


def histogram_quantiles(counts: np.ndarray, edges: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Quantiles of values known only as counts per bin ``[edges[k], edges[k + 1])``: the histogram
    analogue of ``np.quantile(values, probabilities)`` (linear method).

    np.quantile puts quantile p at rank r = p (n - 1) among the n sorted values (0-based). Here
    each bin's values are taken as spread evenly over the bin, the value of rank i sitting at
    cumulative count i + 1/2; quantile p is where the piecewise-linear cumulative count reaches
    r + 1/2. With one value per bin the result is within a bin width of np.quantile's at integer
    ranks; between ranks it lies between the two neighbouring values' bins. A quantile falling in
    a bin with an infinite right edge is that bin's left edge.
    """
    counts = np.asarray(counts)
    edges = np.asarray(edges, dtype=np.float64)
    if counts.ndim != 1 or edges.shape != (len(counts) + 1,) or np.any(counts < 0):
        raise ValueError(f"need non-negative counts [K] and edges [K + 1], got {counts.shape} and {edges.shape}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("the histogram is empty: quantiles are undefined")
    cumulative = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    target = np.asarray(probabilities, dtype=np.float64) * (total - 1) + 0.5
    # The bin where the cumulative count reaches the target; cumulative[b] < target <= cumulative[b + 1].
    b = np.clip(np.searchsorted(cumulative, target, side="left") - 1, 0, len(counts) - 1)
    width = edges[b + 1] - edges[b]
    width = np.where(np.isfinite(width), width, 0.0)  # an open-ended last bin: its left edge
    inside = (target - cumulative[b]) / counts[b]  # counts[b] > 0 because 0 < target < total
    return edges[b] + inside * width


def quantile_edges_from_histogram(counts: np.ndarray, edges: np.ndarray, n_bins: int) -> np.ndarray:
    """Federated `cancermoe.survival.time_bin_edges`: ``n_bins`` time bins at the quantiles of the
    uncensored times, from the summed `time_histogram` counts on ``edges``.

    Interior edges are `histogram_quantiles` (an approximation within the fine grid's resolution,
    see there); outer edges are 0 and +inf. Duplicate edges are kept, as time_bin_edges does.
    Raises ValueError when no death was counted.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    if int(np.asarray(counts).sum()) == 0:
        raise ValueError("no uncensored patient: time bins are quantiles of death times")
    quantile_edges = histogram_quantiles(counts, edges, np.linspace(0.0, 1.0, int(n_bins) + 1))
    quantile_edges[0], quantile_edges[-1] = 0.0, np.inf
    return quantile_edges


def risk_grid_from_quantiles(risk_counts: np.ndarray, risk_edges: np.ndarray, n_bins: int) -> np.ndarray:
    """Next round's risk edges: ``n_bins`` bins holding about equal shares of this round's pooled patients.

    risk_counts: pooled patients per bin of ``risk_edges`` (``summed_hist.sum(axis=(1, 2))``).
    Equal-share bins put the resolution where the patients are, so few pairs fall in one bin and
    become ties. The outer edges stay those of ``risk_edges`` (risks outside go to the outer bins
    anyway); an empty histogram gives equal-width bins. The interior edges are strictly increasing
    (the interpolated cumulative count is continuous), so the result is a valid `RiskTimeGrid` axis.
    """
    edges = np.asarray(risk_edges, dtype=np.float64)
    if int(np.asarray(risk_counts).sum()) == 0:
        return uniform_risk_edges(edges[0], edges[-1], n_bins)
    new_edges = histogram_quantiles(risk_counts, edges, np.linspace(0.0, 1.0, n_bins + 1))
    new_edges[0], new_edges[-1] = edges[0], edges[-1]
    return new_edges


def risk_grid_per_cancer(risk_counts: Mapping[str, np.ndarray], risk_edges: np.ndarray, n_bins: int) -> np.ndarray:
    """Next round's risk edges from each cancer's pooled risk histogram: the union of every cancer's equal-share
    edges (`risk_grid_from_quantiles` of its own counts), ``n_bins`` divided among the cancers (at least 8 each).

    Cancers may sit in different parts of the risk axis; equal shares of all patients pooled can leave a cancer
    only a few bins, and then its median risk (where the KM risk groups split) and its tertiles lie far from any
    edge. With edges at each cancer's own quantiles its groups come out about equal in size (as long as the next
    round's risks do not move far). Returns the outer edges of ``risk_edges`` and strictly increasing interior
    ones; with no patient counted, equal-width bins.
    """
    edges = np.asarray(risk_edges, dtype=np.float64)
    counted = {c: np.asarray(v) for c, v in risk_counts.items() if int(np.asarray(v).sum()) > 0}
    if not counted:
        return uniform_risk_edges(edges[0], edges[-1], n_bins)
    per_cancer = max(8, n_bins // len(counted))
    grids = [risk_grid_from_quantiles(counts, edges, per_cancer) for _, counts in sorted(counted.items())]
    return np.unique(np.concatenate(grids))


def risk_thresholds_from_histogram(hist: np.ndarray, risk_edges: np.ndarray,
                                   quantiles: Sequence[float]) -> list[float] | None:
    """Risk-group thresholds of one cancer: the ``quantiles`` of the risks of the patients in its summed [R, T, 2]
    histogram (`histogram_quantiles`, within a risk bin of the exact ones), from counts only. None when the
    histogram holds fewer patients than groups."""
    per_risk_bin = np.asarray(hist).sum(axis=(1, 2))
    if int(per_risk_bin.sum()) <= len(quantiles):
        return None
    return histogram_quantiles(per_risk_bin, risk_edges, np.asarray(quantiles, dtype=np.float64)).tolist()


def km_counts_from_histogram(hist: np.ndarray, time_edges: np.ndarray) -> KMCounts:
    """`cancermoe.survival.km_counts` of the patients of a [R, T, 2] histogram (summed over its risk bins):
    exactly the counts of those patients on ``time_edges``, the histogram's own time axis."""
    return KMCounts.from_bin_counts(time_edges, deaths=hist[..., 1].sum(axis=0), censored=hist[..., 0].sum(axis=0))


def risk_groups_from_histogram(hist: np.ndarray, grid: RiskTimeGrid) -> RiskGroupCounts | None:
    """High and low predicted risk, split at the risk edge nearest the median of the patients in ``hist``.

    The groups are as balanced as the risk bins allow, from the same round's (summed) histogram: high
    risk is ``risk >= threshold`` with ``threshold`` an interior edge of ``grid.risk_edges``, so each
    group's counts are exactly `cancermoe.survival.km_counts` of its patients. None when every patient
    falls in one risk bin (no split is possible).
    """
    per_risk_bin = hist.sum(axis=(1, 2))
    below = np.cumsum(per_risk_bin)[:-1]  # patients below interior edge k + 1
    candidates = np.flatnonzero((below > 0) & (below < per_risk_bin.sum()))
    if candidates.size == 0:
        return None
    split = int(candidates[np.argmin(np.abs(below[candidates] - per_risk_bin.sum() / 2))]) + 1
    return RiskGroupCounts(low=km_counts_from_histogram(hist[:split], grid.time_edges),
                           high=km_counts_from_histogram(hist[split:], grid.time_edges),
                           threshold=float(grid.risk_edges[split]))


@dataclass(frozen=True, eq=False)
class RiskGroupComparison:
    """Kaplan-Meier curves of the two risk groups over the time bins, and their log-rank test."""

    edges: np.ndarray  # [T + 1] months
    low_survival: np.ndarray  # [T]: KM survival of the low-risk group after each bin (`km_curve_from_counts`)
    high_survival: np.ndarray  # [T]
    n_low: int
    n_high: int
    statistic: float  # log-rank chi-square, 1 df; NaN without deaths
    p_value: float


def compare_risk_groups(counts: RiskGroupCounts) -> RiskGroupComparison:
    """KM curves and log-rank test of two risk groups (`risk_groups_from_histogram`)."""
    statistic, p_value = logrank_test_from_counts(counts.low, counts.high)
    return RiskGroupComparison(
        edges=counts.low.edges,
        low_survival=km_curve_from_counts(counts.low),
        high_survival=km_curve_from_counts(counts.high),
        n_low=int(counts.low.at_risk[0]) if counts.low.n_bins else 0,
        n_high=int(counts.high.at_risk[0]) if counts.high.n_bins else 0,
        statistic=statistic,
        p_value=p_value,
    )
