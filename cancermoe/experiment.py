"""Centralized experiments: train on pooled banks, evaluate on held-out patients, folds or other banks.

This is the baseline that federation is measured against, and what
`cmoe-train` runs. One `fit` trains one model with checkpoints after every
epoch (atomic; ``resume`` continues from the last one), a seed ensemble
(`fit_ensemble`) or, with ``inner_cv_grid``, first chooses the regularization
by inner cross-validation of the training patients (`fit_tuned`);
`run_experiment` arranges the splits and averages over folds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cancermoe.acs import ConsolidationPlan
from cancermoe.cohort import Cohort
from cancermoe.config import CancerMoEConfig, config_with, parse_grid
from cancermoe.ensemble import EnsemblePredictor, ensemble_state, is_ensemble, mean_risk, member_seeds
from cancermoe.errors import InputError
from cancermoe.files import write_text_atomically
from cancermoe.genomics import GenomicLayout, GenomicScaler, genomic_moments
from cancermoe.model import count_parameters
from cancermoe.recipe import EarlyStopping, epochs_for_steps, steps_per_epoch, validation_split
from cancermoe.risk_groups import risk_groups_from_risks
from cancermoe.survival import MIN_EVENTS_FOR_CINDEX, PairCounts, time_bin_edges
from cancermoe.train import (
    EpochReport,
    Evaluation,
    SiteTrainer,
    consolidation_plan_now,
    evaluate_risks,
    load_checkpoint,
    save_checkpoint,
    wrap_ddp,
)
from cancermoe.tuning import CandidateScore, best_candidate, grid_candidates

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
INNER_CV_DIR = "inner-cv"  # under a fit's out_dir: one folder per candidate and inner fold
INNER_COUNTS = "inner-counts.json"  # a finished inner fit's held-out pair counts (what a resume reuses)

ABLATIONS: dict[str, dict[str, Any]] = {
    "dps": {"dps_mode": "fixed-random"},  # the paper's "w/o DPS": one fixed random draw
    "random-select": {"dps_mode": "random"},  # random tokens in training and inference
    "acs": {"acs": False},
    "smoe": {"smoe": False},
    "genomics": {"use_genomics": False},
}


def ablated(config: CancerMoEConfig, ablation: str | None) -> CancerMoEConfig:
    if ablation is None:
        return config
    if ablation not in ABLATIONS:
        raise InputError("--ablate", f"unknown ablation {ablation!r} (one of {', '.join(ABLATIONS)})")
    return config.replace(**ABLATIONS[ablation])


# --------------------------------------------------------------------------- splits


def fold_assignment(cohort: Cohort, folds: int, seed: int) -> np.ndarray:
    """Fold index per patient, stratified by cancer and event so each fold gets a share of both."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(cohort), dtype=np.int64)
    offset = 0
    for cancer in cohort.cancer_codes():
        for event in (True, False):
            members = np.flatnonzero((cohort.cancers == cancer) & ((cohort.censorship == 0) == event))
            members = rng.permutation(members)
            fold[members] = (np.arange(members.size) + offset) % folds
            offset += members.size
    return fold


def holdout_split(cohort: Cohort, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) patient indices; about ``fraction`` held out, stratified like the folds."""
    folds = max(2, round(1 / fraction))
    fold = fold_assignment(cohort, folds, seed)
    return np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)


# --------------------------------------------------------------------------- one model


@dataclass
class FitResult:
    evaluation: Evaluation | None  # None when there is nothing to evaluate
    train_evaluation: Evaluation
    epochs: list[EpochReport]
    params: int
    seconds: float
    out_dir: Path
    selected_epoch: int = 0  # the epoch whose model was kept (the last one without a validation split)
    validation_cindex: float = math.nan  # that model's c-index on the validation patients
    model_state: dict[str, Any] | None = None  # the kept model (`final_model_state`)
    members: list[FitResult] = field(default_factory=list)  # an ensemble's members, in seed order
    inner_cv: list[CandidateScore] = field(default_factory=list)  # with inner_cv_grid: every candidate's score
    tuned: dict[str, Any] = field(default_factory=dict)  # with inner_cv_grid: the chosen values


def training_edges(train: Cohort, n_bins: int, where: str) -> np.ndarray:
    """Time-bin edges from the training patients only (no leakage into evaluation)."""
    try:
        return time_bin_edges(train.survival_months, train.censorship, n_bins)
    except ValueError as exc:
        raise InputError(where, f"cannot train: {exc}") from None


def selection_split(config: CancerMoEConfig, train: Cohort, split_seed: int | None = None
                    ) -> tuple[Cohort, Cohort | None]:
    """(patients to fit, patients to choose the epoch on): `cancermoe.recipe.validation_split` of ``train``, drawn
    with ``split_seed`` (default: the config's seed)."""
    if config.validation_fraction == 0:
        return train, None
    seed = config.seed if split_seed is None else split_seed
    fitting, validation = validation_split(train.cancers, train.censorship, config.validation_fraction, seed)
    return train.subset(fitting), train.subset(validation)


def planned_epochs(config: CancerMoEConfig, patients: int) -> int:
    """``config.epochs``, or with ``config.steps`` the epochs that make that many optimizer steps."""
    return epochs_for_steps(config.steps, patients, config.batch_size) if config.steps else config.epochs


def selection_protocol(config: CancerMoEConfig) -> str:
    """How the reported model was chosen, in words (for the results and the JSON)."""
    if config.inner_cv_grid:
        return (f"regularization chosen per training set by {config.inner_cv_folds}-fold inner cross-validation "
                f"of its patients over {config.inner_cv_grid!r} (the best pooled inner c-index, seed "
                f"{config.seed}; evaluation patients never take part), then trained on all of them: "
                f"{selection_protocol(config.replace(inner_cv_grid=''))}")
    if config.validation_fraction == 0:
        one = "the last epoch's model (no model selection)"
    else:
        stop = f", early stopping after {config.patience} epochs without improvement" if config.patience else ""
        one = (f"the epoch with the best c-index on an inner validation split ({config.validation_fraction:.0%} of "
               f"the training patients, stratified by cancer and event){stop}; evaluation patients never take part")
    if config.ensemble_size == 1:
        return one
    seeds = member_seeds(config.seed, config.ensemble_size)
    return (f"an ensemble of {config.ensemble_size} models trained on the same patients from seeds {seeds[0]}-"
            f"{seeds[-1]}, each {one}; their survival curves averaged (the risk is that of the mean curve), "
            "nothing chosen among the members")


def fit(config: CancerMoEConfig, train: Cohort, evaluate_on: Cohort | None, out_dir: Path, *,
        device: torch.device, resume: bool = False, shard: tuple[int, int] = (0, 1),
        on_epoch: Callable[[EpochReport], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None) -> FitResult:
    """Train on ``train`` one model (`fit_model`) or, with ``ensemble_size`` > 1, an ensemble (`fit_ensemble`), with
    ``inner_cv_grid`` after choosing its regularization (`fit_tuned`); ``evaluate_on`` is scored once, by what
    was kept; ``out_dir`` gets the final model file."""
    if config.inner_cv_grid:
        train_one = fit_tuned
    else:
        train_one = fit_model if config.ensemble_size == 1 else fit_ensemble
    return train_one(config, train, evaluate_on, out_dir, device=device, resume=resume, shard=shard,
                     on_epoch=on_epoch, on_batch=on_batch)


def fits_per_training_set(config: CancerMoEConfig) -> int:
    """How many models one `fit` trains: the inner cross-validation's, then the members (progress bars)."""
    candidates = len(grid_candidates(parse_grid(config.inner_cv_grid))) if config.inner_cv_grid else 0
    return candidates * config.inner_cv_folds + config.ensemble_size


def fit_tuned(config: CancerMoEConfig, train: Cohort, evaluate_on: Cohort | None, out_dir: Path, *,
              device: torch.device, resume: bool = False, shard: tuple[int, int] = (0, 1),
              on_epoch: Callable[[EpochReport], None] | None = None,
              on_batch: Callable[[int, float], None] | None = None) -> FitResult:
    """`inner_cv_scores` of every candidate of ``config.inner_cv_grid`` (in ``out_dir/inner-cv``), then `fit` of the
    best one on all of ``train`` in ``out_dir``; ``evaluate_on`` is seen by that last fit only."""
    start = time.perf_counter()
    scores = inner_cv_scores(config, train, out_dir / INNER_CV_DIR, device=device, resume=resume, shard=shard,
                             on_epoch=on_epoch, on_batch=on_batch)
    best = best_candidate(scores)
    result = fit(config.replace(inner_cv_grid="", **best.changes), train, evaluate_on, out_dir, device=device,
                 resume=resume, shard=shard, on_epoch=on_epoch, on_batch=on_batch)
    result.inner_cv, result.tuned = scores, best.changes
    result.seconds = time.perf_counter() - start
    return result


def inner_cv_scores(config: CancerMoEConfig, train: Cohort, root: Path, *, device: torch.device,
                    resume: bool = False, shard: tuple[int, int] = (0, 1),
                    on_epoch: Callable[[EpochReport], None] | None = None,
                    on_batch: Callable[[int, float], None] | None = None) -> list[CandidateScore]:
    """Each candidate of the grid, fitted (one model, the config's seed) on all but one of ``inner_cv_folds``
    folds of ``train`` (stratified by cancer and event, `fold_assignment`) and scored on the remaining one; the
    held-out pair counts summed over the folds. A resumed run reuses the inner fits that finished and continues
    an interrupted one from its checkpoint."""
    fold = fold_assignment(train, config.inner_cv_folds, config.seed)
    base = config.replace(inner_cv_grid="", ensemble_size=1)
    scores = []
    for i, changes in enumerate(grid_candidates(parse_grid(config.inner_cv_grid))):
        counts = PairCounts()
        for k in range(config.inner_cv_folds):
            run_dir = root / f"candidate-{i}" / f"fold-{k}"
            done = run_dir / INNER_COUNTS
            if resume and done.exists():
                counts += PairCounts(**json.loads(done.read_text())["counts"])
                continue
            result = fit_model(base.replace(**changes), train.subset(np.flatnonzero(fold != k)),
                               train.subset(np.flatnonzero(fold == k)), run_dir, device=device, resume=resume,
                               shard=shard, on_epoch=on_epoch, on_batch=on_batch)
            held = result.evaluation.counts if result.evaluation else PairCounts()
            if shard[0] == 0:
                write_text_atomically(done, json.dumps({"changes": changes, "counts": asdict(held)}))
            counts += held
        scores.append(CandidateScore(changes, counts))
    return scores


def fit_ensemble(config: CancerMoEConfig, train: Cohort, evaluate_on: Cohort | None, out_dir: Path, *,
                 device: torch.device, resume: bool = False, shard: tuple[int, int] = (0, 1),
                 on_epoch: Callable[[EpochReport], None] | None = None,
                 on_batch: Callable[[int, float], None] | None = None) -> FitResult:
    """``ensemble_size`` models by `fit_model` from seeds seed, seed + 1, ... (each in ``out_dir/member-<k>``, all
    with the validation split of the config's seed, so they fit the same patients and share time bins), combined
    by `cancermoe.ensemble`; the ensemble's model file goes to ``out_dir``."""
    start = time.perf_counter()
    # Members score ``evaluate_on`` too (after their training, like any fit): what one model alone would report.
    members = [fit_model(config.replace(seed=seed, ensemble_size=1), train, evaluate_on, out_dir / f"member-{k}",
                         device=device, resume=resume, shard=shard, on_epoch=on_epoch, on_batch=on_batch,
                         split_seed=config.seed)
               for k, seed in enumerate(member_seeds(config.seed, config.ensemble_size))]
    fitting, _ = selection_split(config, train)
    state = ensemble_state(config.to_dict(), [member.model_state for member in members])
    # The ensemble's risk is the mean of its members' (`cancermoe.ensemble`), whose fits scored both sets already.
    evaluation = (evaluate_risks(evaluate_on, mean_risk([m.evaluation for m in members]))
                  if evaluate_on is not None and len(evaluate_on) else None)
    train_evaluation = evaluate_risks(fitting, mean_risk([m.train_evaluation for m in members]))
    if shard[0] == 0:
        groups = risk_groups_from_risks(train_evaluation.risk, fitting.cancers,
                                        f"ensemble risks of the {len(fitting)} training patients (cmoe-train)")
        save_checkpoint(out_dir / FINAL_MODEL, {**state, "risk_groups": groups.to_dict()})
    return FitResult(evaluation, train_evaluation, [r for m in members for r in m.epochs],
                     sum(m.params for m in members), time.perf_counter() - start, out_dir,
                     round(float(np.median([m.selected_epoch for m in members]))),
                     _nanmean([m.validation_cindex for m in members]), state, members)


def fit_model(config: CancerMoEConfig, train: Cohort, evaluate_on: Cohort | None, out_dir: Path, *,
              device: torch.device, resume: bool = False, shard: tuple[int, int] = (0, 1),
              on_epoch: Callable[[EpochReport], None] | None = None,
              on_batch: Callable[[int, float], None] | None = None, split_seed: int | None = None) -> FitResult:
    """Train one model on ``train``: the model of the last epoch, or, with ``validation_fraction``, of the epoch
    with the best validation c-index (`selection_split` with ``split_seed``; early stopping with ``patience``).
    Attention consolidates after ``consolidate_after_epoch``; a checkpoint every epoch; ``evaluate_on`` is scored
    once, by the chosen model."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT
    rank, world = shard
    fitting, validation = selection_split(config, train, split_seed)
    state = load_checkpoint(checkpoint) if resume and checkpoint.exists() else None
    edges = np.asarray(state["edges"]) if state else training_edges(fitting, config.n_bins, str(out_dir))
    if state is not None:
        scaler = GenomicScaler.from_dict(state.get("genomic_scaler"))
    else:
        scaler = genomic_moments(fitting).scaler() if config.standardize_genomics else GenomicScaler()
    trainer = SiteTrainer(config, fitting, edges=edges, workdir=out_dir / "dps", device=device, shard=shard,
                          genomic_scaler=scaler)
    epochs = planned_epochs(config, len(fitting))
    if config.warmup_fraction > 0 or config.final_lr_ratio < 1:
        trainer.total_steps = epochs * steps_per_epoch(len(range(rank, len(fitting), world)), config.batch_size)
    stopping, best = EarlyStopping(config.patience), None
    if state is not None:
        trainer.load_state(state)
        if "selection" in state:
            stopping = EarlyStopping(config.patience, **state["selection"]["stopping"])
            best = state["selection"]["best_model"]
    if world > 1:
        trainer.ddp_model = wrap_ddp(trainer.model, device)
    reports = []
    while trainer.epoch < epochs and not stopping.should_stop:
        report = trainer.train_epoch(on_batch=on_batch)
        reports.append(report)
        if trainer.epoch == config.consolidate_after_epoch and trainer.model.consolidation_plan is None:
            plan = consolidation_plan_now(trainer)
            if plan is not None:
                trainer.consolidate(plan)
        if validation is not None:
            report.validation_cindex = trainer.evaluate(validation).cindex
            if stopping.improved(report.validation_cindex, trainer.epoch):
                best = final_model_state(trainer)
        if rank == 0:
            save_checkpoint(checkpoint, {**trainer.state(), "selection": {
                "stopping": {"best": stopping.best, "best_epoch": stopping.best_epoch, "waited": stopping.waited},
                "best_model": best}})
        if on_epoch is not None:
            on_epoch(report)
    chosen = final_model_state(trainer) if best is None else best
    model = trainer if best is None else trainer_for_model(chosen, fitting, out_dir / "dps", device=device)
    evaluation = model.evaluate(evaluate_on) if evaluate_on is not None and len(evaluate_on) else None
    train_evaluation = model.evaluate(fitting)
    if rank == 0:
        groups = risk_groups_from_risks(train_evaluation.risk, fitting.cancers,
                                        f"predicted risks of the {len(fitting)} training patients (cmoe-train)")
        save_checkpoint(out_dir / FINAL_MODEL, {**chosen, "risk_groups": groups.to_dict()})
    selected = stopping.best_epoch if best is not None else trainer.epoch
    validation_cindex = stopping.best if best is not None else math.nan
    return FitResult(evaluation, train_evaluation, reports, count_parameters(model.model),
                     time.perf_counter() - start, out_dir, selected, validation_cindex, chosen)


def final_model_state(trainer: SiteTrainer) -> dict[str, Any]:
    """What inference needs: weights (a copy), config, time bins, consolidation plan, genomic standardization and
    layout (the model file adds the risk-group thresholds, `cancermoe.risk_groups`)."""
    plan = trainer.model.consolidation_plan
    return {"config": trainer.config.to_dict(), "edges": trainer.edges.tolist(),
            "plan": plan.to_dict() if plan is not None else None,
            "model": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
            "genomic_scaler": trainer.genomic_scaler.to_dict(), "genomic_layout": trainer.genomic_layout.to_dict()}


Predictor = SiteTrainer | EnsemblePredictor  # what predicts: ``predict``, ``evaluate``, ``predict_details``


def trainer_for_model(state: dict[str, Any], cohort: Cohort, workdir: Path, *,
                      device: torch.device | str = "cpu", where: str = "model") -> Predictor:
    """A trainer holding the model of a `final_model_state` (or a loaded ``model.pt``), ready to predict; for an
    ensemble's state (`cancermoe.ensemble`) an `EnsemblePredictor` of such trainers (workdirs ``member-<k>``)."""
    if is_ensemble(state):
        members = [trainer_for_model(member, cohort, workdir / f"member-{k}", device=device, where=where)
                   for k, member in enumerate(state["members"])]
        return EnsemblePredictor(members)
    config = config_with(CancerMoEConfig(), state["config"], where)
    plan = ConsolidationPlan.from_dict(state["plan"]) if state["plan"] else None
    trainer = SiteTrainer(config, cohort, edges=np.asarray(state["edges"]), workdir=workdir, device=device, plan=plan,
                          genomic_scaler=GenomicScaler.from_dict(state.get("genomic_scaler")),
                          # a model from before layouts (none stored) put every cancer at position 0: the empty layout
                          genomic_layout=GenomicLayout.from_dict(state.get("genomic_layout")))
    trainer.model.load_state_dict(state["model"])
    return trainer


def load_model(path: str | os.PathLike[str], cohort: Cohort, workdir: Path, *,
               device: torch.device | str = "cpu") -> Predictor:
    """A trainer holding the model of a final model file (`cmoe-train`'s or `cmoe-server`'s ``model.pt``:
    config, time bins, consolidation plan, weights, genomic standardization), ready to predict ``cohort``.

    ``workdir`` gets fresh DPS score caches: patients the model never trained on have no scores, and a
    leftover cache from another model would select their patches differently.
    """
    shutil.rmtree(workdir, ignore_errors=True)
    return trainer_for_model(load_checkpoint(path), cohort, workdir, device=device, where=str(path))


def published_folds(cohort: Cohort, splits_dir: Path) -> list[tuple[Cohort, Cohort]]:
    """(training, evaluation) cohorts of every ``splits_<k>.csv`` in ``splits_dir`` (columns ``train`` and ``val``
    of case ids, the MCAT/PORPOISE layout), in k order. A case id the cohort does not have is an error."""
    import pandas as pd

    files = sorted(Path(splits_dir).glob("splits_*.csv"), key=lambda f: int(f.stem.split("_")[-1]))
    if not files:
        raise InputError(splits_dir, "holds no splits_<k>.csv")
    position = {ref.patient.case_id: i for i, ref in enumerate(cohort.refs)}
    folds = []
    for path in files:
        try:
            split = pd.read_csv(path)
            train_ids, held_ids = split["train"].dropna().tolist(), split["val"].dropna().tolist()
        except (KeyError, ValueError, pd.errors.ParserError) as exc:
            raise InputError(path, f"not a splits file with train and val columns ({exc})") from None
        missing = [c for c in train_ids + held_ids if c not in position]
        if missing:
            raise InputError(path, f"{len(missing)} case ids not in the banks, e.g. {missing[0]}")
        if set(train_ids) & set(held_ids):
            raise InputError(path, "a case id is in both train and val")
        folds.append((cohort.subset([position[c] for c in train_ids]), cohort.subset([position[c] for c in held_ids])))
    return folds


def prepare_out_dir(out_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix two runs in one folder: a finished or started run needs --resume or --force."""
    started = out_dir.exists() and any(out_dir.rglob(CHECKPOINT))
    if started and not (resume or force):
        raise InputError(out_dir, "already holds a training run (use --resume to continue it, --force to restart)")
    if started and force and not resume:
        for path in [*out_dir.rglob(CHECKPOINT), *out_dir.rglob(FINAL_MODEL)]:
            path.unlink()
        for dps_dir in out_dir.rglob("dps"):
            shutil.rmtree(dps_dir)


# --------------------------------------------------------------------------- experiments


@dataclass
class ExperimentResult:
    """Everything `cmoe-train` reports. C-indices are NaN where undefined (no comparable pair).

    ``eval_counts``: the evaluation pair counts of every run summed (pairs within a cancer and a fold),
    whose `PairCounts.interval` is the reported 95% interval; ``eval_per_cancer`` the same per cancer.
    """

    eval_cindex: float
    eval_cindex_sd: float
    eval_cindex_per_cancer: dict[str, float]
    train_cindex: float
    epochs: int
    params: int
    seconds: float
    protocol: str
    folds: list[dict[str, Any]] = field(default_factory=list)
    eval_counts: PairCounts = field(default_factory=PairCounts)
    eval_per_cancer: dict[str, HeldOut] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def clean(value: float) -> float | None:
            return None if value is None or math.isnan(value) else round(float(value), 4)

        return {
            "eval_cindex": clean(self.eval_cindex),
            "eval_cindex_sd": clean(self.eval_cindex_sd),
            "eval_cindex_interval": [clean(v) for v in self.eval_counts.interval()],
            "eval_cindex_per_cancer": {k: clean(v) for k, v in self.eval_cindex_per_cancer.items()},
            "eval_per_cancer": {k: v.to_json() for k, v in self.eval_per_cancer.items()},
            "interval": INTERVAL_METHOD,
            "train_cindex": clean(self.train_cindex),
            "epochs": self.epochs,
            "params": self.params,
            "seconds": round(self.seconds, 2),
            "protocol": self.protocol,
            "folds": [{k: (clean(v) if isinstance(v, float) else v) for k, v in f.items()} for f in self.folds],
        }


INTERVAL_METHOD = ("95% normal approximation; standard error by the first-order jackknife over patients, "
                   "pairs formed within a cancer (and a fold)")


@dataclass
class HeldOut:
    """The evaluation patients of one cancer, summed over runs: their pair counts, patients and deaths."""

    counts: PairCounts = field(default_factory=PairCounts)
    patients: int = 0
    deaths: int = 0

    @property
    def few_events(self) -> bool:
        return self.deaths < MIN_EVENTS_FOR_CINDEX

    def __add__(self, other: HeldOut) -> HeldOut:
        return HeldOut(self.counts + other.counts, self.patients + other.patients, self.deaths + other.deaths)

    def to_json(self) -> dict[str, Any]:
        lower, upper = self.counts.interval()
        return {"pooled_cindex": _rounded(self.counts.cindex), "lower": _rounded(lower), "upper": _rounded(upper),
                "patients": self.patients, "deaths": self.deaths, "few_events": self.few_events}


def held_out_per_cancer(evaluation: Evaluation) -> dict[str, HeldOut]:
    return {c: HeldOut(counts, evaluation.patients[c], evaluation.deaths[c])
            for c, counts in evaluation.per_cancer.items()}


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _nanstd(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def run_experiment(config: CancerMoEConfig, cohort: Cohort, out_dir: Path, *, device: torch.device,
                   eval_cohort: Cohort | None = None, folds: int | None = None, holdout: float = 0.2,
                   splits: Path | None = None, resume: bool = False, shard: tuple[int, int] = (0, 1),
                   on_epoch: Callable[[EpochReport], None] | None = None,
                   on_batch: Callable[[int, float], None] | None = None) -> ExperimentResult:
    """Train and evaluate by one protocol: other banks (``eval_cohort``), published folds (``splits``), K folds,
    or a held-out fraction. Within each training set the model is chosen as `selection_protocol` says."""
    start = time.perf_counter()
    if splits is not None:
        pairs = published_folds(cohort, splits)
        runs = [(f"fold-{k}", train, held, out_dir / f"fold-{k}") for k, (train, held) in enumerate(pairs)]
        protocol = f"{len(runs)} published folds ({splits})"
    elif eval_cohort is not None:
        runs = [("eval-banks", cohort, eval_cohort, out_dir)]
        protocol = "evaluation banks"
    elif folds:
        if folds < 2 or folds > len(cohort):
            raise InputError("--folds", f"{folds} folds for {len(cohort)} patients")
        fold = fold_assignment(cohort, folds, config.seed)
        runs = [(f"fold-{k}", cohort.subset(np.flatnonzero(fold != k)), cohort.subset(np.flatnonzero(fold == k)),
                 out_dir / f"fold-{k}") for k in range(folds)]
        protocol = f"{folds}-fold cross-validation by patient"
    else:
        train_idx, held_idx = holdout_split(cohort, holdout, config.seed)
        runs = [("holdout", cohort.subset(train_idx), cohort.subset(held_idx), out_dir)]
        protocol = f"held-out {len(held_idx)} of {len(cohort)} patients"
    protocol = f"{protocol}; model: {selection_protocol(config)}"
    results = []
    for name, train, held, run_dir in runs:
        result = fit(config, train, held, run_dir, device=device, resume=resume, shard=shard,
                     on_epoch=on_epoch, on_batch=on_batch)
        results.append((name, result))
    eval_values = [r.evaluation.cindex if r.evaluation else math.nan for _, r in results]
    intervals = [r.evaluation.counts.interval() if r.evaluation else (math.nan, math.nan) for _, r in results]
    cancers = sorted({c for _, r in results if r.evaluation for c in r.evaluation.per_cancer})
    per_cancer = {c: _nanmean([r.evaluation.per_cancer[c].cindex for _, r in results
                               if r.evaluation and c in r.evaluation.per_cancer]) for c in cancers}
    held_out: dict[str, HeldOut] = {}
    for _, r in results:
        for cancer, part in (held_out_per_cancer(r.evaluation) if r.evaluation else {}).items():
            held_out[cancer] = held_out.get(cancer, HeldOut()) + part
    return ExperimentResult(
        eval_counts=sum((h.counts for h in held_out.values()), PairCounts()),
        eval_per_cancer=dict(sorted(held_out.items())),
        eval_cindex=_nanmean(eval_values),
        eval_cindex_sd=_nanstd(eval_values),
        eval_cindex_per_cancer=per_cancer,
        train_cindex=_nanmean([r.train_evaluation.cindex for _, r in results]),
        epochs=config.epochs,
        params=results[0][1].params,
        seconds=time.perf_counter() - start,
        protocol=protocol,
        folds=[{"name": name, "eval_cindex": v, "eval_cindex_lower": lo, "eval_cindex_upper": hi,
                "train_cindex": r.train_evaluation.cindex, "selected_epoch": r.selected_epoch,
                "validation_cindex": r.validation_cindex,
                **({"inner_cv": {"chosen": r.tuned, "candidates": [c.to_json() for c in r.inner_cv]}}
                   if r.inner_cv else {})}
               for (name, r), v, (lo, hi) in zip(results, eval_values, intervals, strict=True)],
    )
