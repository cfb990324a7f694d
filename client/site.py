"""What a hospital does in one federated round, in plain Python (Flower calls it from `client.app`).

Each site splits its patients once, by a seeded stratified draw, into the
patients it trains on and the held-out patients it evaluates on; with
``validation_fraction`` the training patients are split again
(`cancermoe.recipe.validation_split`, as `cmoe-train` does) into the patients
it fits and the validation patients the coordinator chooses the best round
on. Held-out patients never take part in training, standardization, time
bins or that choice. Everything returned is aggregate (see `fedcommon.protocol`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cancermoe.acs import ConsolidationPlan
from cancermoe.bank import open_bank
from cancermoe.cohort import Cohort, labelled_patients, open_cohort
from cancermoe.config import CancerMoEConfig
from cancermoe.errors import InputError
from cancermoe.experiment import holdout_split
from cancermoe.genomics import GenomicLayout, GenomicMoments, GenomicScaler, genomic_moments
from cancermoe.recipe import federated_schedule, validation_split
from cancermoe.survival import concordance_counts
from cancermoe.train import SiteTrainer, evaluate_risks, resolve_device
from fedcommon.federated_eval import RiskTimeGrid, site_histogram
from fedcommon.federated_eval import time_histogram as federated_time_histogram
from fedcommon.protocol import CancerEval, EvalReport, TimeHistogram, TrainReport

log = logging.getLogger("cmoe.site")


@dataclass(frozen=True)
class SiteSettings:
    """From the SuperNode's node config: which site, its bank, its working folder, its device."""

    site: str
    bank: Path
    workdir: Path
    device: str = "auto"

    @classmethod
    def from_node_config(cls, node_config: dict) -> SiteSettings:
        return cls(site=str(node_config["site"]), bank=Path(str(node_config["bank"])),
                   workdir=Path(str(node_config.get("workdir", f"cmoe-site-{node_config['site']}"))),
                   device=str(node_config.get("device", "auto")))


def unreadable_bank(bank: Path, error: BaseException) -> InputError | None:
    """The bank's own one-line error when a round failed because the bank broke, else None (a bug).

    A bank that breaks while the site runs (a disk error, a file cut short or overwritten) fails when the
    next round opens it, with `open_bank`'s one-line error naming the file. One that breaks during a round
    fails inside HDF5 with whatever it says; the bank is then opened again to tell a broken bank from a bug.
    """
    if isinstance(error, InputError) and error.where == str(bank):
        return error
    try:
        open_bank(bank).close()
    except InputError as problem:
        return problem
    return None


def split_site(cohort: Cohort, eval_fraction: float, seed: int) -> tuple[Cohort, Cohort]:
    """(training patients, evaluation patients) of this site; the same split every round."""
    train, held = holdout_split(cohort, eval_fraction, seed)
    return cohort.subset(train), cohort.subset(held)


@dataclass(frozen=True)
class SitePatients:
    """A site's three disjoint groups of patients, the same every round."""

    fit: Cohort  # trained on; time bins and genomic standardization come from them
    validation: Cohort | None  # choose the best round (None without validation_fraction)
    held: Cohort  # held-out: only ever scored


def site_patients(cohort: Cohort, eval_fraction: float, validation_fraction: float, seed: int) -> SitePatients:
    """`split_site`, then about ``validation_fraction`` of the training patients kept for validation
    (stratified by cancer and event, seeded: `cancermoe.experiment.selection_split`'s split of them)."""
    train, held = split_site(cohort, eval_fraction, seed)
    if validation_fraction == 0:
        return SitePatients(train, None, held)
    fit, validation = validation_split(train.cancers, train.censorship, validation_fraction, seed)
    return SitePatients(train.subset(fit), train.subset(validation), held)


def _patients(settings: SiteSettings, config: CancerMoEConfig, eval_fraction: float) -> SitePatients:
    # Patients without survival data (a bank of new patients) take no part in training or evaluation.
    cohort = labelled_patients(open_cohort([settings.bank]), "federated training", log.warning)
    return site_patients(cohort, eval_fraction, config.validation_fraction, config.seed)


def time_histogram(settings: SiteSettings, time_edges: np.ndarray, eval_fraction: float,
                   config: CancerMoEConfig) -> TimeHistogram:
    """Round 0: deaths per survival-time bin among the patients the site trains on (the coordinator sets the time
    bins from them) and, with ``standardize_genomics``, the moments of their genomic values per cancer, for the
    cancers with enough patients here (`GenomicMoments.without_small_cancers`)."""
    fit = _patients(settings, config, eval_fraction).fit
    deaths = federated_time_histogram(fit.survival_months, fit.censorship, np.asarray(time_edges))
    # The moments also give the coordinator each cancer's gene count, which lays out the genomic tokens.
    wanted = config.standardize_genomics or config.genomics_by_cancer
    moments = genomic_moments(fit).without_small_cancers() if wanted else GenomicMoments()
    return TimeHistogram(np.asarray(deaths, dtype=np.int64), len(fit), moments)


def _trainer(settings: SiteSettings, config: CancerMoEConfig, cohort: Cohort, edges: np.ndarray,
             plan: ConsolidationPlan | None, weights: dict[str, torch.Tensor],
             scaler: GenomicScaler | None, layout: GenomicLayout | None) -> SiteTrainer:
    trainer = SiteTrainer(config, cohort, edges=edges, workdir=settings.workdir / "dps",
                          device=resolve_device(settings.device), plan=plan, genomic_scaler=scaler,
                          genomic_layout=layout)
    trainer.model.load_state_dict(weights)
    return trainer


def restore_or_snapshot(workdir: Path, server_round: int, keep: int = 2) -> None:
    """Make round ``server_round`` start from the same site state however often it is run.

    The DPS score cache advances as a site trains. If the coordinator dies after a site trained
    round r but before it recorded it, the resumed job asks for round r again: the site then
    restores the cache as it was when round r first started, so a resumed job has the same
    outcome as an uninterrupted one. Only the last ``keep`` snapshots are kept.
    """
    live, snapshots = workdir / "dps", workdir / "snapshots"
    snapshot = snapshots / f"round-{server_round:05d}"
    if snapshot.exists():
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(snapshot, live)
        return
    live.mkdir(parents=True, exist_ok=True)
    tmp = snapshots / f".round-{server_round:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(live, tmp)
    tmp.rename(snapshot)
    for old in sorted(snapshots.glob("round-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def round_seed(seed: int, server_round: int) -> int:
    """Each round draws new patch selections and patient orders, reproducibly."""
    return seed * 100_003 + server_round


def train_round(settings: SiteSettings, config: CancerMoEConfig, *, edges: np.ndarray,
                plan: ConsolidationPlan | None, weights: dict[str, torch.Tensor], local_epochs: int,
                eval_fraction: float, server_round: int, scaler: GenomicScaler | None = None,
                layout: GenomicLayout | None = None, restore: bool = True,
                proximal_mu: float = 0.0, total_rounds: int = 0) -> tuple[dict[str, torch.Tensor], TrainReport]:
    """Local epochs from the global weights on the patients the site fits (neither held-out nor validation);
    returns the new weights and this round's aggregate report. ``scaler``: the coordinator's pooled genomic
    standardization (None: genomics as stored); ``layout``: its genomic token layout (None: this site's own).
    ``restore``: start from the round's DPS snapshot (`restore_or_snapshot`); False when the caller did.
    ``proximal_mu`` > 0: FedProx's proximal term towards the global weights the round started from.
    ``total_rounds``: the job's rounds, over which ``warmup_fraction`` and ``final_lr_ratio`` shape the
    learning rate (`cancermoe.recipe.federated_schedule`; 0: a coordinator that does not say, constant rate)."""
    train = _patients(settings, config, eval_fraction).fit
    if restore:
        restore_or_snapshot(settings.workdir, server_round)
    trainer = _trainer(settings, config.replace(seed=round_seed(config.seed, server_round)), train, edges, plan,
                       weights, scaler, layout)
    if total_rounds and (config.warmup_fraction > 0 or config.final_lr_ratio < 1):
        trainer.step, trainer.total_steps = federated_schedule(server_round, total_rounds, local_epochs, len(train),
                                                               config.batch_size)
    tokens = None
    genomic_tokens = None
    loss = 0.0
    start = time.perf_counter()
    reference = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()} if proximal_mu > 0 else None
    for _ in range(local_epochs):
        report = trainer.train_epoch(proximal_mu=proximal_mu, proximal_reference=reference)
        tokens = report.routing_counts if tokens is None else tokens + report.routing_counts
        genomic_tokens = report.genomic_tokens if genomic_tokens is None else genomic_tokens + report.genomic_tokens
        loss = report.loss
    risk = trainer.predict(train)  # eval mode, like the evaluation numbers (train-mode risks are noisier)
    stats = trainer.head_stats
    layers, heads = config.n_layers, trainer.model.blocks[0].attn.n_heads
    importance = np.zeros((layers, heads))
    similarity = np.zeros((layers, heads, heads))
    samples = 0
    if stats is not None:
        importance = np.stack(stats.importance_sum)
        similarity = np.stack(stats.similarity_sum)
        samples = stats.n_samples
    report = TrainReport(
        patients=len(train),
        loss=loss,
        pairs=evaluate_risks(train, risk).counts,
        expert_tokens=np.asarray(tokens, dtype=np.float64),
        head_importance=importance,
        head_similarity=similarity,
        head_samples=samples,
        seconds=time.perf_counter() - start,
        events=int(np.count_nonzero(train.censorship == 0)),
        genomic_tokens=np.asarray(genomic_tokens, dtype=np.float64),
    )
    weights_out = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    return weights_out, report


def evaluate_round(settings: SiteSettings, config: CancerMoEConfig, *, edges: np.ndarray,
                   plan: ConsolidationPlan | None, weights: dict[str, torch.Tensor], grid: RiskTimeGrid,
                   eval_fraction: float, scaler: GenomicScaler | None = None,
                   layout: GenomicLayout | None = None) -> EvalReport:
    """The global model on this site's held-out patients, reduced to per-cancer counts and histograms, and with
    ``config.validation_fraction`` on its validation patients, reduced to per-cancer pair counts."""
    start = time.perf_counter()
    patients = _patients(settings, config, eval_fraction)
    held = patients.held
    trainer = _trainer(settings, config, held, edges, plan, weights, scaler, layout)
    risk = trainer.predict(held)
    report = EvalReport(len(held))
    for cancer in held.cancer_codes():
        at = held.cancers == cancer
        r, t, c = risk[at], held.survival_months[at], held.censorship[at]
        report.cancers[cancer] = CancerEval(pairs=concordance_counts(r, t, c), histogram=site_histogram(r, t, c, grid))
    if patients.validation is not None and len(patients.validation):
        report.validation = evaluate_risks(patients.validation, trainer.predict(patients.validation)).per_cancer
    report.seconds = time.perf_counter() - start
    return report
