"""Tests for fedcommon.federated_eval: cross-site c-index, KM / log-rank and time bins from summed site counts."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.compare import compare_survival
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from cancermoe.survival import assign_time_bins, concordance_counts, km_counts, time_bin_edges
from fedcommon.federated_eval import (
    RiskTimeGrid,
    binning_error_bound,
    cindex_from_histogram,
    compare_risk_groups,
    hazard_risk_edges,
    histogram_quantiles,
    pairs_sharing_a_bin,
    quantile_edges_from_histogram,
    risk_grid_from_quantiles,
    risk_grid_per_cancer,
    risk_groups_from_histogram,
    site_histogram,
    time_histogram,
    uniform_time_edges,
)


def cohort(seed: int, n: int, tied: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(risk, months, censorship): risk predicts earlier death (imperfectly), ~35% censored.

    tied: integer months and risks on a 0.25 grid, so both have many ties.
    """
    rng = np.random.default_rng(seed)
    months = rng.exponential(30.0, size=n)
    risk = -np.log1p(months) + rng.normal(0.0, 0.7, size=n)
    if tied:
        months, risk = np.floor(months), np.round(risk * 4) / 4
    censorship = (rng.random(n) < 0.35).astype(np.int64)
    return risk, months, censorship


def exact_grid(risk: np.ndarray, months: np.ndarray) -> RiskTimeGrid:
    """One bin per distinct risk and per distinct time: risk edges halfway between neighbours, time edges at them."""
    risks = np.unique(risk)
    mid = (risks[1:] + risks[:-1]) / 2
    times = np.unique(months)
    return RiskTimeGrid(np.concatenate([[risks[0] - 1], mid, [risks[-1] + 1]]),
                        np.concatenate([[0.0], times[times > 0], [np.inf]]))


# ---------------------------------------------------------------------------------------------------------------------
# Grid and histograms


def test_site_histogram_counts_by_risk_bin_time_bin_and_event():
    grid = RiskTimeGrid(np.array([0.0, 1.0, 2.0]), np.array([0.0, 10.0, 20.0, np.inf]))
    risk = np.array([0.5, 1.5, 1.0, -3.0, 9.0])  # 1.0 on an edge -> bin 1; -3 and 9 clipped to the outer bins
    months = np.array([5.0, 10.0, 25.0, 0.0, 19.9])
    censorship = np.array([0, 1, 0, 1, 0])
    hist = site_histogram(risk, months, censorship, grid)
    expected = np.zeros((2, 3, 2), dtype=np.int64)
    expected[0, 0, 1] = 1  # risk 0.5, 5 months, died
    expected[1, 1, 0] = 1  # risk 1.5, 10 months (left-closed), censored
    expected[1, 2, 1] = 1  # risk 1.0, 25 months, died
    expected[0, 0, 0] = 1  # risk -3 -> bin 0, 0 months, censored
    expected[1, 1, 1] = 1  # risk 9 -> bin 1, 19.9 months, died
    np.testing.assert_array_equal(hist, expected)
    assert hist.dtype == np.int64


def test_site_histogram_refuses_bad_input():
    grid = RiskTimeGrid(np.array([0.0, 1.0]), np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="risk must be finite"):
        site_histogram(np.array([np.nan]), np.array([1.0]), np.array([0]), grid)
    with pytest.raises(ValueError, match="censorship"):
        site_histogram(np.array([0.5]), np.array([1.0]), np.array([2]), grid)
    with pytest.raises(ValueError, match="survival_months"):
        site_histogram(np.array([0.5]), np.array([-1.0]), np.array([0]), grid)


@pytest.mark.parametrize("risk_edges, time_edges, problem", [
    ([0.0, 0.0, 1.0], [0.0, np.inf], "risk_edges"),
    ([0.0, np.inf], [0.0, np.inf], "risk_edges"),
    ([0.0, 1.0], [1.0, np.inf], "start at 0"),
    ([0.0, 1.0], [0.0, 100.0], "end at \\+inf"),
    ([0.0, 1.0], [0.0, 5.0, 5.0, np.inf], "time_edges"),
])
def test_grid_refuses_invalid_edges(risk_edges, time_edges, problem):
    with pytest.raises(ValueError, match=problem):
        RiskTimeGrid(np.array(risk_edges), np.array(time_edges))


def test_grid_round_trips_through_config():
    grid = RiskTimeGrid(hazard_risk_edges(4, 8), uniform_time_edges(12.0, 0.5))
    config = grid.to_config()
    assert all(isinstance(v, float) for values in config.values() for v in values)
    back = RiskTimeGrid.from_config(config)
    np.testing.assert_array_equal(back.risk_edges, grid.risk_edges)
    np.testing.assert_array_equal(back.time_edges, grid.time_edges)
    assert back.time_edges[-1] == np.inf and back.n_time_bins == 25 and back.n_risk_bins == 8
    with pytest.raises(ValueError, match="time_edges"):
        RiskTimeGrid.from_config({"risk_edges": [0.0, 1.0]})


# ---------------------------------------------------------------------------------------------------------------------
# c-index from histograms


@pytest.mark.parametrize("seed, tied", [(0, False), (1, True), (2, True)])
def test_histogram_cindex_with_one_value_per_bin_equals_sksurv_exactly(seed, tied):
    risk, months, censorship = cohort(seed, 150, tied)
    hist = site_histogram(risk, months, censorship, exact_grid(risk, months))
    assert cindex_from_histogram(hist) == concordance_counts(risk, months, censorship)


def test_summed_histograms_give_the_cross_site_cindex_and_summed_pair_counts_the_stratified_one():
    # Each site ranks its own two patients right, but site B's patients (who live longer) got higher risks.
    risk_a, months_a, censorship_a = np.array([0.9, 0.8]), np.array([1.0, 2.0]), np.array([0, 1])
    risk_b, months_b, censorship_b = np.array([1.1, 1.0]), np.array([10.0, 20.0]), np.array([0, 1])
    risk, months, censorship = (np.concatenate(p) for p in ((risk_a, risk_b), (months_a, months_b),
                                                            (censorship_a, censorship_b)))
    grid = exact_grid(risk, months)
    pooled_hist = site_histogram(risk_a, months_a, censorship_a, grid) + site_histogram(risk_b, months_b,
                                                                                         censorship_b, grid)
    np.testing.assert_array_equal(pooled_hist, site_histogram(risk, months, censorship, grid))
    cross_site = cindex_from_histogram(pooled_hist)
    stratified = (concordance_counts(risk_a, months_a, censorship_a)
                  + concordance_counts(risk_b, months_b, censorship_b))
    assert cross_site == concordance_counts(risk, months, censorship)
    assert stratified.cindex == 1.0
    assert cross_site.cindex < stratified.cindex  # the cross-site pairs (A's death vs B's patients) are discordant
    assert cross_site.comparable > stratified.comparable


def test_random_two_site_split_histograms_add_up_to_the_pooled_cindex():
    risk, months, censorship = cohort(3, 200, tied=True)
    site = np.random.default_rng(3).random(200) < 0.4
    grid = exact_grid(risk, months)
    hist = sum(site_histogram(risk[m], months[m], censorship[m], grid) for m in (site, ~site))
    assert cindex_from_histogram(hist) == concordance_counts(risk, months, censorship)


def test_coarse_bins_give_a_close_cindex():
    risk, months, censorship = cohort(4, 600)
    first = RiskTimeGrid(np.linspace(risk.min() - 1, risk.max() + 1, 1001), uniform_time_edges(240.0, 1.0))
    risk_counts = site_histogram(risk, months, censorship, first).sum(axis=(1, 2))
    grid = RiskTimeGrid(risk_grid_from_quantiles(risk_counts, first.risk_edges, 50), first.time_edges)
    coarse = cindex_from_histogram(site_histogram(risk, months, censorship, grid)).cindex
    exact = concordance_counts(risk, months, censorship).cindex
    # 50 equal-share risk bins: ~2% of pairs share a risk bin and count as ties (each moves the index by at
    # most 1/2 pair); 1-month time bins over ~30-month survival put another few % of pairs in one time bin.
    assert abs(coarse - exact) < 0.02
    assert 0.55 < exact < 0.95  # the check means something only when the risks carry signal


def test_cindex_from_histogram_refuses_non_counts():
    with pytest.raises(ValueError, match=r"\[R, T, 2\]"):
        cindex_from_histogram(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-negative integer"):
        cindex_from_histogram(np.full((2, 3, 2), 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# Quantiles from histograms: time bins, risk grid, risk threshold


def test_time_histogram_counts_deaths_only():
    edges = np.array([0.0, 6.0, 12.0, np.inf])
    counts = time_histogram(np.array([1.0, 6.0, 7.0, 30.0, 2.0]), np.array([0, 0, 1, 0, 1]), edges)
    np.testing.assert_array_equal(counts, [1, 1, 1])


@pytest.mark.parametrize("seed", [0, 1])
def test_federated_time_bins_are_close_to_the_pooled_quantiles(seed):
    _, months, censorship = cohort(seed, 300)
    step = 0.05
    fine = uniform_time_edges(400.0, step)
    site = np.random.default_rng(seed).random(300) < 0.5
    counts = sum(time_histogram(months[m], censorship[m], fine) for m in (site, ~site))
    federated = quantile_edges_from_histogram(counts, fine, 4)
    pooled = time_bin_edges(months, censorship, 4)
    assert federated[0] == 0.0 and federated[-1] == np.inf and len(federated) == 5
    deaths = np.sort(months[censorship == 0])
    for k, p in enumerate([0.25, 0.5, 0.75], start=1):
        rank = p * (len(deaths) - 1)
        below, above = deaths[int(np.floor(rank))], deaths[int(np.ceil(rank))]
        # np.quantile interpolates between these two deaths; the histogram version lands between them
        # too, up to one fine bin, so the two differ by at most the gap plus one fine bin.
        assert below <= pooled[k] <= above
        assert below - step <= federated[k] <= above + step


def test_federated_time_bins_hit_integer_rank_quantiles_within_one_fine_bin():
    _, months, censorship = cohort(5, 200)
    deaths = months[censorship == 0][:41]  # 41 deaths: ranks 10, 20, 30 are whole numbers
    step = 0.01
    fine = uniform_time_edges(400.0, step)
    federated = quantile_edges_from_histogram(time_histogram(deaths, np.zeros(41), fine), fine, 4)
    np.testing.assert_allclose(federated[1:-1], time_bin_edges(deaths, np.zeros(41), 4)[1:-1], atol=step)


def test_federated_time_bins_need_a_death():
    with pytest.raises(ValueError, match="no uncensored"):
        quantile_edges_from_histogram(np.zeros(4, dtype=np.int64), np.array([0.0, 1, 2, 3, np.inf]), 4)


def test_histogram_quantiles_equal_np_quantile_when_each_value_sits_at_its_bins_centre():
    edges = np.linspace(0.0, 1.0, 6)  # bins of 0.2, one value at each centre 0.1, 0.3, ..., 0.9
    values = (edges[1:] + edges[:-1]) / 2
    probabilities = np.array([0.0, 0.1, 0.25, 0.375, 0.5, 0.8, 1.0])
    np.testing.assert_allclose(histogram_quantiles(np.ones(5, dtype=np.int64), edges, probabilities),
                               np.quantile(values, probabilities), atol=1e-12)


def test_histogram_quantile_in_an_open_ended_bin_is_its_left_edge():
    value = histogram_quantiles(np.array([0, 3]), np.array([0.0, 5.0, np.inf]), np.array([0.5]))
    np.testing.assert_array_equal(value, [5.0])


def test_risk_grid_from_quantiles_gives_equal_share_bins():
    rng = np.random.default_rng(6)
    risk = rng.normal(-2.0, 0.5, size=2000)
    fine_edges = hazard_risk_edges(4, 4000)
    counts = np.bincount(np.clip(np.searchsorted(fine_edges, risk, side="right") - 1, 0, 3999), minlength=4000)
    edges = risk_grid_from_quantiles(counts, fine_edges, 10)
    assert len(edges) == 11 and edges[0] == -4.0 and edges[-1] == 0.0 and np.all(np.diff(edges) > 0)
    per_bin = np.histogram(risk, edges)[0]
    assert per_bin.sum() == 2000 and per_bin.min() >= 195 and per_bin.max() <= 205
    empty = risk_grid_from_quantiles(np.zeros(5), np.linspace(-1.0, 0.0, 6), 4)
    np.testing.assert_allclose(empty, [-1.0, -0.75, -0.5, -0.25, 0.0])


# ---------------------------------------------------------------------------------------------------------------------
# Kaplan-Meier and log-rank per risk group


def test_risk_groups_from_the_summed_histograms_are_the_patients_above_the_pooled_median():
    risk, months, censorship = cohort(8, 160, tied=True)
    site = np.random.default_rng(8).random(160) < 0.5
    grid = exact_grid(risk, months)
    summed = (site_histogram(risk[site], months[site], censorship[site], grid)
              + site_histogram(risk[~site], months[~site], censorship[~site], grid))
    groups = risk_groups_from_histogram(summed, grid)
    high = risk >= groups.threshold
    # As balanced as the risk values allow, and exactly the KM counts of the patients in each group.
    assert abs(int(high.sum()) - 80) <= max(np.unique(risk, return_counts=True)[1])
    for mine, group in ((groups.low, ~high), (groups.high, high)):
        theirs = km_counts(months[group], censorship[group], grid.time_edges)
        for field in ("at_risk", "deaths", "censored"):
            np.testing.assert_array_equal(getattr(mine, field), getattr(theirs, field))

    result = compare_risk_groups(groups)
    assert (result.n_low, result.n_high) == ((~high).sum(), high.sum())
    statistic, p_value = compare_survival(Surv.from_arrays(censorship == 0, months), high.astype(int))
    assert result.statistic == pytest.approx(statistic, rel=1e-9)
    assert result.p_value == pytest.approx(p_value, rel=1e-9)
    for curve, group in ((result.low_survival, ~high), (result.high_survival, high)):
        times, survival = kaplan_meier_estimator(censorship[group] == 0, months[group])
        np.testing.assert_allclose(curve[assign_time_bins(times, grid.time_edges)], survival, rtol=1e-12)


def test_risk_groups_stay_balanced_for_a_cancer_whose_risks_sit_apart_from_the_others():
    """A cancer whose risks lie apart from the bulk gets few bins of a grid of pooled equal shares, so its median
    is far from any edge and its KM groups come out unbalanced; a grid of each cancer's own equal shares splits
    it near its median. The grid comes from one round's risks and is used on the next (slightly moved) ones."""
    rng = np.random.default_rng(3)
    time_edges = uniform_time_edges(240.0, 2.0)
    months = rng.exponential(30.0, size=1100)
    censorship = np.zeros(1100, dtype=np.int64)
    cancer = np.array(["BULK"] * 1000 + ["APART"] * 100)

    def risks(shift: float) -> np.ndarray:
        return np.concatenate([rng.normal(-2.0 + shift, 0.8, 1000), rng.normal(-0.35 + shift, 0.05, 100)])

    wide = RiskTimeGrid(hazard_risk_edges(4, 16), time_edges)
    previous = risks(0.0)
    counts = {c: site_histogram(previous[cancer == c], months[cancer == c], censorship[cancer == c],
                                wide).sum(axis=(1, 2)) for c in ("BULK", "APART")}
    pooled = risk_grid_from_quantiles(sum(counts.values()), wide.risk_edges, 16)
    own = risk_grid_per_cancer(counts, wide.risk_edges, 16)
    assert own[0] == wide.risk_edges[0] and own[-1] == wide.risk_edges[-1] and np.all(np.diff(own) > 0)
    current = risks(0.01)
    apart = cancer == "APART"

    def imbalance(edges: np.ndarray) -> float:
        grid = RiskTimeGrid(edges, time_edges)
        groups = compare_risk_groups(risk_groups_from_histogram(
            site_histogram(current[apart], months[apart], censorship[apart], grid), grid))
        return abs(groups.n_high - groups.n_low) / apart.sum()

    assert imbalance(own) <= 0.15
    assert imbalance(pooled) > 0.3  # what the pooled grid did


def test_no_risk_groups_when_every_patient_is_in_one_risk_bin():
    risk, months, censorship = cohort(9, 50)
    grid = RiskTimeGrid(np.array([-10.0, 10.0, 20.0]), uniform_time_edges(60.0, 6.0))
    assert risk_groups_from_histogram(site_histogram(risk, months, censorship, grid), grid) is None


def test_binning_error_bound_holds_on_coarse_grids_and_is_zero_on_exact_ones():
    risk, months, censorship = cohort(12, 300, tied=True)
    exact = concordance_counts(risk, months, censorship).cindex
    for risk_bins, step in ((4, 24.0), (16, 6.0), (64, 2.0)):
        grid = RiskTimeGrid(np.linspace(risk.min(), risk.max(), risk_bins + 1), uniform_time_edges(120.0, step))
        hist = site_histogram(risk, months, censorship, grid)
        bound = binning_error_bound(pairs_sharing_a_bin(hist), cindex_from_histogram(hist).comparable)
        assert abs(cindex_from_histogram(hist).cindex - exact) <= bound < 1.0
    distinct = np.random.default_rng(13).permutation(300).astype(float)  # no ties: exact grid, bound 0
    months_distinct = np.arange(1.0, 301.0)
    hist = site_histogram(distinct, months_distinct, censorship, exact_grid(distinct, months_distinct))
    assert binning_error_bound(pairs_sharing_a_bin(hist), cindex_from_histogram(hist).comparable) == 0.0
