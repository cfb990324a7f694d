"""Survival analysis pieces: discrete time bins, the discrete-time NLL loss, risk
scores, Harrell's c-index pair counts, and Kaplan-Meier / log-rank from counts.

Conventions used throughout:

- times are in months (``survival_months``), non-negative and finite;
- ``censorship`` is 1 for a censored patient (alive at last follow-up) and 0
  for an observed death, as in the TCGA tables;
- a higher risk means an earlier expected death;
- time bins are left-closed intervals ``[edges[k], edges[k + 1])``, as in
  PORPOISE's ``pd.cut(..., right=False)``.

Everything that a federated server needs to combine across sites (pair counts,
Kaplan-Meier counts) is an integer count that adds up across sites; the
statistics are computed from the sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored


def _survival_arrays(survival_months: np.ndarray, censorship: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked copies: times as float64 months, censorship as a bool array (True = censored)."""
    time = np.asarray(survival_months, dtype=np.float64)
    censored = np.asarray(censorship)
    if time.ndim != 1 or time.shape != censored.shape:
        raise ValueError(f"survival_months {time.shape} and censorship {censored.shape} must be 1-D of equal length")
    if not np.all(np.isfinite(time)) or np.any(time < 0):
        raise ValueError("survival_months must be finite and non-negative")
    if not np.all(np.isin(censorship, (0, 1))):
        raise ValueError("censorship must be 0 (death observed) or 1 (censored)")
    return time, censored == 1


# --------------------------------------------------------------------------- time bins


def time_bin_edges(survival_months: np.ndarray, censorship: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Edges of ``n_bins`` discrete time bins at the quantiles of the uncensored survival times.

    As in PORPOISE/MCAT: the interior edges are the ``pd.qcut`` quantiles (linear
    interpolation) of the survival times of the patients whose death was observed
    (censorship 0). The outer edges are then widened to 0 and +inf so that every
    non-negative time falls in a bin. Call this on the training split only and
    `assign_time_bins` on every split, so the bins carry no information from
    validation data.

    Few deaths can make quantiles coincide (tied death times, or a single
    death). Unlike ``pd.qcut(duplicates="drop")`` we keep the duplicated edges:
    the model's hazard head keeps ``n_bins`` outputs (and the same shape at every
    site), and a bin ``[e, e)`` is simply empty — a time equal to ``e`` goes to
    the last bin that starts at ``e``.

    Returns a non-decreasing float64 array of ``n_bins + 1`` edges in months,
    ``edges[0] == 0`` and ``edges[-1] == inf``. Raises `ValueError` when no death
    is observed, since the quantiles are then undefined.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    time, censored = _survival_arrays(survival_months, censorship)
    death_times = time[~censored]
    if death_times.size == 0:
        raise ValueError("no uncensored patient (every censorship is 1): time bins are quantiles of death times")
    # np.quantile's default (linear) is what pd.qcut computes; we call it directly to keep duplicate edges.
    edges = np.quantile(death_times, np.linspace(0.0, 1.0, int(n_bins) + 1))
    edges[0] = 0.0
    edges[-1] = np.inf
    return edges


def _check_edges(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2:
        raise ValueError(f"edges must be a 1-D array of at least 2 values, got shape {edges.shape}")
    if np.any(np.isnan(edges)) or np.any(np.diff(edges) < 0):
        raise ValueError("edges must be non-decreasing numbers")
    return edges


def assign_time_bins(survival_months: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index (int64, 0..n_bins-1) of the bin ``[edges[k], edges[k + 1])`` holding each time in months.

    Raises `ValueError` for a time outside ``[edges[0], edges[-1])``; edges from
    `time_bin_edges` span [0, inf), so only negative or non-finite times fail.
    """
    edges = _check_edges(edges)
    time = np.asarray(survival_months, dtype=np.float64)
    if np.any(np.isnan(time)) or np.any(time < edges[0]) or np.any(time >= edges[-1]):
        raise ValueError(f"survival_months must lie in [{edges[0]}, {edges[-1]})")
    # side="right" puts a time equal to an edge in the bin that starts there (left-closed bins).
    return (np.searchsorted(edges, time, side="right") - 1).astype(np.int64)


# --------------------------------------------------------------------------- loss and risk


def nll_survival_loss(
    hazard_logits: torch.Tensor,
    time_bin: torch.Tensor,
    censorship: torch.Tensor,
    beta: float = 0.15,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood, averaged over the batch.

    The loss of PORPOISE (Chen et al. 2022, "Pan-cancer integrative
    histology-genomic analysis via multimodal deep learning", ``NLLSurvLoss``)::

        hazards  = sigmoid(hazard_logits)                  # [B, n_bins], P(death in bin t | alive at its start)
        S        = cumprod(1 - hazards)                    # S[t] = P(alive after bin t)
        S_padded = cat([1, S])                             # S_padded[t] = P(alive at the start of bin t)
        uncensored = -(1 - c) * (log S_padded[y] + log hazards[y])   # died in bin y
        censored   = -c * log S_padded[y + 1]                        # survived bin y
        loss = mean((1 - beta) * (censored + uncensored) + beta * uncensored)

    with ``y = time_bin`` (0..n_bins-1) and ``c = censorship`` (1 = censored,
    0 = death observed). ``beta`` puts extra weight on the uncensored term.
    Each probability is clamped to ``eps`` inside the log, as PORPOISE does.
    The CancerMoE paper writes this as ``L = (1 - beta) L_c + beta L_u`` with
    the labels of the two terms mixed up; we follow the cited PORPOISE definition.

    Computed from the logits in log space (``logsigmoid``, ``cumsum``) rather than
    through ``cumprod`` of probabilities: since log(max(p, eps)) = max(log p, log eps)
    this is the same quantity, without the underflow of 1 - sigmoid(large logit).
    """
    if hazard_logits.ndim != 2:
        raise ValueError(f"hazard_logits must be [batch, n_bins], got {tuple(hazard_logits.shape)}")
    batch, n_bins = hazard_logits.shape
    if time_bin.shape != (batch,) or censorship.shape != (batch,):
        raise ValueError(f"time_bin {tuple(time_bin.shape)} and censorship {tuple(censorship.shape)} must be [{batch}]")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if batch and (int(time_bin.min()) < 0 or int(time_bin.max()) >= n_bins):
        raise ValueError(f"time_bin must be in 0..{n_bins - 1}")

    log_hazard = F.logsigmoid(hazard_logits)
    log_survival = torch.cumsum(F.logsigmoid(-hazard_logits), dim=1)  # log S[t] = sum_{s<=t} log(1 - h_s)
    log_survival_padded = F.pad(log_survival, (1, 0), value=0.0)  # log 1 = 0 before the first bin

    y = time_bin.long().view(batch, 1)
    c = censorship.to(hazard_logits.dtype).view(batch, 1)
    log_eps = math.log(eps)
    log_alive_at_start = log_survival_padded.gather(1, y).clamp(min=log_eps)
    log_hazard_at_bin = log_hazard.gather(1, y).clamp(min=log_eps)
    log_alive_after = log_survival_padded.gather(1, y + 1).clamp(min=log_eps)

    uncensored = -(1 - c) * (log_alive_at_start + log_hazard_at_bin)
    censored = -c * log_alive_after
    return ((1 - beta) * (censored + uncensored) + beta * uncensored).mean()


def cox_partial_likelihood_loss(risk: torch.Tensor, survival_months: torch.Tensor, censorship: torch.Tensor,
                                strata: torch.Tensor | None = None) -> torch.Tensor:
    """Negative Cox partial log-likelihood of ``risk`` (higher = earlier death), averaged over observed deaths.

    For each death i: ``-(risk_i - log sum_{j: t_j >= t_i, same stratum} exp(risk_j))`` (Breslow's handling of
    ties: every patient whose time is not earlier is at risk). A ranking loss over the batch's comparable pairs,
    the quantity Harrell's c-index counts; zero (with a gradient path) when the batch holds no death.

    risk: [batch]; survival_months: [batch], months; censorship: [batch], 1 = censored, 0 = death observed;
    strata: [batch] integer codes (e.g. the cancer), risk sets never cross them; None = one stratum.
    """
    at_risk = survival_months.view(1, -1) >= survival_months.view(-1, 1)  # [i, j]: j is at risk at t_i
    if strata is not None:
        at_risk &= strata.view(1, -1) == strata.view(-1, 1)
    log_risk_set = torch.logsumexp(risk.view(1, -1).masked_fill(~at_risk, float("-inf")), dim=1)
    deaths = censorship == 0
    if not bool(deaths.any()):
        return risk.sum() * 0.0
    return -(risk - log_risk_set)[deaths].mean()


def risk_from_hazard_logits(hazard_logits: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Risk score ``-sum_t S(t)`` per patient from ``[batch, n_bins]`` hazard logits (higher = earlier death).

    ``S(t)`` is the survival after bin t, as in `nll_survival_loss`; the sum is
    the expected number of bins survived. Returns the same kind (torch or numpy)
    as the input, shape ``[batch]``.
    """
    if isinstance(hazard_logits, np.ndarray):
        return risk_from_hazard_logits(torch.from_numpy(hazard_logits)).numpy()
    survival = torch.exp(torch.cumsum(F.logsigmoid(-hazard_logits), dim=-1))
    return -survival.sum(dim=-1)


# --------------------------------------------------------------------------- Harrell's c-index


@dataclass(frozen=True)
class PairCounts:
    """Harrell's pair counts, and the sums its standard error needs. They add up across sites and strata:
    sum them, then take `cindex` and `interval`.

    A pair is comparable when one patient died (censorship 0) strictly before
    the other's time, or died at the same time as the other was censored.
    ``concordant + discordant + tied_risk`` are the comparable pairs.
    ``tied_time`` counts, as scikit-survival reports it, the comparable pairs of
    a death and a censoring at the same time (already inside the other three);
    two deaths at the same time are not comparable and counted nowhere.

    For the standard error, per patient i: ``b_i`` is the number of comparable
    pairs i is in and ``w_i`` the concordance among them (a concordant pair
    counts 1, a tied risk 1/2). ``sum_w2``, ``sum_wb``, ``sum_b2`` are the sums
    over patients of w_i^2, w_i b_i, b_i^2: aggregates, like the counts, that add
    up over disjoint sets of patients (sites, cancers). They are 0 when unknown.
    """

    concordant: int = 0
    discordant: int = 0
    tied_risk: int = 0
    tied_time: int = 0
    sum_w2: float = 0.0
    sum_wb: float = 0.0
    sum_b2: float = 0.0

    @property
    def comparable(self) -> int:
        return self.concordant + self.discordant + self.tied_risk

    @property
    def cindex(self) -> float:
        """(concordant + tied_risk / 2) / comparable; NaN when no pair is comparable."""
        if self.comparable == 0:
            return math.nan
        return (self.concordant + 0.5 * self.tied_risk) / self.comparable

    @property
    def standard_error(self) -> float:
        """Standard error of `cindex`: the first-order (infinitesimal) jackknife over patients.

        With C the c-index and B the comparable pairs, removing patient i changes C by about
        -(w_i - C b_i) / B, so ``Var(C) = sum_i (w_i - C b_i)^2 / B^2``, expanded into the three sums.
        This is the U-statistic (Hoeffding projection) variance of a ratio of two pair counts; pairs
        share patients, which a variance from the pair counts alone would ignore. NaN when no pair is
        comparable or the sums are unknown.
        """
        c, pairs = self.cindex, self.comparable
        if math.isnan(c) or self.sum_b2 <= 0:
            return math.nan
        variance = self.sum_w2 - 2.0 * c * self.sum_wb + c * c * self.sum_b2
        return math.sqrt(max(variance, 0.0)) / pairs

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Normal-approximation confidence interval of `cindex`, clipped to [0, 1]; (NaN, NaN) when undefined."""
        se = self.standard_error
        if math.isnan(se):
            return math.nan, math.nan
        z = float(stats.norm.ppf(0.5 + level / 2.0))
        return max(0.0, self.cindex - z * se), min(1.0, self.cindex + z * se)

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(
            self.concordant + other.concordant,
            self.discordant + other.discordant,
            self.tied_risk + other.tied_risk,
            self.tied_time + other.tied_time,
            self.sum_w2 + other.sum_w2,
            self.sum_wb + other.sum_wb,
            self.sum_b2 + other.sum_b2,
        )


# A c-index on the held-out patients rests on their deaths: below this many it is flagged as unreliable
# (ours; with 10 deaths the 95% interval is typically +-0.15 wide).
MIN_EVENTS_FOR_CINDEX = 10
TIED_RISK_TOLERANCE = 1e-8  # scikit-survival's tied_tol: risks this close form a tied pair


def patient_pair_scores(risk: np.ndarray, survival_months: np.ndarray, censorship: np.ndarray,
                        block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: ``(w, b)``, float64 arrays: the concordance and the number of the comparable pairs
    the patient is in (see `PairCounts`), by scikit-survival's rules (comparable pairs, ties within
    `TIED_RISK_TOLERANCE`). ``w.sum()`` is twice the concordance numerator, ``b.sum()`` twice the
    comparable pairs. Computed in blocks of ``block`` deaths (memory ``block x n``).
    """
    risk = np.asarray(risk, dtype=np.float64)
    time, censored = _survival_arrays(survival_months, censorship)
    n = risk.size
    w, b = np.zeros(n), np.zeros(n)
    deaths = np.flatnonzero(~censored)
    for start in range(0, deaths.size, block):
        i = deaths[start:start + block]
        # death i and patient j are comparable when j's time is later, or the same with j censored
        comparable = (time[None, :] > time[i, None]) | ((time[None, :] == time[i, None]) & censored[None, :])
        difference = risk[i, None] - risk[None, :]
        tied = np.abs(difference) <= TIED_RISK_TOLERANCE
        score = np.where(tied, 0.5, (difference > 0).astype(np.float64)) * comparable
        w[i] += score.sum(axis=1)
        b[i] += comparable.sum(axis=1)
        w += score.sum(axis=0)
        b += comparable.sum(axis=0)
    return w, b


def concordance_counts(risk: np.ndarray, survival_months: np.ndarray, censorship: np.ndarray) -> PairCounts:
    """Harrell's pair counts of predicted ``risk`` against observed survival, with the sums of its standard error.

    A pair (i, j) is comparable when patient i died (censorship 0) before j's
    time (or at j's time with j censored). It is concordant when risk_i > risk_j,
    tied when the risks differ by at most 1e-8. The counts are scikit-survival's
    `concordance_index_censored`; the sums come from `patient_pair_scores`. Inputs
    without any comparable pair (empty, one patient, all censored, a single death
    at the longest time) give zero counts.

    Pairs across two calls are never counted, so summing the counts of several
    sites gives the site-stratified c-index, not the pooled one.
    """
    risk = np.asarray(risk, dtype=np.float64)
    time = np.asarray(survival_months, dtype=np.float64)
    event = np.asarray(censorship) == 0
    if risk.shape != time.shape or risk.shape != event.shape:
        raise ValueError(f"risk {risk.shape}, time {time.shape}, censorship {event.shape} differ in shape")
    if risk.size < 2 or not event.any():  # no pair (scikit-survival refuses a single patient)
        return PairCounts()
    try:
        # errstate: sksurv divides 0/0 for its own c-index when deaths exist but no pair is comparable.
        with np.errstate(invalid="ignore", divide="ignore"):
            _, concordant, discordant, tied_risk, tied_time = concordance_index_censored(
                event, time, risk, tied_tol=TIED_RISK_TOLERANCE)
    except NoComparablePairException:
        return PairCounts()
    w, b = patient_pair_scores(risk, time, censorship)
    return PairCounts(int(concordant), int(discordant), int(tied_risk), int(tied_time),
                      float(w @ w), float(w @ b), float(b @ b))


def harrell_cindex(risk: np.ndarray, survival_months: np.ndarray, censorship: np.ndarray) -> float:
    """Harrell's c-index of ``risk`` (higher = earlier death); NaN when no pair is comparable."""
    return concordance_counts(risk, survival_months, censorship).cindex


# --------------------------------------------------------------------------- Kaplan-Meier and log-rank from counts


@dataclass(frozen=True, eq=False)
class KMCounts:
    """Binned life-table counts: per bin ``[edges[k], edges[k + 1])`` (months), int64 arrays of length n_bins.

    ``at_risk[k]``: patients whose time is >= edges[k] (alive and followed at
    the start of bin k); ``deaths[k]`` / ``censored[k]``: patients whose death /
    censoring time falls in bin k. Counts from sites that use the same edges
    add up (``a + b``), so a server can build Kaplan-Meier curves and log-rank
    tests over all sites without seeing a single patient.
    """

    edges: np.ndarray
    at_risk: np.ndarray
    deaths: np.ndarray
    censored: np.ndarray

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    @classmethod
    def from_bin_counts(cls, edges: np.ndarray, deaths: np.ndarray, censored: np.ndarray) -> KMCounts:
        """The counts of patients whose deaths / censorings per bin are given: everyone in bin k or a later
        one is still followed at the start of bin k."""
        deaths, censored = np.asarray(deaths, dtype=np.int64), np.asarray(censored, dtype=np.int64)
        at_risk = np.cumsum((deaths + censored)[::-1])[::-1].astype(np.int64)
        return cls(np.asarray(edges, dtype=np.float64).copy(), at_risk, deaths, censored)

    def __add__(self, other: KMCounts) -> KMCounts:
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot add KM counts over different time bin edges")
        return KMCounts(
            self.edges, self.at_risk + other.at_risk, self.deaths + other.deaths, self.censored + other.censored
        )


def km_counts(survival_months: np.ndarray, censorship: np.ndarray, edges: np.ndarray) -> KMCounts:
    """Count patients at risk, deaths and censorings in each time bin (see `KMCounts`)."""
    time, censored = _survival_arrays(survival_months, censorship)
    edges = _check_edges(edges)
    n_bins = len(edges) - 1
    bins = assign_time_bins(time, edges)
    return KMCounts.from_bin_counts(edges, deaths=np.bincount(bins[~censored], minlength=n_bins),
                                    censored=np.bincount(bins[censored], minlength=n_bins))


def km_curve_from_counts(counts: KMCounts) -> np.ndarray:
    """Product-limit survival over the bins: ``survival[k] = prod_{j <= k} (1 - deaths[j] / at_risk[j])``.

    One value per bin (length n_bins): the probability of surviving bin k,
    reported at its left edge ``edges[k]`` as if its deaths happened there. When
    every death lies on an edge (edges = 0, the distinct death times, inf) this
    is exactly the Kaplan-Meier estimate S(edges[k]); with coarser bins it is
    the life-table approximation that treats censorings in a bin as leaving at
    its end. Bins nobody is at risk in keep the survival unchanged.
    """
    at_risk = counts.at_risk.astype(np.float64)
    hazard = np.divide(counts.deaths, at_risk, out=np.zeros_like(at_risk), where=at_risk > 0)
    return np.cumprod(1.0 - hazard)


def logrank_test_from_counts(counts_group_a: KMCounts, counts_group_b: KMCounts) -> tuple[float, float]:
    """Two-group log-rank test from binned counts; returns ``(chi-square statistic, p-value)`` with 1 df.

    Each bin is treated as one event time: with n = n_a + n_b at risk and
    d = d_a + d_b deaths, group a expects d n_a / n deaths with hypergeometric
    variance d (n - d) n_a n_b / (n^2 (n - 1)). When the edges are the distinct
    death times this is the usual log-rank test (scikit-survival's
    `compare_survival`). Returns ``(nan, nan)`` when the variance is zero (no deaths).
    """
    if not np.array_equal(counts_group_a.edges, counts_group_b.edges):
        raise ValueError("both groups need the same time bin edges")
    n_a = counts_group_a.at_risk.astype(np.float64)
    n_b = counts_group_b.at_risk.astype(np.float64)
    d_a = counts_group_a.deaths.astype(np.float64)
    n = n_a + n_b
    d = d_a + counts_group_b.deaths
    has_deaths = (d > 0) & (n > 0)
    expected_a = np.divide(d * n_a, n, out=np.zeros_like(n), where=has_deaths)
    # With a single patient at risk the variance term is 0 (nothing can be swapped between groups).
    two_or_more = has_deaths & (n > 1)
    variance = np.divide(d * (n - d) * n_a * n_b, n * n * (n - 1), out=np.zeros_like(n), where=two_or_more)
    total_variance = variance.sum()
    if total_variance <= 0:
        return math.nan, math.nan
    statistic = float((d_a.sum() - expected_a.sum()) ** 2 / total_variance)
    return statistic, float(stats.chi2.sf(statistic, df=1))
