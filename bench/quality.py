"""Quality: how good are CancerMoE's predictions, against a known oracle, its ablations, and real TCGA cohorts?

Four sections, each one printed table (markdown, ready for the README), each
measured side by side in one run with the same settings for every row:

1. ``world``: synthetic worlds (`cancermoe.synthetic`) of three sites A, B, C
   sharing one biology. Train on A + B, evaluate on the unseen site C; beside
   our c-index, the oracle's (the true log-hazard each patient was drawn with:
   the best any model can do on those patients), for each world seed.
1b. ``default-world``: what a new user tries first, the issue-9 check: two sites of
   `cmoe-bank synth`'s default world (D = 1024, ~3000 patches a slide, 1% signal,
   200 patients), `cmoe-train A --eval B --epochs 10 --tokens 512` at the default
   config, one row per training seed, beside the oracle and the target
   0.5 + 0.6 x (oracle - 0.5).
2. ``ablation``: the paper's table 4 on one such world, as one table:
   CancerMoE, w/o DPS (one fixed random draw of tokens), w/o ACS, w/o SMoE,
   w/o genomic profiles, Random Select (new random tokens every step, train
   and inference); per-cancer c-index on site C and their mean, each the mean
   over the training seeds.
3. ``dps-vs-random``: the case DPS exists for. The prognostic region is 1% of
   each slide and N covers ~3% of it (2000 patches, N = 64), so a uniform
   draw holds ~0.6 region patches per slide. Beside each method's c-index we
   count how many selected tokens fall inside the planted region (found from
   the world's layout, `SlideLayout.region`): in training (first and last
   epoch; for DPS also the key tokens), and at inference on the training
   patients' slides (scored during training) and on site C (never scored),
   and how the DPS score of region tokens compares with that of the others.
   Rows: DPS with the paper's score (``last-cls``) and with ``first-cls``,
   each also re-predicted on site C with ``--dps-test-time-passes`` (8)
   test-time passes (same trained models, loaded into a fresh trainer, with
   predict seconds), and Random Select; notes give each DPS row minus Random
   Select paired by seed. The region's share of the slides is what a uniform
   draw gets.
   q = ``--sparsify-keep`` 0.25, not the paper's 0.08: at inference the model
   keeps qN WSI tokens, and 0.08 x 64 = 5 would leave one token per key
   neighbourhood at best; 16 leave room for the region's patches to survive.
4. ``tcga``: the real TCGA-BLCA and TCGA-KIRC tables (genomics only: no slide
   features ship with them), their published 5-fold splits. CancerMoE (the
   WSI part is empty; ``tokens`` = 1, one padding token) beside an elastic-net
   Cox model (scikit-survival's CoxnetSurvivalAnalysis, l1_ratio 0.5) on the
   same folds. The Cox model sees only the training fold: features
   standardized with the training fold's means and SDs, a path of
   ``--cox-alphas`` penalties from the largest useful one down to
   ``--cox-alpha-min-ratio`` of it, the penalty chosen by an inner stratified
   5-fold CV on the training fold (pooled Harrell pairs), then the path fitted
   on the whole training fold predicts the validation fold at that penalty.
   With ``--set ensemble_size=K`` each fold trains a seed ensemble
   (`cancermoe.ensemble`) and the table gives both the ensemble and its
   members (one model: the mean of the members' c-indices), each paired by
   fold with Cox.

Everything trains on the CPU with `cancermoe.experiment.fit` (default config
but for the sizes below), seeds fixed; c-indices are Harrell's, pairs formed
within a cancer. Synthetic banks are generated once per workdir and reused.

    python bench/quality.py all [--workdir DIR] [--threads 1] [--epochs 20]   # every section but default-world
    python bench/quality.py world [--world-seeds 0 1] [--patients 300]
    python bench/quality.py default-world --train-seeds 0 1 2
    python bench/quality.py ablation [--train-seeds 0 1]
    python bench/quality.py dps-vs-random [--dps-patches 2000] [--dps-tokens 64]
    python bench/quality.py tcga [--tcga-dir DIR] [--max-folds 5] [--set ensemble_size=5]

``--set key=value`` (repeatable) changes the CancerMoE config of every row of
every section alike. ``--threads`` defaults to 1: the models here are tiny
(d = 32), a second torch thread buys nothing, the second core runs the patch
reading thread, and on a busy machine two spinning OpenMP threads made an epoch
up to 40x slower (measured: 94 s vs 2.2 s).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from banks import cached_bank
from report import Table, cindex_with_interval, exit_on_input_error
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from cancermoe.bank import open_bank
from cancermoe.cohort import Cohort, open_cohort
from cancermoe.config import CancerMoEConfig, load_config
from cancermoe.dps import PatchSelector, Role, Selection
from cancermoe.errors import InputError
from cancermoe.experiment import FINAL_MODEL, FitResult, ablated, fit, published_folds, trainer_for_model
from cancermoe.importers import import_tcga
from cancermoe.survival import PairCounts, concordance_counts
from cancermoe.synthetic import SynthSpec, draw_cohort, draw_slide_layout
from cancermoe.train import EpochReport, Evaluation, evaluate_risks, load_checkpoint, seed_everything
from cancermoe.tuning import describe_changes

SECTIONS = ("world", "default-world", "ablation", "dps-vs-random", "tcga")
# `all` leaves out default-world: its two banks are 1.4 GB each at the defaults (run it by name).
ALL_SECTIONS = ("world", "ablation", "dps-vs-random", "tcga")
CANCERS = ("BRCA", "LUAD")
SITES = ("A", "B", "C")  # train on A + B, evaluate on C
# (row label, ablation key of cancermoe.experiment.ABLATIONS), in the paper's table 4 order.
ABLATION_ROWS = (("CancerMoE", None), ("w/o DPS", "dps"), ("w/o ACS", "acs"), ("w/o SMoE", "smoe"),
                 ("w/o genomic profiles", "genomics"), ("Random Select", "random-select"))
TCGA_STUDIES = ("blca", "kirc")
# From the data README (elastic-net Cox, genomics only, these folds) and the paper (SNN, genomics only).
TCGA_REFERENCE = {"blca": (0.59, 0.632), "kirc": (0.66, 0.665)}
# In the repository, as in tests/conftest.py; CMOE_TCGA_DIR overrides (and --tcga-dir overrides both).
DEFAULT_TCGA_DIR = Path(os.environ.get("CMOE_TCGA_DIR", Path(__file__).resolve().parents[1] / "data" / "tcga"))


# --------------------------------------------------------------------------- tables





def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def fmt_sd(values: Sequence[float]) -> str:
    """mean +- sample SD (the SD only when there are several values)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return fmt(finite[0])
    return f"{np.mean(finite):.3f} ± {np.std(finite, ddof=1):.3f}"


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def fmt_percent(share: float) -> str:
    return "n/a" if math.isnan(share) else f"{100 * share:.1f}%"


# --------------------------------------------------------------------------- synthetic worlds


def site_specs(world_seed: int, patients: int, patches: int, feature_dim: int,
               signal_fraction: float) -> dict[str, SynthSpec]:
    """Sites A, B, C of one world: same biology (world seed), own patients (seeds 3w+1 .. 3w+3)."""
    return {site: SynthSpec(site=site, patients=patients, cancers=CANCERS, patches=patches,
                            seed=3 * world_seed + 1 + k, world_seed=world_seed, feature_dim=feature_dim,
                            genomic_features=8, signal_fraction=signal_fraction)
            for k, site in enumerate(SITES)}


@dataclass
class World:
    specs: dict[str, SynthSpec]
    paths: dict[str, Path]
    train: Cohort  # sites A + B
    unseen: Cohort  # site C

    @classmethod
    def build(cls, workdir: Path, specs: dict[str, SynthSpec]) -> World:
        paths = {site: cached_bank(workdir, spec) for site, spec in specs.items()}
        return cls(specs, paths, open_cohort([paths["A"], paths["B"]]), open_cohort([paths["C"]]))


def oracle_evaluation(cohort: Cohort) -> Evaluation:
    """The c-index of the true log-hazards (higher = earlier death), as our risks are scored."""
    risk = np.array([ref.bank.oracle_risk[ref.patient.index] for ref in cohort.refs])
    return evaluate_risks(cohort, risk)


def synthetic_config(args: argparse.Namespace, seed: int, *, tokens: int, ablation: str | None = None
                     ) -> CancerMoEConfig:
    """The paper's config at synthetic sizes (batch 8, q from --sparsify-keep), then --set, then the ablation."""
    base = CancerMoEConfig(feature_dim=args.feature_dim, tokens=tokens, batch_size=8,
                           sparsify_keep=args.sparsify_keep, epochs=args.epochs, seed=seed)
    return ablated(load_config(overrides=args.set, base=base), ablation)


def train(config: CancerMoEConfig, cohort: Cohort, evaluate_on: Cohort | None, out_dir: Path,
          on_epoch: Callable[[EpochReport], None] | None = None) -> FitResult:
    """One fresh `fit` on the CPU (a leftover run folder would resume its DPS caches: removed first)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    seed_everything(config.seed)
    return fit(config, cohort, evaluate_on, out_dir, device=torch.device("cpu"), on_epoch=on_epoch)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. world


def section_world(args: argparse.Namespace) -> Table:
    table = Table("CancerMoE vs the oracle on an unseen site (train on sites A + B, evaluate on C)",
                  ["world seed", "train / eval patients", "oracle c-index", "CancerMoE c-index [95% interval]",
                   "share of oracle's gain over 0.5", "CancerMoE train c-index", "fit seconds"])
    oracles, ours = [], []
    for world_seed in args.world_seeds:
        world = World.build(args.workdir, site_specs(world_seed, args.patients, args.patches, args.feature_dim,
                                                     args.signal_fraction))
        config = synthetic_config(args, args.train_seeds[0], tokens=args.tokens)
        log(f"world {world_seed}: training on {len(world.train)} patients")
        result = train(config, world.train, world.unseen, args.workdir / "runs" / f"world-{world_seed}")
        oracle = oracle_evaluation(world.unseen).cindex
        cindex = result.evaluation.cindex if result.evaluation else math.nan
        oracles.append(oracle)
        ours.append(cindex)
        counts = result.evaluation.counts if result.evaluation else PairCounts()
        table.rows.append([str(world_seed), f"{len(world.train)} / {len(world.unseen)}", fmt(oracle),
                           cindex_with_interval(counts),
                           fmt((cindex - 0.5) / (oracle - 0.5), 2), fmt(result.train_evaluation.cindex),
                           f"{result.seconds:.0f}"])
    table.rows.append(["mean", "", fmt(mean(oracles)), fmt(mean(ours)),
                       fmt((mean(ours) - 0.5) / (mean(oracles) - 0.5), 2), "", ""])
    table.notes.append(f"{args.patients} patients a site, cancers {'/'.join(CANCERS)}, ~{args.patches} patches a "
                       f"slide (D = {args.feature_dim}), prognostic region {args.signal_fraction:.0%} of a slide; "
                       f"N = {args.tokens}, q = {args.sparsify_keep}, batch 8, {args.epochs} epochs, "
                       f"training seed {args.train_seeds[0]}.")
    return table


# --------------------------------------------------------------------------- 1b. the default world


def section_default_world(args: argparse.Namespace) -> Table:
    """What a new user tries first: `cmoe-bank synth` defaults (D = 1024, 1% signal), one site to train, one unseen."""
    specs = {site: SynthSpec(site=site, seed=seed, patients=args.default_world_patients,
                             patches=args.default_world_patches, feature_dim=args.default_world_feature_dim)
             for site, seed in (("A", 1), ("B", 2))}
    paths = {site: cached_bank(args.workdir, spec) for site, spec in specs.items()}
    train_cohort, unseen = open_cohort([paths["A"]]), open_cohort([paths["B"]])
    oracle = oracle_evaluation(unseen).cindex
    target = 0.5 + 0.6 * (oracle - 0.5)
    table = Table("The default synthetic world: train on site A, evaluate on the unseen site B "
                  f"(`cmoe-train A.h5 --eval B.h5 --epochs {args.default_world_epochs} --tokens "
                  f"{args.default_world_tokens}`, default config otherwise)",
                  ["training seed", "CancerMoE c-index [95% interval]", "train c-index", "oracle c-index",
                   "target (0.5 + 0.6 x (oracle - 0.5))", "fit seconds"])
    values = []
    for seed in args.train_seeds:
        config = load_config(overrides=[*args.set, f"feature_dim={args.default_world_feature_dim}",
                                        f"epochs={args.default_world_epochs}",
                                        f"tokens={args.default_world_tokens}", f"seed={seed}"])
        log(f"default world, seed {seed}: training on {len(train_cohort)} patients")
        result = train(config, train_cohort, unseen, args.workdir / "runs" / f"default-world-{seed}")
        cindex = result.evaluation.cindex if result.evaluation else math.nan
        values.append(cindex)
        table.rows.append([str(seed), cindex_with_interval(result.evaluation.counts if result.evaluation
                                                           else PairCounts()),
                           fmt(result.train_evaluation.cindex), fmt(oracle), fmt(target), f"{result.seconds:.0f}"])
    table.rows.append(["mean +- sd", fmt_sd(values), "", fmt(oracle), fmt(target), ""])
    masks = {site: region_masks(paths[site], specs[site]) for site in paths}
    for label, evaluation, seconds in linear_references(train_cohort, unseen, masks["A"], masks["B"], args):
        table.rows.append([label, cindex_with_interval(evaluation.counts), "", fmt(oracle), fmt(target),
                           f"{seconds:.0f}"])
    table.notes.append("Linear references on the same patients: elastic-net Cox per cancer (penalty by inner CV "
                       "on A), fitted on A, scored on B. 'Told the region': each patient's mean patch feature over "
                       "the planted region (which no model is told) beside its genomic profile; how much of the "
                       "image signal a linear model can learn from these 200 patients once the region is found.")
    table.notes.append(f"{len(train_cohort)} / {len(unseen)} patients (sites A, B: `cmoe-bank synth` defaults, "
                       f"~{args.default_world_patches} patches a slide); training seeds "
                       f"{', '.join(map(str, args.train_seeds))}; met: {mean(values) >= target}.")
    return table


def patient_features(cohort: Cohort, masks: dict[str, np.ndarray] | None) -> np.ndarray:
    """Per patient: its genomic profile, after it (with ``masks``) the mean feature vector of its slides' patches
    in the planted region; NaN where the patient lacks the modality."""
    columns = [genomics_matrix(cohort)]
    if masks is not None:
        region = np.full((len(cohort), cohort.refs[0].bank.feature_dim), np.nan)
        for i, ref in enumerate(cohort.refs):
            parts = [ref.bank.read_features(slide_id, np.flatnonzero(masks[slide_id])).astype(np.float64)
                     for slide_id in ref.patient.slide_ids]
            if parts:
                region[i] = np.concatenate(parts).mean(axis=0)
        columns.append(region)
    return np.hstack(columns)


def genomics_matrix(cohort: Cohort) -> np.ndarray:
    """Genomic profiles (float64), a row of NaN for a patient without one (synthetic cohorts have a few)."""
    rows = [ref.bank.genomics(ref.patient) for ref in cohort.refs]
    rows = [np.zeros(0) if row is None else np.asarray(row, dtype=np.float64) for row in rows]
    width = max(len(row) for row in rows)
    return np.stack([row if len(row) else np.full(width, np.nan) for row in rows])


def filled(matrix: np.ndarray, column_values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(matrix), column_values, matrix)


def linear_references(train: Cohort, unseen: Cohort, train_masks: dict[str, np.ndarray],
                      unseen_masks: dict[str, np.ndarray], args: argparse.Namespace
                      ) -> list[tuple[str, Evaluation, float]]:
    """(label, evaluation on ``unseen``, seconds) of elastic-net Cox per cancer fitted on ``train``: on the genomic
    profiles, then on them and the planted region's mean patch features (`patient_features`). A missing value
    takes the training patients' mean of its column."""
    references = []
    for label, masks in (("elastic-net Cox, genomics", (None, None)),
                         ("elastic-net Cox, told the region: its mean patch features + genomics",
                          (train_masks, unseen_masks))):
        start = time.perf_counter()
        x, x_unseen = patient_features(train, masks[0]), patient_features(unseen, masks[1])
        risk = np.zeros(len(unseen))
        for cancer in train.cancer_codes():
            rows, rows_unseen = np.flatnonzero(train.cancers == cancer), np.flatnonzero(unseen.cancers == cancer)
            means = np.nanmean(x[rows], axis=0)
            risk[rows_unseen] = coxnet_risk_of(filled(x[rows], means), train.subset(rows),
                                               filled(x_unseen[rows_unseen], means), args)[0]
        references.append((label, evaluate_risks(unseen, risk), time.perf_counter() - start))
    return references


# --------------------------------------------------------------------------- 2. ablation


def section_ablation(args: argparse.Namespace) -> Table:
    world_seed = args.world_seeds[0]
    world = World.build(args.workdir, site_specs(world_seed, args.patients, args.patches, args.feature_dim,
                                                 args.signal_fraction))
    table = Table(f"Ablations (paper table 4), world {world_seed}: c-index on the unseen site C, "
                  f"mean over training seeds {', '.join(map(str, args.train_seeds))}",
                  ["variant", *CANCERS, "mean", "sd over seeds", "params"])
    for label, ablation in ABLATION_ROWS:
        per_seed: list[dict[str, float]] = []
        params = 0
        for seed in args.train_seeds:
            config = synthetic_config(args, seed, tokens=args.tokens, ablation=ablation)
            log(f"ablation {label}, seed {seed}")
            result = train(config, world.train, world.unseen,
                           args.workdir / "runs" / f"ablation-{ablation or 'none'}-{seed}")
            per_seed.append(result.evaluation.cindex_per_cancer() if result.evaluation else {})
            params = result.params
        per_cancer = [mean([s.get(c, math.nan) for s in per_seed]) for c in CANCERS]
        seed_means = [mean([s.get(c, math.nan) for c in CANCERS]) for s in per_seed]
        sd = float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else math.nan
        table.rows.append([label, *map(fmt, per_cancer), fmt(mean(per_cancer)), fmt(sd), str(params)])
    oracle = oracle_evaluation(world.unseen).cindex_per_cancer()
    table.rows.append(["oracle", *(fmt(oracle[c]) for c in CANCERS), fmt(mean([oracle[c] for c in CANCERS])),
                       "", ""])
    table.notes.append(f"Same world, seeds and settings for every row: {args.patients} patients a site, "
                       f"~{args.patches} patches a slide, region {args.signal_fraction:.0%}, N = {args.tokens}, "
                       f"q = {args.sparsify_keep}, {args.epochs} epochs. mean = mean of the per-cancer columns.")
    return table


# --------------------------------------------------------------------------- 3. dps vs random


@dataclass
class HitCount:
    """Selected tokens, how many of them lie in the planted region, and the DPS scores they were given.

    ``expected``: region tokens a uniform draw of the same sizes from the same
    slides would hold on average. Scores (the CLS attention `PatchSelector.stage_scores`
    receives) are summed separately over region and background tokens.
    """

    tokens: int = 0
    hits: int = 0
    keys: int = 0
    key_hits: int = 0
    expected: float = 0.0
    region_score: float = 0.0
    region_scored: int = 0
    background_score: float = 0.0
    background_scored: int = 0

    def add(self, selection: Selection, masks: dict[str, np.ndarray]) -> None:
        for i, (slide_id, rows) in enumerate(selection.parts):
            region = masks[slide_id]
            is_key = selection.token_role[selection.token_slide == i] == Role.KEY
            self.tokens += rows.size
            self.hits += int(region[rows].sum())
            self.keys += int(is_key.sum())
            self.key_hits += int(region[rows[is_key]].sum())
            self.expected += rows.size * float(region.mean())

    def add_scores(self, selection: Selection, scores: np.ndarray, masks: dict[str, np.ndarray]) -> None:
        for i, (slide_id, _) in enumerate(selection.parts):
            at = (selection.token_slide == i) & np.isfinite(scores)
            in_region = masks[slide_id][selection.token_row[at]]
            self.region_score += float(scores[at][in_region].sum())
            self.region_scored += int(in_region.sum())
            self.background_score += float(scores[at][~in_region].sum())
            self.background_scored += int((~in_region).sum())

    def __add__(self, other: HitCount) -> HitCount:
        return HitCount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(HitCount)))

    @property
    def hit_share(self) -> float:
        return self.hits / self.tokens if self.tokens else math.nan

    @property
    def key_hit_share(self) -> float:
        return self.key_hits / self.keys if self.keys else math.nan

    @property
    def score_ratio(self) -> float:
        """Mean score of region tokens over that of background tokens: above 1 when the score points at the region."""
        if not self.region_scored or not self.background_scored:
            return math.nan
        return (self.region_score / self.region_scored) / (self.background_score / self.background_scored)

    @property
    def region_share(self) -> float:
        """What a uniform draw of the same tokens from the same slides would get."""
        return self.expected / self.tokens if self.tokens else math.nan


class RegionHitRecorder:
    """Counts, per training epoch and at inference per bank, the selected tokens inside the planted region.

    `PatchSelector.select` and `PatchSelector.stage_scores` are wrapped while
    `recording` is active (the trainer builds its selectors inside `fit`, so
    there is no other seam to observe them); selections run in the prefetch
    thread, hence the lock. Call
    `end_epoch` from ``fit``'s ``on_epoch``: every selection of an epoch is
    made before that epoch's report.
    """

    def __init__(self, masks: dict[Path, dict[str, np.ndarray]]) -> None:
        self.masks = masks  # bank path -> slide id -> bool [n_patches] in bank row order
        self.epochs: list[HitCount] = [HitCount()]
        self.inference: dict[Path, HitCount] = {}
        self._lock = threading.Lock()

    def end_epoch(self, report: EpochReport) -> None:
        with self._lock:
            self.epochs.append(HitCount())

    def training(self) -> list[HitCount]:
        return self.epochs[:-1]

    def inference_on(self, paths: Sequence[Path]) -> HitCount:
        return sum((self.inference.get(Path(path), HitCount()) for path in paths), HitCount())

    @contextlib.contextmanager
    def recording(self) -> Iterator[RegionHitRecorder]:
        original, original_stage = PatchSelector.select, PatchSelector.stage_scores
        recorder = self

        def select(selector: PatchSelector, patient, *, train: bool, rng: np.random.Generator) -> Selection:
            selection = original(selector, patient, train=train, rng=rng)
            path = Path(selector.bank.path)
            if not train and selector.test_time_pass is not None:
                return selection  # a test-time DPS pass: only the final selection counts as inference
            with recorder._lock:
                count = recorder.epochs[-1] if train else recorder.inference.setdefault(path, HitCount())
                count.add(selection, recorder.masks[path])
            return selection

        def stage_scores(selector: PatchSelector, selection: Selection, cls_attention: np.ndarray) -> None:
            original_stage(selector, selection, cls_attention)
            scores = np.asarray(cls_attention, dtype=np.float64).reshape(-1)
            with recorder._lock:
                recorder.epochs[-1].add_scores(selection, scores, recorder.masks[Path(selector.bank.path)])

        PatchSelector.select, PatchSelector.stage_scores = select, stage_scores
        try:
            yield self
        finally:
            PatchSelector.select, PatchSelector.stage_scores = original, original_stage


def region_masks(path: Path, spec: SynthSpec) -> dict[str, np.ndarray]:
    """Slide id -> bool [n_patches], True for the planted region's patches, in the bank's (curve) row order."""
    masks = {}
    with open_bank(path) as bank:
        for patient in draw_cohort(spec):
            for index, n_patches in enumerate(patient.slide_patches):
                slide_id = patient.slide_id(index)
                layout = draw_slide_layout(spec, patient.index, index, n_patches)
                masks[slide_id] = layout.region[bank.source_rows(slide_id)]
    return masks


# (row label, ablation, config changes); the test-time rows re-predict site C with the model of the row named.
DPS_ROWS = (("DPS (CancerMoE)", None, {}), ("DPS, first-cls score", None, {"dps_score": "first-cls"}),
            ("Random Select", "random-select", {}))
TEST_TIME_ROWS = (("DPS + test-time passes", "DPS (CancerMoE)"),
                  ("DPS, first-cls + test-time passes", "DPS, first-cls score"))


@dataclass
class DpsRun:
    """One training seed of one row of the dps-vs-random table."""

    unseen: float
    trained: float
    first: float
    last: float
    keys: float
    ratio: float
    infer_train: float
    infer_unseen: float
    infer_unseen_keys: float
    share: float
    predict_seconds: float = math.nan  # site C at inference


def repredict(model_dir: Path, world: World, masks: dict[Path, dict[str, np.ndarray]], passes: int,
              workdir: Path) -> tuple[float, HitCount, float]:
    """Site C's c-index, inference hit counts and predict seconds for a trained model with ``passes`` test-time passes.

    The model file is loaded into a fresh trainer over site C (empty score caches), as a new site would.
    """
    shutil.rmtree(workdir, ignore_errors=True)
    state = load_checkpoint(model_dir / FINAL_MODEL)
    state = {**state, "config": {**state["config"], "test_time_dps_passes": passes}}
    trainer = trainer_for_model(state, world.unseen, workdir)
    recorder = RegionHitRecorder(masks)
    with recorder.recording():
        start = time.perf_counter()
        evaluation = trainer.evaluate(world.unseen)
        seconds = time.perf_counter() - start
    return evaluation.cindex, recorder.inference_on([world.paths["C"]]), seconds


def dps_row(label: str, runs: Sequence[DpsRun]) -> list[str]:
    def pick(name: str) -> list[float]:
        return [getattr(r, name) for r in runs]

    return [label, fmt_sd(pick("unseen")), fmt_sd(pick("trained")),
            *(fmt_percent(mean(pick(n))) for n in ("first", "last", "keys")), fmt(mean(pick("ratio")), 2),
            *(fmt_percent(mean(pick(n))) for n in ("infer_train", "infer_unseen", "infer_unseen_keys")),
            fmt(mean(pick("predict_seconds")), 1), fmt_percent(mean(pick("share")))]


def section_dps_vs_random(args: argparse.Namespace) -> Table:
    world_seed = args.world_seeds[0]
    specs = site_specs(world_seed, args.dps_patients, args.dps_patches, args.feature_dim, args.dps_signal_fraction)
    world = World.build(args.workdir, specs)
    masks = {path: region_masks(path, specs[site]) for site, path in world.paths.items()}
    train_paths, unseen_paths = [world.paths["A"], world.paths["B"]], [world.paths["C"]]
    passes = args.dps_test_time_passes
    table = Table(f"DPS vs random selection with the signal in {args.dps_signal_fraction:.0%} of each slide "
                  f"(world {world_seed}; mean over training seeds {', '.join(map(str, args.train_seeds))})",
                  ["selection", "c-index site C (unseen)", "c-index training patients", "region tokens epoch 1",
                   f"region tokens epoch {args.epochs}", f"key tokens in region, epoch {args.epochs}",
                   f"score region / background, epoch {args.epochs}",
                   "region tokens at inference, training slides", "region tokens at inference, site C",
                   "key tokens in region at inference, site C", "predict seconds, site C",
                   "region share of the slides"])
    runs: dict[str, list[DpsRun]] = {}
    for label, ablation, changes in DPS_ROWS:
        runs[label] = []
        for seed in args.train_seeds:
            config = synthetic_config(args, seed, tokens=args.dps_tokens, ablation=ablation).replace(**changes)
            recorder = RegionHitRecorder(masks)
            log(f"dps-vs-random {label}, seed {seed}")
            out_dir = args.workdir / "runs" / f"dps-{ablation or config.dps_score}-{seed}"
            with recorder.recording():
                result = train(config, world.train, world.unseen, out_dir, on_epoch=recorder.end_epoch)
            epochs = recorder.training()
            infer_unseen = recorder.inference_on(unseen_paths)
            runs[label].append(DpsRun(
                result.evaluation.cindex if result.evaluation else math.nan, result.train_evaluation.cindex,
                epochs[0].hit_share, epochs[-1].hit_share, epochs[-1].key_hit_share, epochs[-1].score_ratio,
                recorder.inference_on(train_paths).hit_share, infer_unseen.hit_share, infer_unseen.key_hit_share,
                epochs[-1].region_share))
            if ablation is None and passes:
                _, _, runs[label][-1].predict_seconds = repredict(out_dir, world, masks, 0, out_dir / "predict-0")
                for test_label, of in TEST_TIME_ROWS:
                    if of != label:
                        continue
                    log(f"dps-vs-random {test_label}, seed {seed}")
                    cindex, hits, seconds = repredict(out_dir, world, masks, passes, out_dir / f"predict-{passes}")
                    runs.setdefault(test_label, []).append(DpsRun(**{
                        **vars(runs[label][-1]), "unseen": cindex, "infer_unseen": hits.hit_share,
                        "infer_unseen_keys": hits.key_hit_share, "predict_seconds": seconds}))
    order = [DPS_ROWS[0][0], TEST_TIME_ROWS[0][0], DPS_ROWS[1][0], TEST_TIME_ROWS[1][0], DPS_ROWS[2][0]]
    table.rows.extend(dps_row(label, runs[label]) for label in order if label in runs)
    oracle_unseen, oracle_train = oracle_evaluation(world.unseen).cindex, oracle_evaluation(world.train).cindex
    table.rows.append(["oracle", fmt(oracle_unseen), fmt(oracle_train), *[""] * 9])
    random_cindex = np.array([r.unseen for r in runs["Random Select"]])
    for label in order[:-1]:
        if label in runs:
            gain = np.array([r.unseen for r in runs[label]]) - random_cindex
            table.notes.append(f"{label} - Random Select, site C, paired by seed: {fmt_sd(gain.tolist())} "
                               f"(per seed: {', '.join(fmt(g) for g in gain)}).")
    table.notes.append(
        f"{args.dps_patients} patients a site, ~{args.dps_patches} patches a slide (D = {args.feature_dim}), N = "
        f"{args.dps_tokens} tokens, q = {args.sparsify_keep}, {args.epochs} epochs. Region tokens: share of the "
        "selected tokens inside the planted region; a uniform draw gets the region's share. Score region / "
        "background: mean DPS score (the row's token score) of region tokens over that of the other tokens, "
        "in the last epoch; 1 = the score does not point at the region. c-index on training patients is at "
        "inference (eval mode), after training. Site C's slides were never scored: without test-time passes "
        f"DPS has no scores to pick keys by there; the test-time rows give each site C patient {passes} scoring "
        "passes first (same trained models as the row above them; training columns repeated). Predict seconds: "
        "the model loaded into a fresh trainer, all of site C, one thread.")
    return table


# --------------------------------------------------------------------------- 4. tcga


def pooled_cindex(counts: Sequence[PairCounts]) -> float:
    return sum(counts, PairCounts()).cindex


def coxnet_risk(train: Cohort, test: Cohort, args: argparse.Namespace) -> tuple[np.ndarray, float, int]:
    """Elastic-net Cox on the genomic profiles (`coxnet_risk_of`)."""
    return coxnet_risk_of(genomics_matrix(train), train, genomics_matrix(test), args)


def coxnet_risk_of(x: np.ndarray, train: Cohort, x_test: np.ndarray, args: argparse.Namespace
                   ) -> tuple[np.ndarray, float, int]:
    """Elastic-net Cox risk of the rows ``x_test`` from features ``x`` of ``train`` only; returns (risk, chosen
    alpha, nonzero coefficients).

    The penalty path is fixed by the whole training fold; each penalty is scored by an inner stratified
    K-fold CV on the training fold (Harrell pairs pooled over the inner folds); the best one wins.
    """
    y = Surv.from_arrays(train.censorship == 0, train.survival_months)

    def path_model(alphas: np.ndarray | None = None) -> CoxnetSurvivalAnalysis:
        return CoxnetSurvivalAnalysis(l1_ratio=args.cox_l1_ratio, alphas=alphas, n_alphas=args.cox_alphas,
                                      alpha_min_ratio=args.cox_alpha_min_ratio, max_iter=100_000)

    scaler = StandardScaler().fit(x)
    full = path_model().fit(scaler.transform(x), y)
    alphas = full.alphas_
    counts: list[list[PairCounts]] = [[] for _ in alphas]
    # A tiny cohort (the smoke tests') has fewer deaths or censorings than folds: as many folds as it allows.
    folds = max(2, min(args.cox_inner_folds, int(np.bincount(train.censorship, minlength=2).min())))
    inner = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    for fit_rows, score_rows in inner.split(x, train.censorship):
        inner_scaler = StandardScaler().fit(x[fit_rows])
        model = path_model(alphas).fit(inner_scaler.transform(x[fit_rows]), y[fit_rows])
        scored = inner_scaler.transform(x[score_rows])
        for k, alpha in enumerate(alphas):
            counts[k].append(concordance_counts(model.predict(scored, alpha=alpha), train.survival_months[score_rows],
                                                train.censorship[score_rows]))
    best = int(np.nanargmax([pooled_cindex(c) for c in counts]))
    risk = full.predict(scaler.transform(x_test), alpha=alphas[best])
    return risk, float(alphas[best]), int((full.coef_[:, best] != 0).sum())


def tcga_folds(cohort: Cohort, splits_dir: Path, max_folds: int) -> list[tuple[Cohort, Cohort]]:
    """(train, validation) cohorts of the first ``max_folds`` published splits_{k}.csv, by case id."""
    return published_folds(cohort, splits_dir)[:max_folds]


def cindex_of(result: FitResult) -> float:
    return result.evaluation.cindex if result.evaluation else math.nan


def section_tcga(args: argparse.Namespace) -> Table:
    """Per study: CancerMoE (one model; with ``--set ensemble_size=K`` also the ensemble, whose members are the
    one-model column) and elastic-net Cox on the same published folds, paired by fold."""
    size = load_config(overrides=args.set).ensemble_size
    one = "CancerMoE, one model" + (f" (mean over the {size} members)" if size > 1 else "")
    table = Table(f"Real TCGA cohorts, genomics only: c-index on the published folds "
                  f"(mean ± SD over {args.max_folds} fold{'s' if args.max_folds > 1 else ''})",
                  ["study", "patients (deaths)", "genomic values / tokens", one,
                   *([f"CancerMoE, ensemble of {size}"] if size > 1 else []), "CancerMoE on training folds",
                   f"elastic-net Cox (l1_ratio {args.cox_l1_ratio})",
                   *(["ensemble - Cox (paired by fold)"] if size > 1 else []), "one model - Cox (paired by fold)",
                   "Cox features kept", "reference: Cox (data README) / SNN (paper)", "CancerMoE / Cox seconds"])
    for study in args.studies:
        table_path = args.tcga_dir / f"tcga_{study}_all_clean.csv.zip"
        if not table_path.exists():
            raise InputError(table_path, "no such file (set --tcga-dir to the folder of the TCGA tables)")
        bank_path = args.workdir / "tcga" / f"{study}.h5"
        bank_path.parent.mkdir(parents=True, exist_ok=True)
        import_tcga(bank_path, table_path, force=True)
        cohort = open_cohort([bank_path])
        n_values = len(cohort.refs[0].bank.genomics(cohort.refs[0].patient))
        base = CancerMoEConfig(feature_dim=cohort.refs[0].bank.feature_dim, epochs=args.epochs)
        ours, single, ours_train, cox, kept, tuned = [], [], [], [], [], []
        seconds_ours = seconds_cox = 0.0
        for k, (train_cohort, val_cohort) in enumerate(tcga_folds(cohort, args.tcga_dir / "splits" / f"tcga_{study}",
                                                                  args.max_folds)):
            config = load_config(overrides=args.set, base=base.replace(seed=args.train_seeds[0]))
            log(f"tcga {study} fold {k}: CancerMoE on {len(train_cohort)} patients")
            result = train(config, train_cohort, val_cohort, args.workdir / "runs" / f"tcga-{study}-{k}")
            seconds_ours += result.seconds
            ours.append(cindex_of(result))
            single.append(mean([cindex_of(m) for m in result.members]) if result.members else ours[-1])
            ours_train.append(result.train_evaluation.cindex)
            start = time.perf_counter()
            risk, _, nonzero = coxnet_risk(train_cohort, val_cohort, args)
            seconds_cox += time.perf_counter() - start
            cox.append(evaluate_risks(val_cohort, risk).cindex)
            kept.append(nonzero)
            if result.inner_cv:
                tuned.append(describe_changes(result.tuned) + " (inner c-index "
                             + " / ".join(fmt(c.cindex) for c in result.inner_cv) + ")")
        reference = TCGA_REFERENCE.get(study)
        ensemble_note = f"ensemble {' '.join(fmt(v) for v in ours)}; " if size > 1 else ""
        table.notes.append(f"{study.upper()} per fold: CancerMoE one model {' '.join(fmt(v) for v in single)}; "
                           f"{ensemble_note}Cox {' '.join(fmt(v) for v in cox)}.")
        if tuned:
            table.notes.append(f"{study.upper()} chosen by inner cross-validation of each training fold "
                               f"({load_config(overrides=args.set).inner_cv_grid}): "
                               + "; ".join(f"fold {k}: {t}" for k, t in enumerate(tuned)) + ".")
        table.rows.append([
            study.upper(), f"{len(cohort)} ({int((cohort.censorship == 0).sum())})",
            f"{n_values} / {math.ceil(n_values / base.genomic_piece)}", fmt_sd(single),
            *([fmt_sd(ours)] if size > 1 else []), fmt_sd(ours_train), fmt_sd(cox),
            *([fmt_sd([a - b for a, b in zip(ours, cox, strict=True)])] if size > 1 else []),
            fmt_sd([a - b for a, b in zip(single, cox, strict=True)]), f"{np.mean(kept):.0f}",
            f"{reference[0]:.2f} / {reference[1]:.3f}" if reference else "",
            f"{seconds_ours:.0f} / {seconds_cox:.0f}"])
    members = (f"; the ensemble: {size} models from seeds {args.train_seeds[0]}-{args.train_seeds[0] + size - 1}, "
               "survival curves averaged" if size > 1 else "")
    table.notes.append(
        f"CancerMoE: default config (batch 32, lr 1e-3, the recipe's defaults) and --set {args.set or 'nothing'}, "
        f"{args.epochs} epochs, the last epoch's model, seed {args.train_seeds[0]}{members}, no WSI tokens; training "
        f"folds: c-index of what is reported on its training patients. Cox: features "
        f"standardized on the training fold, {args.cox_alphas} penalties down to "
        f"{args.cox_alpha_min_ratio} x the largest, chosen by inner {args.cox_inner_folds}-fold CV on the training "
        "fold; the validation fold is only predicted.")
    return table


# --------------------------------------------------------------------------- main


RUNNERS: dict[str, Callable[[argparse.Namespace], Table]] = {
    "world": section_world, "default-world": section_default_world, "ablation": section_ablation,
    "dps-vs-random": section_dps_vs_random, "tcga": section_tcga}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=[*SECTIONS, "all"])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-bench-quality")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring for why 1)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of every model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="CancerMoE config override for every row of every section (repeatable)")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1],
                        help="training seeds: ablation and dps-vs-random average over all; world and tcga use the "
                             "first")
    synthetic = parser.add_argument_group("synthetic worlds (world, ablation)")
    synthetic.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1],
                           help="world: one row each; ablation and dps-vs-random use the first")
    synthetic.add_argument("--patients", type=int, default=300, help="patients per site")
    synthetic.add_argument("--patches", type=int, default=100, help="typical patches per slide")
    synthetic.add_argument("--feature-dim", type=int, default=16)
    synthetic.add_argument("--tokens", type=int, default=32, help="N: WSI tokens per patient")
    synthetic.add_argument("--signal-fraction", type=float, default=0.2)
    synthetic.add_argument("--sparsify-keep", type=float, default=0.25,
                           help="q (paper: 0.08, which keeps 2 of 32 tokens at inference)")
    default_world = parser.add_argument_group("default-world")
    default_world.add_argument("--default-world-patches", type=int, default=3000, help="typical patches per slide")
    default_world.add_argument("--default-world-patients", type=int, default=200, help="patients per site")
    default_world.add_argument("--default-world-feature-dim", type=int, default=1024)
    default_world.add_argument("--default-world-tokens", type=int, default=512)
    default_world.add_argument("--default-world-epochs", type=int, default=10)
    dps = parser.add_argument_group("dps-vs-random")
    dps.add_argument("--dps-patients", type=int, default=200)
    dps.add_argument("--dps-patches", type=int, default=2000)
    dps.add_argument("--dps-tokens", type=int, default=64)
    dps.add_argument("--dps-signal-fraction", type=float, default=0.01)
    dps.add_argument("--dps-test-time-passes", type=int, default=8,
                     help="test_time_dps_passes of the test-time rows (0: no such rows)")
    tcga = parser.add_argument_group("tcga (and the default world's linear references)")
    tcga.add_argument("--tcga-dir", type=Path, default=DEFAULT_TCGA_DIR)
    tcga.add_argument("--studies", nargs="+", default=list(TCGA_STUDIES), choices=TCGA_STUDIES)
    tcga.add_argument("--max-folds", type=int, default=5, choices=range(1, 6), metavar="{1..5}")
    tcga.add_argument("--cox-l1-ratio", type=float, default=0.5)
    tcga.add_argument("--cox-alphas", type=int, default=30, help="penalties on the path")
    tcga.add_argument("--cox-alpha-min-ratio", type=float, default=0.05)
    tcga.add_argument("--cox-inner-folds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_input_error(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sections = ALL_SECTIONS if args.section == "all" else (args.section,)
    tables = []
    for name in sections:
        start = time.perf_counter()
        table = RUNNERS[name](args)
        table.seconds = time.perf_counter() - start
        tables.append(table)
        print(table.markdown(), flush=True)
        print(flush=True)
    if len(tables) > 1:
        print("=" * 40 + " all tables " + "=" * 40)
        for table in tables:
            print(table.markdown())
            print()
        print("| section | minutes |\n|---|---|")
        for name, table in zip(sections, tables, strict=True):
            print(f"| {name} | {table.seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
