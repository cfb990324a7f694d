"""Tests for cancermoe.survival: time bins, NLL loss, risk, c-index pair counts, KM and log-rank from counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sksurv.compare import compare_survival
from sksurv.metrics import concordance_index_censored
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from cancermoe.survival import (
    KMCounts,
    PairCounts,
    assign_time_bins,
    concordance_counts,
    cox_partial_likelihood_loss,
    harrell_cindex,
    km_counts,
    km_curve_from_counts,
    logrank_test_from_counts,
    nll_survival_loss,
    patient_pair_scores,
    risk_from_hazard_logits,
    time_bin_edges,
)


def tied_survival_data(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer months (many tied times), few distinct risk values (many tied risks), ~40% censored."""
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 25, size=n).astype(np.float64)
    censorship = (rng.random(n) < 0.4).astype(np.int64)
    risk = rng.integers(0, 6, size=n) / 2.0
    return risk, time, censorship


def brute_force_pair_counts(risk: np.ndarray, time: np.ndarray, censorship: np.ndarray) -> PairCounts:
    """Harrell's pairs enumerated one by one, scikit-survival's conventions for time ties; each pair also
    credits both its patients (w: 1 concordant, 1/2 tied; b: 1) for the standard error's sums."""
    concordant = discordant = tied_risk = tied_time = 0
    w, b = np.zeros(len(time)), np.zeros(len(time))
    for i in range(len(time)):
        if censorship[i] == 1:
            continue
        for j in range(len(time)):
            later = time[j] > time[i]
            censored_at_same_time = time[j] == time[i] and censorship[j] == 1
            if not (later or censored_at_same_time):
                continue
            tied_time += censored_at_same_time
            if risk[i] == risk[j]:
                tied_risk += 1
                score = 0.5
            elif risk[i] > risk[j]:
                concordant += 1
                score = 1.0
            else:
                discordant += 1
                score = 0.0
            w[[i, j]] += score
            b[[i, j]] += 1
    return PairCounts(concordant, discordant, tied_risk, tied_time, float(w @ w), float(w @ b), float(b @ b))


def logits_of(hazards: list[list[float]]) -> torch.Tensor:
    h = torch.tensor(hazards, dtype=torch.float64)
    return torch.log(h) - torch.log1p(-h)


def porpoise_nll(logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor, beta: float, eps: float = 1e-7):
    """PORPOISE's nll_loss as published, in probability space (cumprod, clamp, log)."""
    hazards = torch.sigmoid(logits)
    y = y.view(-1, 1)
    c = c.view(-1, 1).to(logits.dtype)
    s = torch.cumprod(1 - hazards, dim=1)
    s_padded = torch.cat([torch.ones_like(c), s], 1)
    uncensored = -(1 - c) * (
        torch.log(torch.gather(s_padded, 1, y).clamp(min=eps)) + torch.log(torch.gather(hazards, 1, y).clamp(min=eps))
    )
    censored = -c * torch.log(torch.gather(s_padded, 1, y + 1).clamp(min=eps))
    return ((1 - beta) * (censored + uncensored) + beta * uncensored).mean()


# --------------------------------------------------------------------------- time bins


def test_time_bin_edges_are_quantiles_of_uncensored_times_only():
    rng = np.random.default_rng(0)
    time = rng.exponential(30.0, size=200)
    censorship = (rng.random(200) < 0.5).astype(int)

    edges = time_bin_edges(time, censorship, n_bins=4)

    _, qcut_edges = pd.qcut(time[censorship == 0], q=4, retbins=True)
    assert edges.shape == (5,)
    assert edges[0] == 0.0 and edges[-1] == np.inf
    np.testing.assert_allclose(edges[1:-1], qcut_edges[1:-1], rtol=1e-12)
    # Censored patients' times play no part in the edges.
    moved = time.copy()
    moved[censorship == 1] = rng.exponential(300.0, size=int(censorship.sum()))
    np.testing.assert_array_equal(time_bin_edges(moved, censorship, n_bins=4), edges)


def test_assign_time_bins_matches_porpoise_left_closed_cut():
    rng = np.random.default_rng(1)
    # 101 deaths: the 25/50/75% quantiles land exactly on death times, so the edge convention matters.
    time = np.concatenate([rng.exponential(30.0, size=101), rng.exponential(30.0, size=50)])
    censorship = np.concatenate([np.zeros(101, int), np.ones(50, int)])
    edges = time_bin_edges(time, censorship)
    assert np.isin(edges[1:-1], time).all()

    bins = assign_time_bins(time, edges)

    porpoise = pd.cut(time, bins=edges, right=False, labels=False, include_lowest=True)
    assert bins.dtype == np.int64
    np.testing.assert_array_equal(bins, porpoise)
    # Deaths are split into (near) quarters; every bin is used.
    assert np.all(np.abs(np.bincount(bins[censorship == 0], minlength=4) - 101 / 4) <= 1)


def test_assign_time_bins_covers_any_non_negative_time_and_rejects_others():
    edges = time_bin_edges(np.array([5.0, 10.0, 20.0, 40.0]), np.zeros(4))
    bins = assign_time_bins(np.array([0.0, 4.9, 1e6]), edges)
    np.testing.assert_array_equal(bins, [0, 0, 3])
    with pytest.raises(ValueError, match="must lie in"):
        assign_time_bins(np.array([-1.0]), edges)
    with pytest.raises(ValueError, match="must lie in"):
        assign_time_bins(np.array([np.nan]), edges)


def test_time_bin_edges_without_deaths_is_a_clear_error():
    with pytest.raises(ValueError, match="no uncensored patient"):
        time_bin_edges(np.array([3.0, 7.0, 9.0]), np.array([1, 1, 1]))


@pytest.mark.parametrize(
    "time, censorship, problem",
    [
        (np.array([3.0, -1.0]), np.array([0, 1]), "non-negative"),
        (np.array([3.0, np.inf]), np.array([0, 1]), "finite"),
        (np.array([3.0, 4.0]), np.array([0, 2]), "censorship must be 0"),
        (np.array([3.0, 4.0]), np.array([0]), "equal length"),
    ],
)
def test_time_bin_edges_rejects_bad_input(time, censorship, problem):
    with pytest.raises(ValueError, match=problem):
        time_bin_edges(time, censorship)


def test_duplicate_quantiles_keep_n_bins_with_empty_bins():
    # Three deaths, all at 12 months: every quantile is 12.
    time = np.array([12.0, 12.0, 12.0, 3.0, 30.0])
    censorship = np.array([0, 0, 0, 1, 1])

    edges = time_bin_edges(time, censorship, n_bins=4)

    np.testing.assert_array_equal(edges, [0.0, 12.0, 12.0, 12.0, np.inf])
    bins = assign_time_bins(time, edges)
    np.testing.assert_array_equal(bins, [3, 3, 3, 0, 3])
    assert bins.max() < 4


def test_bins_come_from_the_training_split_only():
    rng = np.random.default_rng(2)
    train_time, train_c = rng.exponential(20.0, 80), (rng.random(80) < 0.3).astype(int)
    edges = time_bin_edges(train_time, train_c)
    frozen = edges.copy()

    for seed in (3, 4):
        val_rng = np.random.default_rng(seed)
        # Validation sets with very different times: binning them must not move the training edges.
        val_time, val_c = val_rng.exponential(20.0 * seed, 40), np.zeros(40, int)
        val_bins = assign_time_bins(val_time, edges)
        assert val_bins.min() >= 0 and val_bins.max() <= 3
        np.testing.assert_array_equal(edges, frozen)
        np.testing.assert_array_equal(time_bin_edges(train_time, train_c), frozen)
        # Pooling train and validation would have moved them: the split matters.
        pooled = time_bin_edges(np.concatenate([train_time, val_time]), np.concatenate([train_c, val_c]))
        assert not np.allclose(pooled, frozen)


# --------------------------------------------------------------------------- NLL loss and risk


def test_cox_loss_matches_a_hand_computed_batch_with_a_tie_and_strata():
    risk = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    months = torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.float64)
    censorship = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    e = math.exp
    # Deaths at 1 (all at risk), at 2 twice (Breslow: both tied patients and the one at 3 are at risk).
    expected = -((1.0 - math.log(e(1.0) + e(0.0) + e(2.0) + e(0.5)))
                 + (0.0 - math.log(e(0.0) + e(2.0) + e(0.5)))
                 + (0.5 - math.log(e(0.0) + e(2.0) + e(0.5)))) / 3
    assert cox_partial_likelihood_loss(risk, months, censorship).item() == pytest.approx(expected, rel=1e-12)
    # Strata: patient 0 alone in its stratum (its own risk set), the others together.
    strata = torch.tensor([0, 1, 1, 1])
    expected = -((1.0 - 1.0) + (0.0 - math.log(e(0.0) + e(2.0) + e(0.5)))
                 + (0.5 - math.log(e(0.0) + e(2.0) + e(0.5)))) / 3
    assert cox_partial_likelihood_loss(risk, months, censorship, strata).item() == pytest.approx(expected, rel=1e-12)


def test_cox_loss_rewards_the_right_order_and_is_zero_without_deaths():
    months = torch.tensor([1.0, 2.0, 3.0])
    censorship = torch.tensor([0.0, 0.0, 1.0])
    right = cox_partial_likelihood_loss(torch.tensor([2.0, 1.0, 0.0]), months, censorship)
    wrong = cox_partial_likelihood_loss(torch.tensor([0.0, 1.0, 2.0]), months, censorship)
    assert right < wrong
    risk = torch.tensor([0.3, 0.1, 0.2], requires_grad=True)
    none = cox_partial_likelihood_loss(risk, months, torch.ones(3))
    none.backward()
    assert none.item() == 0.0 and torch.equal(risk.grad, torch.zeros(3))


def test_nll_matches_a_hand_computed_two_patient_batch():
    hazards = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.2, 0.1]]
    beta = 0.15
    # Patient 0 died in bin 2: alive through bins 0 and 1, then died.
    uncensored = -(math.log((1 - 0.1) * (1 - 0.2)) + math.log(0.3))
    # Patient 1 censored in bin 1: survived bins 0 and 1.
    censored = -math.log((1 - 0.5) * (1 - 0.25))
    expected = ((1 - beta) * uncensored + beta * uncensored + (1 - beta) * censored) / 2

    loss = nll_survival_loss(logits_of(hazards), torch.tensor([2, 1]), torch.tensor([0, 1]), beta=beta)

    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_nll_equals_porpoise_definition_including_clamped_extremes():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 4, generator=gen, dtype=torch.float64) * 3
    logits[:8] = 50.0 * torch.sign(torch.randn(8, 4, generator=gen, dtype=torch.float64))
    y = torch.randint(0, 4, (64,), generator=gen)
    c = torch.randint(0, 2, (64,), generator=gen)
    for beta in (0.0, 0.15, 1.0):
        ours = nll_survival_loss(logits, y, c, beta=beta)
        assert ours.item() == pytest.approx(porpoise_nll(logits, y, c, beta).item(), rel=1e-12)


def test_beta_zero_and_one():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(16, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (16,), generator=gen)
    c = torch.tensor([0, 1] * 8)

    loss_0 = nll_survival_loss(logits, y, c, beta=0.0)
    loss_1 = nll_survival_loss(logits, y, c, beta=1.0)
    loss_mid = nll_survival_loss(logits, y, c, beta=0.3)
    assert loss_mid.item() == pytest.approx(0.7 * loss_0.item() + 0.3 * loss_1.item(), rel=1e-12)

    # beta = 1 keeps only the uncensored term: censored patients get no gradient.
    (grad_1,) = torch.autograd.grad(loss_1, logits)
    assert torch.all(grad_1[c == 1] == 0)
    assert torch.all(grad_1[c == 0].abs().sum(dim=1) > 0)
    # beta = 0 is the plain likelihood: censored patients do count.
    (grad_0,) = torch.autograd.grad(loss_0, logits)
    assert torch.all(grad_0[c == 1].abs().sum(dim=1) > 0)
    # An all-censored batch has no uncensored term.
    assert nll_survival_loss(logits, y, torch.ones(16, dtype=torch.long), beta=1.0).item() == 0.0


def test_nll_gradients_are_finite_for_extreme_logits():
    logits = torch.tensor([[50.0, -50.0, 50.0, -50.0], [-50.0, -50.0, -50.0, -50.0], [50.0] * 4, [-50.0] * 4])
    logits.requires_grad_(True)
    loss = nll_survival_loss(logits, torch.tensor([3, 3, 0, 0]), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(logits.grad))


def test_nll_rejects_out_of_range_bins():
    with pytest.raises(ValueError, match="time_bin must be in 0..3"):
        nll_survival_loss(torch.zeros(2, 4), torch.tensor([0, 4]), torch.tensor([0, 1]))


def test_risk_is_minus_summed_survival_and_orders_by_hazard():
    hazards = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.2, 0.1]]
    s0 = np.cumprod([0.9, 0.8, 0.7, 0.6])
    s1 = np.cumprod([0.5, 0.75, 0.8, 0.9])

    risk = risk_from_hazard_logits(logits_of(hazards))

    np.testing.assert_allclose(risk.numpy(), [-s0.sum(), -s1.sum()], rtol=1e-12)
    # Numpy in, numpy out; a patient with higher hazards everywhere has the higher risk.
    low = np.array([[-2.0, -2.0, -2.0, -2.0]])
    high = low + 1.0
    risk_np = risk_from_hazard_logits(np.concatenate([low, high]))
    assert isinstance(risk_np, np.ndarray)
    assert risk_np[1] > risk_np[0]


# --------------------------------------------------------------------------- c-index pair counts


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_pair_counts_match_pair_enumeration_and_sksurv_with_ties(seed):
    risk, time, censorship = tied_survival_data(seed)
    assert len(np.unique(time)) < len(time) and len(np.unique(risk)) < len(risk)

    counts = concordance_counts(risk, time, censorship)

    assert counts == brute_force_pair_counts(risk, time, censorship)
    sk = concordance_index_censored(censorship == 0, time, risk)
    assert (counts.concordant, counts.discordant, counts.tied_risk, counts.tied_time) == tuple(sk[1:])
    assert counts.cindex == pytest.approx(sk[0], rel=1e-12)
    assert harrell_cindex(risk, time, censorship) == counts.cindex


def test_cindex_is_nan_when_no_pair_is_comparable():
    time = np.array([1.0, 2.0, 3.0])
    assert math.isnan(harrell_cindex(np.array([0.1, 0.2, 0.3]), time, np.array([1, 1, 1])))
    # One death, at the longest time: nobody outlives it.
    assert math.isnan(harrell_cindex(np.array([0.1, 0.2, 0.3]), time, np.array([1, 1, 0])))
    # Two deaths tied at the longest time.
    assert math.isnan(harrell_cindex(np.array([0.1, 0.2, 0.3]), np.array([1.0, 3.0, 3.0]), np.array([1, 0, 0])))
    assert concordance_counts(np.array([]), np.array([]), np.array([])) == PairCounts()
    # A single patient, dead or censored (a small site's only patient of a cancer): no pair, not an error.
    assert concordance_counts(np.array([0.5]), np.array([4.0]), np.array([0])) == PairCounts()
    assert concordance_counts(np.array([0.5]), np.array([4.0]), np.array([1])) == PairCounts()


def test_pair_counts_of_two_sites_add_up_to_the_site_stratified_cindex():
    risk, time, censorship = tied_survival_data(10, n=150)
    site_a, site_b = slice(0, 70), slice(70, None)

    counts_a = concordance_counts(risk[site_a], time[site_a], censorship[site_a])
    counts_b = concordance_counts(risk[site_b], time[site_b], censorship[site_b])
    pooled = concordance_counts(risk, time, censorship)
    summed = counts_a + counts_b

    # Pairs across sites are never counted: every count of the sum is at most the pooled one.
    for field in ("concordant", "discordant", "tied_risk", "tied_time"):
        assert getattr(summed, field) <= getattr(pooled, field)
    assert summed.comparable < pooled.comparable
    # The site-stratified c-index is the c-index of the summed counts, i.e. of the within-site pairs.
    within_site = brute_force_pair_counts(risk[site_a], time[site_a], censorship[site_a]) + brute_force_pair_counts(
        risk[site_b], time[site_b], censorship[site_b]
    )
    assert summed == within_site
    expected = (counts_a.concordant + counts_b.concordant + 0.5 * (counts_a.tied_risk + counts_b.tied_risk)) / (
        counts_a.comparable + counts_b.comparable
    )
    assert summed.cindex == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- Kaplan-Meier and log-rank


def event_time_edges(time: np.ndarray, censorship: np.ndarray) -> np.ndarray:
    """0, every distinct death time, inf: the bins on which binned KM and log-rank are exact."""
    return np.concatenate([[0.0], np.unique(time[censorship == 0]), [np.inf]])


def test_km_counts_add_up_across_sites():
    rng = np.random.default_rng(11)
    time, censorship = rng.exponential(25.0, 90), (rng.random(90) < 0.4).astype(int)
    edges = time_bin_edges(time, censorship)

    pooled = km_counts(time, censorship, edges)
    summed = km_counts(time[:40], censorship[:40], edges) + km_counts(time[40:], censorship[40:], edges)

    for field in ("at_risk", "deaths", "censored"):
        np.testing.assert_array_equal(getattr(summed, field), getattr(pooled, field))
    assert pooled.at_risk[0] == 90
    assert pooled.deaths.sum() == (censorship == 0).sum() and pooled.censored.sum() == censorship.sum()
    assert pooled.deaths.dtype == np.int64
    with pytest.raises(ValueError, match="different time bin edges"):
        pooled + km_counts(time, censorship, edges * 2)


def test_km_curve_from_counts_is_exact_kaplan_meier_on_death_time_edges():
    _, time, censorship = tied_survival_data(12)
    edges = event_time_edges(time, censorship)

    survival = km_curve_from_counts(km_counts(time, censorship, edges))

    km_time, km_survival = kaplan_meier_estimator(censorship == 0, time)
    at_edges = km_survival[np.searchsorted(km_time, edges[1:-1])]
    assert survival.shape == (len(edges) - 1,)
    assert survival[0] == 1.0  # no death before the first death time
    np.testing.assert_allclose(survival[1:], at_edges, rtol=1e-12)


def test_km_curve_on_coarse_bins_is_monotone_and_within_range():
    _, time, censorship = tied_survival_data(13)
    survival = km_curve_from_counts(km_counts(time, censorship, time_bin_edges(time, censorship)))
    assert np.all(np.diff(survival) <= 0)
    assert 0.0 <= survival[-1] < survival[0] <= 1.0


def test_logrank_from_counts_matches_sksurv_on_death_time_edges():
    rng = np.random.default_rng(14)
    n = 100
    group = rng.random(n) < 0.5
    time = np.ceil(rng.exponential(np.where(group, 10.0, 16.0))).astype(np.float64)  # ties across groups
    censorship = (rng.random(n) < 0.3).astype(int)
    edges = event_time_edges(time, censorship)

    statistic, p_value = logrank_test_from_counts(
        km_counts(time[group], censorship[group], edges), km_counts(time[~group], censorship[~group], edges)
    )

    sk_statistic, sk_p_value = compare_survival(Surv.from_arrays(censorship == 0, time), group)
    assert statistic == pytest.approx(sk_statistic, rel=1e-10)
    assert p_value == pytest.approx(sk_p_value, rel=1e-8)


def test_logrank_without_deaths_is_nan():
    edges = np.array([0.0, 5.0, np.inf])
    a = km_counts(np.array([1.0, 6.0]), np.array([1, 1]), edges)
    b = km_counts(np.array([2.0]), np.array([1]), edges)
    statistic, p_value = logrank_test_from_counts(a, b)
    assert math.isnan(statistic) and math.isnan(p_value)
    assert isinstance(a, KMCounts) and a.n_bins == 2


# --------------------------------------------------------------------------- the c-index's standard error


def survival_with_signal(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential deaths whose rate grows with the risk score, uniform censoring (about a third censored)."""
    risk = rng.normal(size=n)
    death = rng.exponential(1.0 / np.exp(0.7 * risk))
    follow_up = rng.uniform(0.0, 3.0, size=n)
    return risk, np.minimum(death, follow_up), (follow_up < death).astype(np.int64)


def test_standard_error_matches_the_leave_one_out_jackknife():
    risk, time, censorship = survival_with_signal(np.random.default_rng(3), 250)
    counts = concordance_counts(risk, time, censorship)
    leave_one_out = np.array([harrell_cindex(np.delete(risk, i), np.delete(time, i), np.delete(censorship, i))
                              for i in range(len(risk))])
    n = len(risk)
    jackknife_se = math.sqrt((n - 1) / n * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    assert counts.standard_error == pytest.approx(jackknife_se, rel=0.05)


def test_standard_error_matches_the_spread_of_the_cindex_over_repeated_cohorts():
    rng = np.random.default_rng(4)
    draws = [concordance_counts(*survival_with_signal(rng, 120)) for _ in range(300)]
    spread = np.std([d.cindex for d in draws], ddof=1)
    mean_se = np.mean([d.standard_error for d in draws])
    assert 0.85 < mean_se / spread < 1.15
    # and the 95% interval covers the c-index of a very large cohort about 95% of the time
    truth = concordance_counts(*survival_with_signal(np.random.default_rng(5), 4000)).cindex
    covered = np.mean([lo <= truth <= hi for lo, hi in (d.interval() for d in draws)])
    assert 0.90 <= covered <= 0.99


def test_interval_is_clipped_and_undefined_without_pairs_or_sums():
    perfect = concordance_counts(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0]), np.array([0, 0, 0]))
    assert perfect.cindex == 1.0 and perfect.interval()[1] == 1.0
    assert all(math.isnan(v) for v in PairCounts().interval())
    counts_only = PairCounts(concordant=10, discordant=5)  # e.g. from a source that sent no sums
    assert math.isnan(counts_only.standard_error) and all(math.isnan(v) for v in counts_only.interval())


def test_patient_pair_scores_sum_to_twice_the_pairs():
    risk, time, censorship = tied_survival_data(11, n=90)
    w, b = patient_pair_scores(risk, time, censorship, block=7)  # several blocks
    counts = concordance_counts(risk, time, censorship)
    assert w.sum() == 2 * (counts.concordant + 0.5 * counts.tied_risk) and b.sum() == 2 * counts.comparable
