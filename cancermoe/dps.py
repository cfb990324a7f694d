"""Dynamic Patch Selection (paper section 3.3, appendices A-B) and its on-disk token-score cache.

Each training step looks at a fixed number N of WSI tokens per patient instead
of the whole slide. Per slide, with a budget of m of those tokens:

* **key tokens**: the b patches with the highest token score, the score being
  the CLS token's attention to the patch (``config.dps_score``: in the last
  encoder layer, the paper's, or in the first, before sparsification),
  recorded whenever the model saw that patch;
* **neighbourhood tokens**: m(1-p) tokens around the keys (keys included),
  split evenly over the keys. The paper took tokens left and right of each
  key in sequence order; we take the nearest patches on the slide by
  Euclidean distance of their coords, which is what "around" means;
* **unseen tokens**: m*p tokens drawn uniformly from patches not selected
  before, so every patch gets its turn and the keys cannot lock the model
  onto early, poor scores.

Scores the model produces during an epoch are only *staged*; at the end of the
epoch a `ScoreUpdatePolicy` decides whether they replace the current ones
(the paper's default, "c-index depends", adopts them only when the training
c-index dropped). `ScoreCache` keeps scores and seen-masks beside the bank, so
they survive the new process that each federated round starts.

Costs: selection reads the features of exactly the rows it returns (the bank
reads only the chunks holding them) and a slide's coords (8 bytes a patch);
scores and seen-masks cost 5 bytes a patch for the slides touched.

At prediction, patients whose slides were never scored (a new site, held-out
patients) can get test-time DPS (``config.test_time_dps_passes``, ours): a few
eval-mode passes, each exploring and scoring in a scratch cache that is never
saved (`ScoreCache` with ``scratch``, `PatchSelector.explore`), move the keys
to the best-scored patches before the final pass; see
`cancermoe.train.SiteTrainer.predict`.

The ablations of the paper's table 4 are modes: ``random`` draws new uniform
rows every call (train and eval, "Random Select"), ``fixed-random`` draws once
per slide and keeps that draw for every epoch and at evaluation ("w/o DPS").
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import os
import queue
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np
from scipy.spatial import cKDTree

from cancermoe.bank import Bank, Patient
from cancermoe.config import DPS_MODES, SCORE_UPDATE_POLICIES, CancerMoEConfig
from cancermoe.errors import InputError
from cancermoe.files import atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")


class Role(enum.IntEnum):
    """Why a token is in a selection (`Selection.token_role`)."""

    KEY = 0  # top-scored patch of its slide
    NEIGHBOUR = 1  # near a key token on the slide
    UNSEEN = 2  # dps exploration draw (at eval: a fixed draw, see `PatchSelector`)
    RANDOM = 3  # modes random and fixed-random
    WHOLE = 4  # slide has no more patches than its budget: taken whole


# --------------------------------------------------------------------------- score cache


def bank_fingerprint(bank: Bank) -> str:
    """A hash naming one bank: its creation time, feature size, patients and slides with their patch counts.

    It does not read features, so it is cheap; a bank rebuilt from scratch
    gets a new creation time and so a new fingerprint, even with the same layout.
    """
    identity = {
        "created": str(bank.attrs.get("created", "")),
        "feature_dim": bank.feature_dim,
        "patients": [p.case_id for p in bank.patients],
        "slides": {slide_id: bank.n_patches(slide_id) for slide_id in bank.slide_ids()},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class _SlideScores:
    """In-memory state of one slide: current scores (NaN = unscored), seen mask, scores staged this epoch."""

    scores: np.ndarray  # float32 [n]
    seen: np.ndarray  # bool [n]
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (rows, values), in stage order


class ScoreCache:
    """A site's token scores and seen-masks, in an HDF5 file of its own beside the (read-only) bank.

    Layout::

        /                      attrs: kind, version, bank_name, bank_fingerprint,
                                      epochs_ended, last_train_cindex (NaN = none)
        /slides/<slide_id>/scores  float32 [n_patches], NaN = never scored
        /slides/<slide_id>/seen    bool [n_patches], selected for training in the current sweep

    Slides are loaded lazily, the first time they are asked for, and only those
    are held in memory. Scores staged during an epoch (`stage`) stay pending
    until `end_epoch` adopts or drops them; pending scores live in memory only
    and are not saved. `save` writes a temporary file and renames it over the
    old one, so the file is always a complete cache.

    A file that is a score cache of a *different* bank (another fingerprint,
    e.g. the bank was rebuilt) is ignored with a warning and replaced on the
    next `save`: its scores mean nothing for this bank. A file that is not a
    score cache at all is refused (`InputError`) rather than overwritten.

    ``epochs_ended`` and ``last_train_cindex`` carry what a `ScoreUpdatePolicy`
    needs across process restarts. Methods are thread-safe (the selector may
    run in a `prefetch` thread while the training loop stages scores).
    """

    KIND = "cancermoe-dps-scores"
    VERSION = 1

    def __init__(self, path: str | os.PathLike[str], bank: Bank, *, scratch: bool = False) -> None:
        """``scratch``: start empty whatever the file holds and never `save` (test-time DPS at prediction)."""
        self.path = Path(path)
        self.scratch = scratch
        self.bank = bank
        if self.path.resolve() == Path(bank.path).resolve():
            raise InputError(self.path, "the score cache cannot be the bank file itself")
        if not self.path.parent.is_dir():
            raise InputError(self.path, f"folder {self.path.parent} does not exist")
        self.fingerprint = bank_fingerprint(bank)
        self.epochs_ended = 0
        self.last_train_cindex: float | None = None
        self.reset_reason: str | None = None  # why an existing file was ignored, if it was
        self._slides: dict[str, _SlideScores] = {}
        self._stored: set[str] = set()  # slides present in the file at self.path
        self._lock = threading.RLock()
        if self.path.exists() and not scratch:
            self._read_header()

    def _read_header(self) -> None:
        try:
            f = h5py.File(self.path, "r")
        except OSError:
            raise InputError(self.path, "exists but is not a DPS score cache (not readable HDF5); "
                                        "delete it to start afresh") from None
        with f:
            if f.attrs.get("kind") != self.KIND:
                raise InputError(self.path, "exists but is not a DPS score cache; choose another path")
            version = int(f.attrs.get("version", 0))
            if version != self.VERSION:
                self.reset_reason = f"cache version {version}, this cancermoe writes {self.VERSION}"
            elif f.attrs.get("bank_fingerprint") != self.fingerprint:
                self.reset_reason = f"cache belongs to another bank ({f.attrs.get('bank_name')!r} as it was then)"
            else:
                self._stored = set(f["slides"].keys())
                self.epochs_ended = int(f.attrs["epochs_ended"])
                cindex = float(f.attrs["last_train_cindex"])
                self.last_train_cindex = None if math.isnan(cindex) else cindex
        if self.reset_reason:
            log.warning("%s: ignoring the score cache (%s); it will be replaced", self.path, self.reset_reason)

    def _slide(self, slide_id: str) -> _SlideScores:
        """The slide's state, loaded from the file or started empty on first use."""
        state = self._slides.get(slide_id)
        if state is not None:
            return state
        n = self.bank.n_patches(slide_id)
        if slide_id in self._stored:
            with h5py.File(self.path, "r") as f:
                group = f["slides"][slide_id]
                state = _SlideScores(group["scores"][()].astype(np.float32), group["seen"][()].astype(bool))
        else:
            state = _SlideScores(np.full(n, np.nan, dtype=np.float32), np.zeros(n, dtype=bool))
        self._slides[slide_id] = state
        return state

    # ---- reading

    def scores(self, slide_id: str) -> np.ndarray:
        """Current scores of a slide, float32 [n_patches], NaN where never scored (a copy)."""
        with self._lock:
            return self._slide(slide_id).scores.copy()

    def seen(self, slide_id: str) -> np.ndarray:
        """Which patches were selected for training in the current sweep, bool [n_patches] (a copy)."""
        with self._lock:
            return self._slide(slide_id).seen.copy()

    def is_scored(self, slide_id: str) -> bool:
        """Whether any patch of the slide has a current (adopted) score."""
        with self._lock:
            return bool(np.isfinite(self._slide(slide_id).scores).any())

    def has_pending(self) -> bool:
        with self._lock:
            return any(state.pending for state in self._slides.values())

    # ---- writing

    def stage(self, slide_id: str, rows: np.ndarray | Sequence[int], values: np.ndarray | Sequence[float]) -> None:
        """Stage scores for ``rows`` of a slide; a later stage of the same row wins at `end_epoch`."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if rows.shape != values.shape:
            raise ValueError(f"{slide_id}: {rows.size} rows but {values.size} values")
        with self._lock:
            state = self._slide(slide_id)
            _check_rows(slide_id, rows, state.scores.size)
            state.pending.append((rows.copy(), values.copy()))

    def mark_seen(self, slide_id: str, rows: np.ndarray | Sequence[int]) -> None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        with self._lock:
            state = self._slide(slide_id)
            _check_rows(slide_id, rows, state.seen.size)
            state.seen[rows] = True

    def reset_seen(self, slide_id: str) -> None:
        """Start a new sweep of the slide: no patch counts as seen."""
        with self._lock:
            self._slide(slide_id).seen[:] = False

    def end_epoch(self, adopt: bool, *, train_cindex: float | None = None) -> None:
        """Close an epoch: adopt the staged scores into the current ones, or drop them.

        ``train_cindex`` (the epoch's training c-index) is remembered as
        `last_train_cindex` for the next epoch's policy decision.
        """
        with self._lock:
            for state in self._slides.values():
                if adopt:
                    for rows, values in state.pending:  # in stage order, so later stages overwrite earlier
                        state.scores[rows] = values
                state.pending.clear()
            self.epochs_ended += 1
            self.last_train_cindex = None if train_cindex is None else float(train_cindex)

    def save(self) -> Path:
        """Write the cache atomically (cancermoe.files); pending scores are not written."""
        if self.scratch:
            raise RuntimeError(f"{self.path}: a scratch score cache is never saved")
        with self._lock:
            with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as out:
                out.attrs.update(
                    kind=self.KIND, version=self.VERSION, bank_name=Path(self.bank.path).name,
                    bank_fingerprint=self.fingerprint, epochs_ended=self.epochs_ended,
                    last_train_cindex=np.nan if self.last_train_cindex is None else self.last_train_cindex,
                )
                slides = out.create_group("slides")
                for slide_id, state in self._slides.items():
                    group = slides.create_group(slide_id)
                    group.create_dataset("scores", data=state.scores)
                    group.create_dataset("seen", data=state.seen)
                untouched = sorted(self._stored - self._slides.keys())
                if untouched:
                    # Slides this process never loaded are copied file to file, never through memory.
                    with h5py.File(self.path, "r") as old:
                        for slide_id in untouched:
                            old.copy(old["slides"][slide_id], slides, name=slide_id)
            self._stored = self._stored | self._slides.keys()
            self.reset_reason = None
            return self.path


def _check_rows(slide_id: str, rows: np.ndarray, n: int) -> None:
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"{slide_id}: rows outside [0, {n})")


# --------------------------------------------------------------------------- score update policy


class ScoreUpdatePolicy:
    """When the scores staged during an epoch replace the current ones (paper table 8).

    * ``cindex`` ("c-index depends", the paper's default): adopt only when the
      training c-index dropped below the previous epoch's. Selection stays
      stable while training improves and is refreshed when it gets worse. The
      first epoch adopts (there are no scores yet to keep stable). A NaN
      c-index (a site with no comparable pairs) says nothing about progress,
      so a NaN now or before adopts, as per-epoch updates would: otherwise
      such a site would never learn where to look.
    * ``epoch``: adopt every epoch.
    * ``every-n``: adopt at epochs 0, n, 2n, ... (``every`` = n).

    ``epoch`` is 0-based and counts all epochs trained at the site, across
    rounds (`ScoreCache.epochs_ended` keeps it).
    """

    def __init__(self, kind: str, every: int = 2) -> None:
        if kind not in SCORE_UPDATE_POLICIES:
            raise ValueError(f"score update policy {kind!r} not one of {SCORE_UPDATE_POLICIES}")
        if every < 1:
            raise ValueError(f"score update interval {every} must be at least 1")
        self.kind = kind
        self.every = every

    @classmethod
    def from_config(cls, config: CancerMoEConfig) -> ScoreUpdatePolicy:
        return cls(config.score_update, config.score_update_every)

    def should_adopt(self, epoch: int, train_cindex: float, previous_train_cindex: float | None) -> bool:
        if self.kind == "epoch":
            return True
        if self.kind == "every-n":
            return epoch % self.every == 0
        if previous_train_cindex is None or math.isnan(previous_train_cindex) or math.isnan(train_cindex):
            return True
        return train_cindex < previous_train_cindex


# --------------------------------------------------------------------------- selection pieces


def split_tokens_over_slides(patch_counts: Sequence[int], tokens: int) -> np.ndarray:
    """How many of a patient's ``tokens`` each slide gets: in proportion to its patch count, at least 1 each.

    When all slides together have no more patches than ``tokens``, each gets
    all of its patches (the bag is then padded). Otherwise the budgets sum to
    ``tokens`` exactly (largest-remainder rounding) and never exceed a slide's
    patch count. With fewer tokens than slides, the largest slides get one each.
    """
    counts = np.asarray(patch_counts, dtype=np.int64)
    if counts.sum() <= tokens:
        return counts.copy()
    if tokens < counts.size:
        budgets = np.zeros_like(counts)
        budgets[np.argsort(-counts, kind="stable")[:tokens]] = 1
        return budgets
    quota = tokens * counts / counts.sum()
    budgets = np.floor(quota).astype(np.int64)
    short = tokens - int(budgets.sum())
    budgets[np.argsort(-(quota - budgets), kind="stable")[:short]] += 1
    for slide in np.flatnonzero(budgets == 0):  # a tiny slide still gets one token, taken from the largest budget
        budgets[np.argmax(budgets)] -= 1
        budgets[slide] = 1
    return budgets


def dps_token_counts(budget: int, key_tokens: int, unseen_ratio: float) -> tuple[list[int], int]:
    """Split a slide's budget: (neighbourhood size of each key, keys included; number of unseen tokens).

    ``round(budget * p)`` tokens are unseen; the rest is split as evenly as
    possible over ``min(b, rest)`` keys, earlier (higher-scored) keys taking
    the extra ones. With b = 0 the whole budget is unseen tokens.
    """
    n_unseen = int(math.floor(budget * unseen_ratio + 0.5))
    n_near = budget - n_unseen
    n_keys = min(key_tokens, n_near)
    if n_keys == 0:
        return [], budget
    base, extra = divmod(n_near, n_keys)
    return [base + (1 if i < extra else 0) for i in range(n_keys)], n_unseen


def neutral_scores(scores: np.ndarray) -> np.ndarray:
    """Scores with unscored patches (NaN) set to the mean of the scored ones (0 when none is scored).

    Neutral, so an unscored patch ranks above below-average scored patches and
    below the best ones: known good regions win the key places, known poor
    ones lose them to the unknown.
    """
    scored = np.isfinite(scores)
    neutral = float(scores[scored].mean()) if scored.any() else 0.0
    return np.where(scored, scores, np.float32(neutral)).astype(np.float32)


def top_scored_rows(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The ``k`` rows with the highest scores, best first; ties broken at random by ``rng``.

    O(n) (a partition, not a sort), so fine for slides of a million patches.
    With all scores equal the result is a uniform random draw.
    """
    n = scores.size
    k = min(k, n)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    kth_best = np.partition(scores, n - k)[n - k]
    above = np.flatnonzero(scores > kth_best)
    tied = np.flatnonzero(scores == kth_best)
    rows = np.concatenate((above, rng.choice(tied, k - above.size, replace=False)))
    return rows[np.argsort(-scores[rows], kind="stable")].astype(np.int64)


def neighbourhoods(tree: cKDTree, keys: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """For each key, itself followed by its nearest patches, ``sizes[i]`` rows in all, no row twice.

    Keys are served in order; a patch already taken (a key, or in an earlier
    key's neighbourhood) is skipped and the next nearest taken instead.
    ``tree`` is built on the slide's coords, so "nearest" is Euclidean distance
    on the slide.
    """
    n = tree.n
    taken = np.zeros(n, dtype=bool)
    taken[keys] = True
    n_taken = len(keys)
    groups = []
    for key, size in zip(keys, sizes, strict=True):
        # Asking for size + n_taken nearest leaves at least size - 1 not yet taken.
        k = min(n, size + n_taken)
        _, nearest = tree.query(tree.data[key], k=k)
        nearest = np.atleast_1d(nearest)
        fresh = nearest[~taken[nearest]][: size - 1]
        taken[fresh] = True
        n_taken += fresh.size
        groups.append(np.concatenate(([key], fresh)).astype(np.int64))
    return groups


def _slide_rng(seed: int, slide_id: str, *stream: int) -> np.random.Generator:
    """A generator fixed by (seed, slide id, stream): the same in every process and epoch."""
    return np.random.default_rng([seed % (1 << 64), zlib.crc32(slide_id.encode()), *stream])


_FIXED_DRAW, _EVAL_DRAW, _TEST_TIME_DRAW = 1, 2, 3


# --------------------------------------------------------------------------- selector


@dataclass
class Selection:
    """One patient's bag of at most N WSI tokens, and where each token came from.

    ``parts`` lists (slide_id, rows) in bag order: tokens of part i are
    contiguous and ``token_slide`` == i there. The bag holds only real tokens
    (a patient without slides has an empty bag, a small slide gives fewer than
    N): padding to a batch's longest bag happens in `cancermoe.train.collate`,
    so a genomics-only patient costs no WSI tokens.
    """

    case_id: str
    parts: list[tuple[str, np.ndarray]]
    features: np.ndarray  # float32 [n, D], n <= N real tokens
    token_slide: np.ndarray  # int32 [n], index into parts
    token_row: np.ndarray  # int64 [n], row of the slide in the bank
    token_role: np.ndarray  # int8 [n], a `Role`

    @property
    def n_tokens(self) -> int:
        return int(self.token_row.size)

    def role_count(self, role: Role) -> int:
        return int((self.token_role == role).sum())


class PatchSelector:
    """Chooses each patient's N WSI tokens and reads their features from the bank.

    Modes (`cancermoe.config.DPS_MODES`):

    * ``dps``: per slide, keys + neighbourhoods from the cache's current scores
      and uniformly drawn unseen patches (see the module docstring). When
      fewer unseen patches remain than the draw needs, the remaining ones are
      all taken and the slide's seen mask is reset (a new sweep) for the rest.
      Evaluation (``train=False``) is deterministic for a given cache state:
      key ties and the random part come from a generator fixed by (seed,
      slide id), drawn from all patches not already chosen (the seen mask is
      a training notion and is neither used nor changed).
    * ``random``: a fresh uniform draw each call, from ``rng``, train and eval.
    * ``fixed-random``: one uniform draw per slide fixed by (seed, slide id),
      the same in every epoch and at evaluation.

    Test-time DPS (`explore`): a selector over a scratch cache can be put
    into a numbered exploration pass, in which evaluation selection works as
    in training (keys from the scratch scores, unseen patches drawn from those
    the passes have not selected yet, marked seen) with a generator fixed by
    (seed, slide id, pass), so a patient's passes do not depend on the other
    patients predicted with it. ``explore(None)`` returns to plain evaluation.

    In every mode, the rows of a training selection are marked seen in the
    cache. A patient's slides are pooled into one bag; N is split over them by
    `split_tokens_over_slides`. Coord trees are cached per slide (LRU of
    ``tree_cache_size`` slides), so a large slide costs one tree build while
    it stays in use.
    """

    def __init__(self, bank: Bank, cache: ScoreCache, *, tokens: int, key_tokens: int, unseen_ratio: float,
                 mode: str = "dps", seed: int = 0, tree_cache_size: int = 8) -> None:
        if mode not in DPS_MODES:
            raise ValueError(f"patch selection mode {mode!r} not one of {DPS_MODES}")
        if tokens < 1 or key_tokens < 0 or not 0.0 <= unseen_ratio <= 1.0:
            raise ValueError(f"need tokens >= 1, key_tokens >= 0, 0 <= unseen_ratio <= 1; got {tokens}, "
                             f"{key_tokens}, {unseen_ratio}")
        self.bank = bank
        self.cache = cache
        self.tokens = tokens
        self.key_tokens = key_tokens
        self.unseen_ratio = unseen_ratio
        self.mode = mode
        self.seed = seed
        self.tree_cache_size = tree_cache_size
        self._trees: OrderedDict[str, cKDTree] = OrderedDict()
        self._patch_counts: dict[str, int] = {}
        self.test_time_pass: int | None = None

    def explore(self, pass_index: int | None) -> None:
        """Make evaluation selections exploration pass ``pass_index`` of test-time DPS (None: plain evaluation).

        Only over a scratch cache: exploration marks patches seen, which must
        never touch a training cache.
        """
        if pass_index is not None and not self.cache.scratch:
            raise ValueError(f"{self.cache.path}: test-time DPS explores only over a scratch score cache")
        self.test_time_pass = pass_index

    @classmethod
    def from_config(cls, bank: Bank, cache: ScoreCache, config: CancerMoEConfig) -> PatchSelector:
        return cls(bank, cache, tokens=config.tokens, key_tokens=config.key_tokens,
                   unseen_ratio=config.unseen_ratio, mode=config.dps_mode, seed=config.seed)

    # ---- the public steps

    def select(self, patient: Patient, *, train: bool, rng: np.random.Generator) -> Selection:
        """Choose the patient's tokens, mark them seen when training, and read their features."""
        counts = [self._n_patches(slide_id) for slide_id in patient.slide_ids]
        budgets = split_tokens_over_slides(counts, self.tokens)
        parts, roles = [], []
        for slide_id, n, budget in zip(patient.slide_ids, counts, budgets, strict=True):
            if budget == 0:
                continue
            rows, role = self.slide_rows(slide_id, n, int(budget), train=train, rng=rng)
            if train or self._exploring:
                self.cache.mark_seen(slide_id, rows)
            parts.append((slide_id, rows))
            roles.append(role)
        return self._read(patient.case_id, parts, roles)

    def stage_scores(self, selection: Selection, cls_attention: np.ndarray) -> None:
        """Stage the CLS attention of each real token of ``selection`` as that patch's new score.

        ``cls_attention`` is float [n], in the selection's token order, from
        the forward pass that saw these tokens (a batch's padding slots cut
        off). Non-finite values are ignored.
        """
        values = np.asarray(cls_attention, dtype=np.float32).reshape(-1)
        if values.size != selection.n_tokens:
            raise ValueError(f"{values.size} attention values for a selection of {selection.n_tokens} tokens")
        for i, (slide_id, _) in enumerate(selection.parts):
            at = (selection.token_slide == i) & np.isfinite(values)
            self.cache.stage(slide_id, selection.token_row[at], values[at])

    # ---- one slide

    def slide_rows(self, slide_id: str, n: int, budget: int, *, train: bool,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Rows chosen from one slide of ``n`` patches and the `Role` of each (int8), ``budget`` rows at most."""
        if n <= budget:
            return np.arange(n, dtype=np.int64), np.full(n, Role.WHOLE, dtype=np.int8)
        if self.mode == "random":
            rows = rng.choice(n, budget, replace=False)
        elif self.mode == "fixed-random":
            rows = _slide_rng(self.seed, slide_id, _FIXED_DRAW).choice(n, budget, replace=False)
        elif train:
            return self._dps_rows(slide_id, n, budget, train=True, rng=rng)
        elif self._exploring:
            # A test-time pass sweeps the slide as training does, over the scratch cache's seen mask.
            return self._dps_rows(slide_id, n, budget, train=True,
                                  rng=_slide_rng(self.seed, slide_id, _TEST_TIME_DRAW, self.test_time_pass or 0))
        else:
            return self._dps_rows(slide_id, n, budget, train=False, rng=_slide_rng(self.seed, slide_id, _EVAL_DRAW))
        return rows.astype(np.int64), np.full(budget, Role.RANDOM, dtype=np.int8)

    @property
    def _exploring(self) -> bool:
        return self.test_time_pass is not None and self.mode == "dps"

    def _dps_rows(self, slide_id: str, n: int, budget: int, *, train: bool,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        sizes, n_unseen = dps_token_counts(budget, self.key_tokens, self.unseen_ratio)
        keys = top_scored_rows(neutral_scores(self.cache.scores(slide_id)), len(sizes), rng)
        groups = neighbourhoods(self._tree(slide_id), keys, sizes) if sizes else []
        near = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
        unseen = self._draw_unseen(slide_id, n, near, n_unseen, train=train, rng=rng)
        roles = [np.concatenate(([Role.KEY], np.full(len(g) - 1, Role.NEIGHBOUR))) for g in groups]
        roles.append(np.full(unseen.size, Role.UNSEEN))
        return np.concatenate((near, unseen)).astype(np.int64), np.concatenate(roles).astype(np.int8)

    def _draw_unseen(self, slide_id: str, n: int, chosen: np.ndarray, k: int, *, train: bool,
                     rng: np.random.Generator) -> np.ndarray:
        """``k`` rows drawn uniformly from patches not in ``chosen`` (and, when training, not seen)."""
        free = np.ones(n, dtype=bool)
        free[chosen] = False
        if not train:
            return rng.choice(np.flatnonzero(free), k, replace=False).astype(np.int64)
        fresh = np.flatnonzero(free & ~self.cache.seen(slide_id))
        if fresh.size >= k:
            return rng.choice(fresh, k, replace=False).astype(np.int64)
        # The sweep is nearly done: take what is left of it, start a new one, draw the rest from that.
        self.cache.reset_seen(slide_id)
        free[fresh] = False
        rest = rng.choice(np.flatnonzero(free), k - fresh.size, replace=False)
        return np.concatenate((fresh, rest)).astype(np.int64)

    # ---- bank access

    def _n_patches(self, slide_id: str) -> int:
        if slide_id not in self._patch_counts:
            self._patch_counts[slide_id] = self.bank.n_patches(slide_id)
        return self._patch_counts[slide_id]

    def _tree(self, slide_id: str) -> cKDTree:
        """KD-tree on the slide's coords, from a small LRU cache (coords are 8 bytes a patch)."""
        tree = self._trees.pop(slide_id, None)
        if tree is None:
            tree = cKDTree(self.bank.read_coords(slide_id).astype(np.float64))
        self._trees[slide_id] = tree
        while len(self._trees) > self.tree_cache_size:
            self._trees.popitem(last=False)
        return tree

    def _read(self, case_id: str, parts: list[tuple[str, np.ndarray]], roles: list[np.ndarray]) -> Selection:
        """Assemble the bag: features of exactly the chosen rows, in part order (no padding)."""
        n_tokens = sum(len(rows) for _, rows in parts)  # budgets never sum to more than N
        selection = Selection(
            case_id=case_id,
            parts=parts,
            features=np.zeros((n_tokens, self.bank.feature_dim), dtype=np.float32),
            token_slide=np.empty(n_tokens, dtype=np.int32),
            token_row=np.empty(n_tokens, dtype=np.int64),
            token_role=np.empty(n_tokens, dtype=np.int8),
        )
        at = 0
        for i, ((slide_id, rows), role) in enumerate(zip(parts, roles, strict=True)):
            end = at + len(rows)
            selection.features[at:end] = self.bank.read_features(slide_id, rows)
            selection.token_slide[at:end] = i
            selection.token_row[at:end] = rows
            selection.token_role[at:end] = role
            at = end
        return selection


# --------------------------------------------------------------------------- background prefetch


_ITEM, _ERROR, _DONE = "item", "error", "done"
_PUT_POLL_S = 0.05  # how often a blocked producer checks whether the consumer has gone


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order, producing them in a background thread up to ``depth`` ahead.

    Put the slow producer (selection and HDF5 reads) in ``items`` so reading
    overlaps the consumer's compute. An exception raised by the producer is
    re-raised in the consumer, after the items produced before it. When the
    consumer stops early (``break``, an exception, ``close()``), the thread is
    told to stop, the producer is closed in its own thread, and the thread is
    joined before this generator finishes.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth {depth} must be at least 1")
    iterator = iter(items)
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(message, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((_ITEM, item)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # the consumer must hear of any failure, or it would wait forever
            put((_ERROR, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="cancermoe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, payload = slots.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise payload  # type: ignore[misc]
            yield payload  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
