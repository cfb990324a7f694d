"""Dynamic patch selection: token counts, geometry, unseen sweeps, modes, score cache, policies, prefetch.

The banks are real HDF5 files. Feature column 0 holds each patch's row in the
imported (pre curve order) slide, so a test can tell which rows were read.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cancermoe.bank import Bank, BankWriter
from cancermoe.cohort import open_cohort
from cancermoe.config import CancerMoEConfig
from cancermoe.dps import (
    PatchSelector,
    Role,
    ScoreCache,
    ScoreUpdatePolicy,
    Selection,
    dps_token_counts,
    neighbourhoods,
    prefetch,
    split_tokens_over_slides,
)
from cancermoe.errors import InputError
from cancermoe.model import ModelOutput
from cancermoe.survival import risk_from_hazard_logits, time_bin_edges
from cancermoe.train import SiteTrainer, collate

FEATURE_DIM = 8
PATCH_PX = 256


def grid_slide(width: int, height: int, slide_number: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and coords of a width x height grid of patches; feature 0 = imported row, 1 = slide number."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height), indexing="xy")
    coords = np.stack((xs.ravel(), ys.ravel()), axis=1).astype(np.int32) * PATCH_PX
    features = np.zeros((len(coords), FEATURE_DIM), dtype=np.float32)
    features[:, 0] = np.arange(len(coords))
    features[:, 1] = slide_number
    return features, coords


def write_bank(path, slides: dict[str, tuple[int, int]], patients: dict[str, list[str]], source: str = "test"):
    with BankWriter(path, feature_dim=FEATURE_DIM, source=source, feature_dtype="float32") as writer:
        for number, (slide_id, (width, height)) in enumerate(slides.items()):
            writer.add_slide(slide_id, *grid_slide(width, height, number))
        for i, (case_id, slide_ids) in enumerate(patients.items()):
            writer.add_patient(case_id, "BLCA", survival_months=10.0 + i, censorship=i % 2, slide_ids=slide_ids)
    return path


SLIDES = {"big": (40, 40), "left": (40, 30), "right": (20, 20), "tiny": (6, 5)}
PATIENTS = {"P-big": ["big"], "P-two": ["left", "right"], "P-tiny": ["tiny"], "P-none": []}


class RecordingBank(Bank):
    """A real bank that records every `read_features` call."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.reads: list[tuple[str, np.ndarray]] = []

    def read_features(self, slide_id, rows):
        self.reads.append((slide_id, np.asarray(rows).copy()))
        return super().read_features(slide_id, rows)


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    return write_bank(tmp_path_factory.mktemp("bank") / "site.h5", SLIDES, PATIENTS)


@pytest.fixture
def bank(bank_path):
    with RecordingBank(bank_path) as opened:
        yield opened


@pytest.fixture
def cache(bank, tmp_path):
    return ScoreCache(tmp_path / "site.dps.h5", bank)


def patient(bank: Bank, case_id: str):
    return next(p for p in bank.patients if p.case_id == case_id)


def selector(bank, cache, tokens=100, key_tokens=4, unseen_ratio=0.5, mode="dps", seed=0) -> PatchSelector:
    return PatchSelector(bank, cache, tokens=tokens, key_tokens=key_tokens, unseen_ratio=unseen_ratio,
                         mode=mode, seed=seed)


def rows_of(selection: Selection, role: Role | None = None) -> np.ndarray:
    at = np.ones(selection.n_tokens, dtype=bool) if role is None else selection.token_role == role
    return selection.token_row[at]


def groups_of(selection: Selection) -> list[np.ndarray]:
    """Key-plus-neighbours groups, in bag order (each group starts at its key)."""
    roles, rows = selection.token_role, selection.token_row
    starts = np.flatnonzero(roles == Role.KEY)
    stops = [*starts[1:], np.flatnonzero(np.isin(roles, (Role.KEY, Role.NEIGHBOUR)))[-1] + 1]
    return [rows[a:b] for a, b in zip(starts, stops, strict=True)]


def distances(bank: Bank, slide_id: str, row: int) -> np.ndarray:
    coords = bank.read_coords(slide_id).astype(np.float64)
    return np.linalg.norm(coords - coords[row], axis=1)


def set_scores(cache: ScoreCache, slide_id: str, scores: np.ndarray) -> None:
    cache.stage(slide_id, np.arange(scores.size), scores)
    cache.end_epoch(adopt=True)


# --------------------------------------------------------------------------- counts and geometry


@pytest.mark.parametrize("tokens, key_tokens, unseen_ratio", [(100, 4, 0.5), (101, 3, 0.3), (64, 1, 0.0),
                                                               (50, 0, 0.5), (40, 4, 1.0)])
def test_selection_honours_n_b_and_p(bank, cache, tokens, key_tokens, unseen_ratio):
    sel = selector(bank, cache, tokens, key_tokens, unseen_ratio).select(
        patient(bank, "P-big"), train=True, rng=np.random.default_rng(1))
    n_unseen = round(tokens * unseen_ratio) if key_tokens else tokens
    n_keys = min(key_tokens, tokens - n_unseen)
    assert sel.features.shape == (tokens, FEATURE_DIM) and sel.n_tokens == tokens
    assert sel.role_count(Role.UNSEEN) == n_unseen
    assert sel.role_count(Role.KEY) == n_keys
    assert sel.role_count(Role.NEIGHBOUR) == tokens - n_unseen - n_keys
    sizes = [len(g) for g in groups_of(sel)] if n_keys else []
    assert max(sizes, default=0) - min(sizes, default=0) <= 1  # split evenly over the keys


def test_dps_token_counts_split_the_neighbourhood_evenly():
    sizes, n_unseen = dps_token_counts(101, 4, 0.3)
    assert n_unseen == 30 and sum(sizes) == 71 and sorted(sizes, reverse=True) == sizes
    assert set(sizes) == {17, 18}
    assert dps_token_counts(3, 4, 0.0) == ([1, 1, 1], 0)  # fewer tokens than keys: one key per token


def test_no_patch_appears_twice_in_a_selection(bank, cache):
    sel_ = selector(bank, cache, tokens=300, key_tokens=8, unseen_ratio=0.5)
    rng = np.random.default_rng(2)
    for _ in range(4):
        sel = sel_.select(patient(bank, "P-big"), train=True, rng=rng)
        rows = rows_of(sel)
        assert np.unique(rows).size == rows.size == 300
        sel_.stage_scores(sel, rng.random(sel.n_tokens))
        cache.end_epoch(adopt=True)


def test_neighbourhood_is_the_nearest_patches_to_its_key(bank, cache):
    sel = selector(bank, cache, tokens=60, key_tokens=1, unseen_ratio=0.5).select(
        patient(bank, "P-big"), train=True, rng=np.random.default_rng(3))
    (key,) = rows_of(sel, Role.KEY)
    group = rows_of(sel, Role.NEIGHBOUR)
    assert group.size == 29
    dist = distances(bank, "big", key)
    others = np.setdiff1d(np.arange(dist.size), np.append(group, key))
    assert dist[group].max() <= dist[others].min()


def test_each_key_gets_its_own_nearest_patches(bank, cache):
    n = bank.n_patches("big")
    coords = bank.read_coords("big")
    corners = [int(np.flatnonzero((coords == c).all(axis=1))[0])
               for c in ([0, 0], [39 * PATCH_PX, 0], [0, 39 * PATCH_PX], [39 * PATCH_PX, 39 * PATCH_PX])]
    scores = np.zeros(n, dtype=np.float32)
    scores[corners] = [4, 3, 2, 1]
    set_scores(cache, "big", scores)
    sel = selector(bank, cache, tokens=40, key_tokens=4, unseen_ratio=0.0).select(
        patient(bank, "P-big"), train=True, rng=np.random.default_rng(4))
    groups = groups_of(sel)
    assert [int(g[0]) for g in groups] == corners  # keys, best first
    for group in groups:
        dist = distances(bank, "big", group[0])
        assert group.size == 10
        assert dist[group].max() <= dist[np.setdiff1d(np.arange(n), group)].min()


def test_overlapping_neighbourhoods_take_the_next_nearest(bank, cache):
    n = bank.n_patches("big")
    coords = bank.read_coords("big")
    a, b = (int(np.flatnonzero((coords == c).all(axis=1))[0]) for c in ([20 * PATCH_PX, 20 * PATCH_PX],
                                                                        [21 * PATCH_PX, 20 * PATCH_PX]))
    scores = np.zeros(n, dtype=np.float32)
    scores[[a, b]] = [2, 1]
    set_scores(cache, "big", scores)
    sel = selector(bank, cache, tokens=50, key_tokens=2, unseen_ratio=0.0).select(
        patient(bank, "P-big"), train=True, rng=np.random.default_rng(5))
    first, second = groups_of(sel)
    assert first[0] == a and second[0] == b and np.intersect1d(first, second).size == 0
    dist = distances(bank, "big", b)
    untaken = np.setdiff1d(np.arange(n), np.concatenate((first, second)))
    assert dist[second[1:]].max() <= dist[untaken].min()


def test_neighbourhoods_function_skips_taken_rows():
    from scipy.spatial import cKDTree

    x = np.array([0, 1, 3, 6, 10, 15, 21], dtype=np.float64)  # points on a line, no two distances tied
    first, second = neighbourhoods(cKDTree(x[:, None]), np.array([3, 4]), [3, 3])
    assert first.tolist() == [3, 2, 1]  # x=10 is nearer than x=1 but it is the other key
    assert second.tolist() == [4, 5, 0]  # x=6 and x=3 are nearer but already taken


# --------------------------------------------------------------------------- unseen draws


def test_unseen_tokens_were_not_seen_before(bank, cache):
    sel_ = selector(bank, cache, tokens=200, key_tokens=4, unseen_ratio=0.5)
    rng = np.random.default_rng(6)
    for _ in range(5):
        seen_before = cache.seen("big")
        sel = sel_.select(patient(bank, "P-big"), train=True, rng=rng)
        assert not seen_before[rows_of(sel, Role.UNSEEN)].any()
        assert cache.seen("big")[rows_of(sel)].all()


def test_sweep_restarts_when_too_few_unseen_remain(bank, cache):
    n = bank.n_patches("big")
    fresh = np.arange(10)
    cache.mark_seen("big", np.arange(10, n))
    sel = selector(bank, cache, tokens=100, key_tokens=4, unseen_ratio=0.5).select(
        patient(bank, "P-big"), train=True, rng=np.random.default_rng(7))
    rows = rows_of(sel)
    assert np.isin(fresh, rows).all()  # the rest of the old sweep is taken first
    assert set(np.flatnonzero(cache.seen("big"))) == set(rows)  # the new sweep holds only this selection


def test_eval_neither_uses_nor_changes_seen(bank, cache):
    cache.mark_seen("big", np.arange(0, bank.n_patches("big"), 2))
    before = cache.seen("big")
    sel = selector(bank, cache).select(patient(bank, "P-big"), train=False, rng=np.random.default_rng(8))
    assert np.array_equal(cache.seen("big"), before)
    assert sel.n_tokens == 100


# --------------------------------------------------------------------------- reads, padding, several slides


def test_reads_exactly_the_rows_it_returns(bank, cache):
    for case_id in PATIENTS:
        bank.reads.clear()
        sel = selector(bank, cache).select(patient(bank, case_id), train=True, rng=np.random.default_rng(9))
        assert [(s, sorted(r)) for s, r in bank.reads] == [(s, sorted(r)) for s, r in sel.parts]
        for i, (slide_id, rows) in enumerate(sel.parts):
            at = sel.token_slide == i
            assert np.array_equal(sel.token_row[at], rows)
            assert np.array_equal(sel.features[at, 0], bank.source_rows(slide_id)[rows])
            assert (sel.features[at, 1] == list(SLIDES).index(slide_id)).all()


def test_small_slide_is_taken_whole_and_not_padded(bank, cache):
    n = bank.n_patches("tiny")
    sel = selector(bank, cache, tokens=64).select(patient(bank, "P-tiny"), train=True,
                                                  rng=np.random.default_rng(10))
    assert n < 64 and sel.n_tokens == n and sel.features.shape == (n, FEATURE_DIM)
    assert np.array_equal(np.sort(rows_of(sel)), np.arange(n))
    assert (sel.token_role == Role.WHOLE).all()


def test_patient_without_slides_gets_an_empty_bag(bank, cache):
    sel = selector(bank, cache, tokens=16).select(patient(bank, "P-none"), train=True,
                                                  rng=np.random.default_rng(10))
    assert sel.parts == [] and sel.n_tokens == 0 and sel.features.shape == (0, FEATURE_DIM)
    assert bank.reads == []


def test_several_slides_share_n_by_size(bank, cache):
    sel = selector(bank, cache, tokens=100).select(patient(bank, "P-two"), train=True,
                                                   rng=np.random.default_rng(11))
    sizes = {slide_id: len(rows) for slide_id, rows in sel.parts}
    n_left, n_right = bank.n_patches("left"), bank.n_patches("right")
    assert sizes == {"left": 100 * n_left // (n_left + n_right), "right": 100 * n_right // (n_left + n_right)}
    assert sel.n_tokens == 100


def test_split_tokens_over_slides():
    assert split_tokens_over_slides([1600, 400], 100).tolist() == [80, 20]
    budgets = split_tokens_over_slides([1000, 3, 500], 30)
    assert budgets.sum() == 30 and budgets.min() >= 1 and budgets[0] > budgets[2]
    assert split_tokens_over_slides([10000, 1], 50).tolist() == [49, 1]  # at least one each
    assert split_tokens_over_slides([5, 7], 100).tolist() == [5, 7]  # all patches, bag padded
    assert split_tokens_over_slides([5, 9, 7], 2).tolist() == [0, 1, 1]  # fewer tokens than slides
    for counts, tokens in (([3, 3, 3], 7), ([100, 50, 25, 1], 60)):
        budgets = split_tokens_over_slides(counts, tokens)
        assert budgets.sum() == tokens and (budgets <= counts).all()


# --------------------------------------------------------------------------- modes


def test_random_mode_draws_anew_each_call(bank, cache):
    sel_ = selector(bank, cache, mode="random")
    rng = np.random.default_rng(12)
    first, second = (sel_.select(patient(bank, "P-big"), train=True, rng=rng) for _ in range(2))
    third = sel_.select(patient(bank, "P-big"), train=False, rng=rng)
    assert (first.token_role == Role.RANDOM).all()
    assert not np.array_equal(np.sort(rows_of(first)), np.sort(rows_of(second)))
    assert not np.array_equal(np.sort(rows_of(second)), np.sort(rows_of(third)))


def test_fixed_random_mode_keeps_one_draw(bank, cache):
    reference = selector(bank, cache, mode="fixed-random", seed=3)
    draws = [reference.select(patient(bank, "P-two"), train=True, rng=np.random.default_rng(e)) for e in range(3)]
    draws.append(reference.select(patient(bank, "P-two"), train=False, rng=np.random.default_rng(99)))
    restarted = selector(bank, cache, mode="fixed-random", seed=3)  # a new process: same seed, same draw
    draws.append(restarted.select(patient(bank, "P-two"), train=True, rng=np.random.default_rng(7)))
    for sel in draws[1:]:
        assert np.array_equal(sel.token_row, draws[0].token_row)
    other_seed = selector(bank, cache, mode="fixed-random", seed=4).select(
        patient(bank, "P-two"), train=True, rng=np.random.default_rng(0))
    assert not np.array_equal(other_seed.token_row, draws[0].token_row)


def test_dps_eval_is_deterministic(bank, cache):
    scores = np.random.default_rng(13).random(bank.n_patches("big")).astype(np.float32)
    set_scores(cache, "big", scores)
    first = selector(bank, cache, seed=5).select(patient(bank, "P-big"), train=False, rng=np.random.default_rng(1))
    again = selector(bank, cache, seed=5).select(patient(bank, "P-big"), train=False, rng=np.random.default_rng(2))
    assert np.array_equal(first.token_row, again.token_row)
    assert np.array_equal(first.token_role, again.token_role)
    assert set(rows_of(first, Role.KEY)) == set(np.argsort(-scores)[:4])


def test_eval_without_scores_is_deterministic_too(bank, cache):
    runs = [selector(bank, cache, seed=5).select(patient(bank, "P-big"), train=False,
                                                 rng=np.random.default_rng(i)) for i in range(2)]
    assert np.array_equal(runs[0].token_row, runs[1].token_row)


# --------------------------------------------------------------------------- scores


def test_keys_follow_adopted_scores(bank, cache):
    coords = bank.read_coords("big") // PATCH_PX
    region = np.flatnonzero((coords[:, 0] >= 30) & (coords[:, 1] < 5))  # a 10 x 5 corner
    sel_ = selector(bank, cache, tokens=100, key_tokens=4)
    rng = np.random.default_rng(14)
    before = sel_.select(patient(bank, "P-big"), train=True, rng=rng)
    assert not np.isin(rows_of(before, Role.KEY), region).all()  # unscored: keys fall anywhere

    scores = np.full(bank.n_patches("big"), 0.1, dtype=np.float32)
    scores[region] = 1.0
    cache.stage("big", np.arange(scores.size), scores)
    dropped = sel_.select(patient(bank, "P-big"), train=True, rng=rng)
    cache.end_epoch(adopt=False)
    assert not np.isin(rows_of(dropped, Role.KEY), region).all()  # staged scores are not used yet

    cache.stage("big", np.arange(scores.size), scores)
    cache.end_epoch(adopt=True)
    after = sel_.select(patient(bank, "P-big"), train=True, rng=rng)
    assert np.isin(rows_of(after, Role.KEY), region).all()


def test_stage_scores_maps_tokens_back_to_rows(bank, cache):
    sel_ = selector(bank, cache, tokens=64)
    sel = sel_.select(patient(bank, "P-tiny"), train=True, rng=np.random.default_rng(15))
    attention = sel.token_row.astype(np.float32) / 100
    attention[0] = np.nan  # a non-finite value is ignored
    sel_.stage_scores(sel, attention)
    cache.end_epoch(adopt=True)
    scores = cache.scores("tiny")
    rows = sel.token_row[1:]
    np.testing.assert_allclose(scores[rows], rows / 100, rtol=1e-6)
    assert np.isnan(scores[sel.token_row[0]])
    with pytest.raises(ValueError):
        sel_.stage_scores(sel, attention[:10])


def test_cache_adopts_or_keeps_staged_scores(cache):
    cache.stage("big", [1, 2, 3], [0.1, 0.2, 0.3])
    cache.stage("big", [3], [0.9])  # a later stage of the same row wins
    assert np.isnan(cache.scores("big")[[1, 2, 3]]).all() and cache.has_pending()
    cache.end_epoch(adopt=True)
    np.testing.assert_allclose(cache.scores("big")[[1, 2, 3]], [0.1, 0.2, 0.9])
    cache.stage("big", [1, 2], [5.0, 5.0])
    cache.end_epoch(adopt=False)
    np.testing.assert_allclose(cache.scores("big")[[1, 2, 3]], [0.1, 0.2, 0.9])
    assert not cache.has_pending() and cache.epochs_ended == 2
    with pytest.raises(IndexError):
        cache.stage("big", [10**6], [1.0])


def test_cache_survives_a_restart_and_leaves_the_bank_alone(bank_path, tmp_path):
    bank_bytes = hashlib.sha256(bank_path.read_bytes()).hexdigest()
    with Bank(bank_path) as bank:
        cache = ScoreCache(tmp_path / "site.dps.h5", bank)
        values = np.random.default_rng(16).random(50).astype(np.float32)
        cache.stage("big", np.arange(50), values)
        cache.mark_seen("left", [4, 5, 6])
        cache.end_epoch(adopt=True, train_cindex=0.61)
        cache.stage("big", [0], [123.0])  # pending scores are not saved
        cache.save()
        scores, seen = cache.scores("big"), cache.seen("left")
    with Bank(bank_path) as bank:
        reloaded = ScoreCache(tmp_path / "site.dps.h5", bank)
        assert reloaded.reset_reason is None
        assert np.array_equal(reloaded.scores("big"), scores, equal_nan=True)
        assert np.array_equal(reloaded.seen("left"), seen)
        assert reloaded.epochs_ended == 1 and reloaded.last_train_cindex == pytest.approx(0.61)
        reloaded.scores("right")  # touch another slide; "big" and "left" were loaded, keep them in the next save
        reloaded.save()
    with Bank(bank_path) as bank:
        again = ScoreCache(tmp_path / "site.dps.h5", bank)
        assert np.array_equal(again.scores("big"), scores, equal_nan=True)
    assert hashlib.sha256(bank_path.read_bytes()).hexdigest() == bank_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.dps.h5"]  # no temporary file left


def test_save_keeps_slides_this_process_never_loaded(bank, tmp_path):
    path = tmp_path / "site.dps.h5"
    first = ScoreCache(path, bank)
    first.stage("big", [7], [0.7])
    first.end_epoch(adopt=True)
    first.save()
    second = ScoreCache(path, bank)
    second.stage("tiny", [1], [0.1])
    second.end_epoch(adopt=True)
    second.save()  # "big" is copied from the old file, not loaded
    third = ScoreCache(path, bank)
    assert third.scores("big")[7] == pytest.approx(0.7) and third.scores("tiny")[1] == pytest.approx(0.1)


def test_cache_of_another_bank_is_reset(bank, tmp_path):
    other = Bank(write_bank(tmp_path / "other.h5", {"big": (40, 40)}, {"P-big": ["big"]}))
    path = tmp_path / "site.dps.h5"
    stale = ScoreCache(path, other)
    stale.stage("big", [0], [1.0])
    stale.end_epoch(adopt=True)
    stale.save()
    other.close()
    fresh = ScoreCache(path, bank)
    assert fresh.reset_reason is not None and "another bank" in fresh.reset_reason
    assert np.isnan(fresh.scores("big")).all() and fresh.epochs_ended == 0


@pytest.mark.bad_input
def test_cache_refuses_foreign_files(bank, tmp_path):
    with pytest.raises(InputError, match="bank file itself"):
        ScoreCache(bank.path, bank)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a DPS score cache"):
        ScoreCache(tmp_path / "notes.txt", bank)
    (tmp_path / "copy.h5").write_bytes(bank.path.read_bytes())  # an HDF5 file, but a bank
    with pytest.raises(InputError, match="not a DPS score cache"):
        ScoreCache(tmp_path / "copy.h5", bank)
    with pytest.raises(InputError, match="does not exist"):
        ScoreCache(tmp_path / "missing" / "x.h5", bank)


# --------------------------------------------------------------------------- policies


def test_cindex_policy_adopts_only_after_a_drop():
    policy = ScoreUpdatePolicy("cindex")
    assert policy.should_adopt(0, 0.60, None)  # first epoch: nothing to keep stable
    assert not policy.should_adopt(1, 0.65, 0.60)
    assert not policy.should_adopt(2, 0.65, 0.65)
    assert policy.should_adopt(3, 0.55, 0.65)
    assert policy.should_adopt(4, math.nan, 0.65) and policy.should_adopt(5, 0.7, math.nan)


def test_epoch_and_every_n_policies():
    assert all(ScoreUpdatePolicy("epoch").should_adopt(e, 0.9, 0.1) for e in range(5))
    every3 = ScoreUpdatePolicy("every-n", every=3)
    assert [every3.should_adopt(e, 0.5, 0.6) for e in range(7)] == [True, False, False, True, False, False, True]
    config = CancerMoEConfig(score_update="every-n", score_update_every=4)
    assert ScoreUpdatePolicy.from_config(config).every == 4
    with pytest.raises(ValueError):
        ScoreUpdatePolicy("sometimes")


# --------------------------------------------------------------------------- prefetch


def test_prefetch_yields_the_same_items_in_order():
    assert list(prefetch(range(50), depth=3)) == list(range(50))
    assert list(prefetch([], depth=1)) == []


def test_prefetch_reraises_the_producer_error_after_its_items():
    def producer():
        yield 1
        yield 2
        raise RuntimeError("bad slide")

    got = []
    with pytest.raises(RuntimeError, match="bad slide"):
        for item in prefetch(producer()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_runs_ahead_of_a_busy_consumer():
    produced = [threading.Event() for _ in range(10)]

    def producer():
        for i in range(10):
            produced[i].set()
            yield i

    items = prefetch(producer(), depth=2)
    assert next(items) == 0
    # The consumer is "computing" on item 0 and asks for nothing; the producer must go on regardless.
    assert produced[1].wait(timeout=10) and produced[2].wait(timeout=10) and produced[3].wait(timeout=10)
    time.sleep(0.05)
    assert not produced[4].is_set()  # bounded: 2 queued + 1 waiting to be queued
    assert list(items) == list(range(1, 10))


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    closed = threading.Event()

    def producer():
        try:
            yield from range(1000)
        finally:
            closed.set()

    items = prefetch(producer(), depth=2)
    assert next(items) == 0
    items.close()
    assert closed.is_set()  # the producer was closed before close() returned
    assert not any(t.name == "cancermoe-prefetch" for t in threading.enumerate())


# --------------------------------------------------------------------------- test-time DPS (SiteTrainer.predict)


PLANTED_SIDE, REGION_SIDE = 20, 4  # 400 patches a slide, a 4 x 4 planted region (4%)
PLANTED_PATIENTS = 5


def planted_bank(path):
    """One 20 x 20 slide per patient, each with a 4 x 4 region flagged in feature column 2, at its own place."""
    regions: dict[str, np.ndarray] = {}
    with BankWriter(path, feature_dim=FEATURE_DIM, source="test", feature_dtype="float32") as writer:
        for i in range(PLANTED_PATIENTS):
            features, coords = grid_slide(PLANTED_SIDE, PLANTED_SIDE, i)
            cell = coords // PATCH_PX
            x0, y0 = (3 * i + 2) % (PLANTED_SIDE - REGION_SIDE), (7 * i + 5) % (PLANTED_SIDE - REGION_SIDE)
            region = ((cell[:, 0] >= x0) & (cell[:, 0] < x0 + REGION_SIDE) & (cell[:, 1] >= y0)
                      & (cell[:, 1] < y0 + REGION_SIDE))
            features[:, 0] /= len(coords)  # keep a real model's inputs small
            features[:, 2] = region
            writer.add_slide(f"s{i}", features, coords)
            writer.add_patient(f"P{i}", "BLCA", survival_months=5.0 + 3 * i, censorship=i % 2, slide_ids=[f"s{i}"])
    with Bank(path) as bank:  # the bank stores rows in curve order: the region as the bank holds it
        for i in range(PLANTED_PATIENTS):
            n = bank.n_patches(f"s{i}")
            regions[f"s{i}"] = bank.read_features(f"s{i}", np.arange(n))[:, 2] == 1
    return path, regions


class RegionScorer(torch.nn.Module):
    """A model whose token score we control: 1 inside the planted region (feature 2), 0.1 outside.

    Its risk is the region share of the bag, so a risk says how much of the region the final selection holds.
    """

    def __init__(self, n_bins: int) -> None:
        super().__init__()
        self.n_bins = n_bins

    def forward(self, wsi, wsi_mask, genomics=None, genomics_mask=None, sparse_inference=None,
                genomic_offset=None) -> ModelOutput:
        region = wsi[..., 2] * wsi_mask
        scores = (0.1 + 0.9 * region) * wsi_mask
        share = region.sum(1) / wsi_mask.sum(1).clamp(min=1)
        logits = share[:, None].expand(-1, self.n_bins) * 4 - 2
        return ModelOutput(logits, torch.zeros(()), scores, scores, "first-cls")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_bank(tmp_path_factory.mktemp("planted") / "planted.h5")


def planted_trainer(planted, workdir, *, passes: int, scorer: bool = True, **changes) -> SiteTrainer:
    config = CancerMoEConfig(feature_dim=FEATURE_DIM, tokens=32, key_tokens=2, unseen_ratio=0.5, batch_size=2,
                             use_genomics=False, dps_score="first-cls", sparsify_keep=0.25,
                             test_time_dps_passes=passes, seed=3).replace(**changes)
    cohort = open_cohort([planted[0]])
    trainer = SiteTrainer(config, cohort, edges=time_bin_edges(cohort.survival_months, cohort.censorship, 4),
                          workdir=workdir)
    if scorer:
        trainer.model = RegionScorer(config.n_bins)
    return trainer


@contextlib.contextmanager
def final_selections(monkeypatch):
    """Collect every evaluation selection that is not a test-time exploration pass, by slide."""
    chosen: dict[str, Selection] = {}
    original = PatchSelector.select

    def select(self, patient, *, train, rng):
        selection = original(self, patient, train=train, rng=rng)
        if not train and self.test_time_pass is None:
            chosen[patient.slide_ids[0]] = selection
        return selection

    monkeypatch.setattr(PatchSelector, "select", select)
    yield chosen


def key_hit_share(chosen: dict[str, Selection], regions: dict[str, np.ndarray]) -> float:
    hits = [regions[s][rows_of(sel, Role.KEY)] for s, sel in chosen.items()]
    return float(np.concatenate(hits).mean())


def test_test_time_passes_move_keys_to_the_high_scored_region(planted, tmp_path, monkeypatch):
    regions = planted[1]
    with final_selections(monkeypatch) as chosen:
        plain = planted_trainer(planted, tmp_path / "p0", passes=0).predict(open_cohort([planted[0]]))
        keys_plain = key_hit_share(chosen, regions)
        chosen.clear()
        settled = planted_trainer(planted, tmp_path / "p8", passes=8).predict(open_cohort([planted[0]]))
        keys_settled = key_hit_share(chosen, regions)
    chance = REGION_SIDE ** 2 / PLANTED_SIDE ** 2
    assert keys_plain <= 3 * chance  # without passes the unscored slides' keys fall anywhere
    assert keys_settled == 1.0  # after the passes every key sits in its slide's region
    assert settled.mean() > plain.mean() + 0.3  # and so do most of its neighbours (risk = region share here)


def test_test_time_passes_leave_training_caches_and_scored_patients_alone(planted, tmp_path):
    trainer = planted_trainer(planted, tmp_path, passes=4)
    cache = trainer.caches[Path(planted[0])]
    known = np.linspace(0, 1, PLANTED_SIDE ** 2, dtype=np.float32)
    set_scores(cache, "s0", known)  # P0 counts as scored by training; the others are new
    cache.save()
    before = Path(cache.path).read_bytes()
    cohort = open_cohort([planted[0]])
    with_passes = trainer.predict(cohort)
    without = planted_trainer(planted, tmp_path / "none", passes=0)
    set_scores(without.caches[Path(planted[0])], "s0", known)
    reference = without.predict(cohort)
    assert with_passes[0] == reference[0]  # the scored patient is predicted as without passes
    assert not np.array_equal(with_passes[1:], reference[1:])
    np.testing.assert_array_equal(cache.scores("s0"), known)
    for slide in ("s1", "s2"):
        assert not cache.is_scored(slide) and not cache.seen(slide).any()
    assert Path(cache.path).read_bytes() == before
    assert not list(tmp_path.glob("*.eval-dps.h5"))  # scratch caches are never written


def test_test_time_passes_are_deterministic(planted, tmp_path):
    cohort = open_cohort([planted[0]])
    runs = [planted_trainer(planted, tmp_path / str(i), passes=3, scorer=False).predict(cohort) for i in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def eval_risks_as_before(trainer: SiteTrainer, cohort) -> np.ndarray:
    """Prediction as it was before test-time DPS: one deterministic eval selection per patient, one forward."""
    selectors = {bank.path: PatchSelector.from_config(bank, ScoreCache(trainer.workdir / "x.h5", bank, scratch=True),
                                                      trainer.config) for bank in cohort.banks()}
    risk = []
    trainer.model.eval()
    with torch.no_grad():
        for ref in cohort.refs:
            sel = selectors[ref.bank.path].select(ref.patient, train=False, rng=np.random.default_rng(0))
            batch = collate([sel], [None], trainer.config.genomic_piece, np.zeros(1), np.zeros(1), np.zeros(1))
            out = trainer.model(batch.wsi, batch.wsi_mask, batch.genomics, batch.genomics_mask)
            risk.append(float(risk_from_hazard_logits(out.hazard_logits)[0]))
    return np.array(risk)


@pytest.mark.parametrize("dps_score", ["last-cls", "first-cls"])
def test_zero_passes_predict_as_before(planted, tmp_path, dps_score):
    cohort = open_cohort([planted[0]])
    trainer = planted_trainer(planted, tmp_path, passes=0, scorer=False, batch_size=1, dps_score=dps_score)
    np.testing.assert_array_equal(trainer.predict(cohort), eval_risks_as_before(trainer, cohort))
    settled = planted_trainer(planted, tmp_path / "passes", passes=2, scorer=False, batch_size=1, dps_score=dps_score)
    assert not np.array_equal(settled.predict(cohort), trainer.predict(cohort))


def test_exploration_needs_a_scratch_cache(bank, cache, tmp_path):
    with pytest.raises(ValueError, match="scratch"):
        selector(bank, cache).explore(0)
    scratch = ScoreCache(tmp_path / "scratch.h5", bank, scratch=True)
    sel_ = selector(bank, scratch)
    sel_.explore(0)
    first = sel_.select(patient(bank, "P-big"), train=False, rng=np.random.default_rng(0))
    assert scratch.seen("big")[first.token_row].all()  # a pass sweeps the slide in the scratch cache
    sel_.explore(1)
    second = sel_.select(patient(bank, "P-big"), train=False, rng=np.random.default_rng(0))
    assert not np.isin(rows_of(second, Role.UNSEEN), first.token_row).any()
    with pytest.raises(RuntimeError, match="never saved"):
        scratch.save()


def test_scratch_cache_ignores_an_existing_file(bank, tmp_path):
    path = tmp_path / "old.h5"
    old = ScoreCache(path, bank)
    set_scores(old, "tiny", np.ones(bank.n_patches("tiny"), dtype=np.float32))
    old.save()
    assert ScoreCache(path, bank).is_scored("tiny")
    assert not ScoreCache(path, bank, scratch=True).is_scored("tiny")
