"""Local training and evaluation of CancerMoE on one cohort (one site's bank, or several pooled).

`SiteTrainer` is the unit both `cmoe-train` (centralized) and the federated
client use: it owns the model, the optimizer, the patch selectors with their
on-disk score caches, and the per-epoch bookkeeping the paper's mechanisms
need (DPS score adoption, ACS head statistics, SMoE routing counts). Deciding
*when* to consolidate attention is left to the caller (`fit` here, the server
in the federation), because in the federation one plan must serve all sites.

Conventions: survival in months; censorship 1 = censored; a higher risk means
an earlier expected death; c-indices are stratified by cancer (pairs are only
formed within a cancer type) unless stated otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cancermoe.acs import ConsolidationPlan, HeadStats, compute_consolidation_plan
from cancermoe.bank import Bank
from cancermoe.cohort import Cohort
from cancermoe.config import CancerMoEConfig
from cancermoe.dps import PatchSelector, ScoreCache, ScoreUpdatePolicy, Selection, prefetch
from cancermoe.files import atomic_path
from cancermoe.genomics import GenomicLayout, GenomicScaler
from cancermoe.model import CancerMoE, genomic_pieces
from cancermoe.recipe import balanced_order, learning_rate_factor
from cancermoe.survival import (
    PairCounts,
    assign_time_bins,
    concordance_counts,
    cox_partial_likelihood_loss,
    nll_survival_loss,
    risk_from_hazard_logits,
)

# --------------------------------------------------------------------------- devices


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def leave_a_core_for_reading() -> None:
    """Use one CPU core fewer for torch than the machine has, unless OMP_NUM_THREADS says otherwise.

    Patch reading runs in a background thread (`prefetch`). When torch's OpenMP workers take every
    core, the reader and the workers preempt each other and OpenMP's spin-waits burn the time: on
    2 cores an epoch measured 8x slower with 2 torch threads than with 1.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and asks for deterministic kernels, so a CPU run repeats exactly."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Padded tensors for a batch of patients, plus the selections to map scores back."""

    wsi: Tensor  # [B, N, D] float
    wsi_mask: Tensor  # [B, N] bool
    genomics: Tensor  # [B, T, piece] float
    genomics_mask: Tensor  # [B, T] bool
    time_bin: Tensor  # [B] long
    censorship: Tensor  # [B] float (1 = censored)
    indices: np.ndarray  # positions of these patients in the cohort
    selections: list[Selection]
    genomic_offset: Tensor | None = None  # [B] long: first genomic token position (`GenomicLayout`); None = 0

    def split(self, size: int) -> list[Batch]:
        """Consecutive micro-batches of at most ``size`` patients (views, no copies)."""
        return [Batch(self.wsi[i:i + size], self.wsi_mask[i:i + size], self.genomics[i:i + size],
                      self.genomics_mask[i:i + size], self.time_bin[i:i + size], self.censorship[i:i + size],
                      self.indices[i:i + size], self.selections[i:i + size],
                      None if self.genomic_offset is None else self.genomic_offset[i:i + size])
                for i in range(0, len(self.indices), size)]

    @property
    def sequence_length(self) -> int:
        """Tokens per patient in this batch's tensors: CLS + WSI slots + genomic slots."""
        return 1 + self.wsi.shape[1] + self.genomics.shape[1]

    def to(self, device: torch.device) -> Batch:
        for name in ("wsi", "wsi_mask", "genomics", "genomics_mask", "time_bin", "censorship", "genomic_offset"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def micro_batch_patients(config: CancerMoEConfig, sequence_length: int) -> int:
    """Patients per micro-batch: ``micro_batch_size`` when each carries ``tokens`` WSI tokens, proportionally more
    when a batch's sequences are shorter (fewer patches, or none: a genomics-only batch of 32 is one micro-batch).

    Memory grows at least linearly with the tokens a micro-batch holds, so a budget of
    ``micro_batch_size x (tokens + 1)`` tokens never needs more memory than the paper's setting.
    """
    budget = config.micro_batch_size * (config.tokens + 1)
    return max(config.micro_batch_size, budget // max(sequence_length, 1))


def collate(selections: list[Selection], genomics: list[np.ndarray | None], piece: int,
            time_bin: np.ndarray, censorship: np.ndarray, indices: np.ndarray,
            genomic_offsets: Sequence[int] | None = None) -> Batch:
    """Stack selections and genomic vectors into padded tensors, each padded to the batch's longest.

    A batch of genomics-only patients has no WSI slots at all (N = 0). ``genomic_offsets``: each
    patient's first genomic token position (`cancermoe.genomics.GenomicLayout`); None = 0 for all.
    """
    n_wsi = max((s.n_tokens for s in selections), default=0)
    feature_dim = selections[0].features.shape[1] if selections else 0
    wsi = torch.zeros(len(selections), n_wsi, feature_dim)
    wsi_mask = torch.zeros(len(selections), n_wsi, dtype=torch.bool)
    for i, s in enumerate(selections):
        wsi[i, : s.n_tokens] = torch.from_numpy(s.features)
        wsi_mask[i, : s.n_tokens] = True
    pieces = [genomic_pieces(g, piece) if g is not None else torch.zeros(0, piece) for g in genomics]
    n_pieces = max((p.shape[0] for p in pieces), default=0)
    genomic_tensor = torch.zeros(len(pieces), n_pieces, piece)
    genomic_mask = torch.zeros(len(pieces), n_pieces, dtype=torch.bool)
    for i, p in enumerate(pieces):
        genomic_tensor[i, : p.shape[0]] = p
        genomic_mask[i, : p.shape[0]] = True
    return Batch(
        wsi=wsi,
        wsi_mask=wsi_mask,
        genomics=genomic_tensor,
        genomics_mask=genomic_mask,
        time_bin=torch.from_numpy(np.asarray(time_bin, dtype=np.int64)),
        censorship=torch.from_numpy(np.asarray(censorship, dtype=np.float32)),
        indices=indices,
        selections=selections,
        genomic_offset=None if genomic_offsets is None else torch.tensor(list(genomic_offsets), dtype=torch.long),
    )


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Risks of a cohort and its c-index, per cancer and over cancers (stratified: summed pair counts).

    ``patients`` / ``deaths``: per cancer, how many patients (and observed deaths) the c-index rests on.
    """

    risk: np.ndarray
    per_cancer: dict[str, PairCounts]
    patients: dict[str, int] = field(default_factory=dict)
    deaths: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> PairCounts:
        return sum(self.per_cancer.values(), PairCounts())

    @property
    def cindex(self) -> float:
        return self.counts.cindex

    def cindex_per_cancer(self) -> dict[str, float]:
        return {cancer: counts.cindex for cancer, counts in self.per_cancer.items()}


def evaluate_risks(cohort: Cohort, risk: np.ndarray) -> Evaluation:
    """Per-cancer Harrell pair counts of ``risk`` (higher = earlier death) against the cohort's survival."""
    evaluation = Evaluation(risk=risk, per_cancer={})
    for cancer in cohort.cancer_codes():
        at = cohort.cancers == cancer
        evaluation.per_cancer[cancer] = concordance_counts(risk[at], cohort.survival_months[at],
                                                           cohort.censorship[at])
        evaluation.patients[cancer] = int(at.sum())
        evaluation.deaths[cancer] = int((cohort.censorship[at] == 0).sum())
    return evaluation


@dataclass
class PatchScores:
    """The tokens of one patient's final prediction pass: per token its slide (index into ``slide_ids``), bank row,
    DPS `Role` and score. Under sparse inference a ``last-cls`` score is 0 for a token the first block dropped."""

    case_id: str
    slide_ids: list[str]
    token_slide: np.ndarray  # int32 [n]
    token_row: np.ndarray  # int64 [n]
    token_role: np.ndarray  # int8 [n]
    score: np.ndarray  # float32 [n]

    @classmethod
    def of(cls, selection: Selection, scores: np.ndarray) -> PatchScores:
        return cls(selection.case_id, [slide for slide, _ in selection.parts], selection.token_slide.copy(),
                   selection.token_row.copy(), selection.token_role.copy(), np.asarray(scores, dtype=np.float32))


@dataclass
class PredictionDetails:
    """What `SiteTrainer.predict_details` gives, per patient of the cohort, in its order."""

    risk: np.ndarray  # [P], higher = earlier death
    hazard_logits: np.ndarray  # [P, n_bins]
    patches: list[PatchScores | None] | None = None  # only when asked for

    def fill(self, at: np.ndarray, part: PredictionDetails) -> None:
        """Put ``part`` (the prediction of the patients ``at``, in that order) in place."""
        self.risk[at] = part.risk
        self.hazard_logits[at] = part.hazard_logits
        if self.patches is not None and part.patches is not None:
            for i, patch in zip(at, part.patches, strict=True):
                self.patches[int(i)] = patch


# --------------------------------------------------------------------------- the trainer


@dataclass
class EpochReport:
    epoch: int
    loss: float
    train_cindex: float
    adopted_scores: bool
    seconds: float
    patients: int
    routing_counts: np.ndarray = field(repr=False)  # [modalities, experts], tokens routed this epoch
    # [max_genomic_tokens], real genomic tokens embedded per piece position this epoch (empty: not counted)
    genomic_tokens: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    validation_cindex: float = math.nan  # on the inner validation patients (model selection), when there are any


class SiteTrainer:
    """Trains and evaluates one CancerMoE on one cohort.

    ``edges``: the survival time-bin edges (from the training data only, see
    `cancermoe.survival.time_bin_edges`). ``workdir`` holds the DPS score
    caches, one per bank (the banks themselves are opened read-only).
    ``shard``: (rank, world) under DistributedDataParallel: this process
    trains on patients rank, rank + world, ... (a fixed shard, so each score
    cache has a single writer).
    """

    def __init__(self, config: CancerMoEConfig, cohort: Cohort, *, edges: np.ndarray, workdir: str | os.PathLike[str],
                 device: torch.device | str = "cpu", plan: ConsolidationPlan | None = None,
                 shard: tuple[int, int] = (0, 1), genomic_scaler: GenomicScaler | None = None,
                 genomic_layout: GenomicLayout | None = None) -> None:
        self.config = config
        self.genomic_scaler = genomic_scaler or GenomicScaler()  # identity unless given training statistics
        # Where each cancer's genomic tokens sit: a federation passes the coordinator's (every site must use the
        # same); a trainer on its own lays out its own cohort's cancers.
        if not config.genomics_by_cancer:
            genomic_layout = GenomicLayout()
        elif genomic_layout is None:
            genomic_layout = GenomicLayout.of_cohort(cohort, config.genomic_piece)
        genomic_layout.check_fits(config.max_genomic_tokens)
        self.genomic_layout = genomic_layout
        self.total_steps = 0  # steps the learning-rate schedule spans (0 = constant learning rate)
        self.step = 0  # optimizer steps taken
        self.cohort = cohort
        self.edges = np.asarray(edges, dtype=np.float64)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            leave_a_core_for_reading()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = shard
        torch.manual_seed(config.seed)  # the initial weights (and dropout) follow the config's seed
        self.model = CancerMoE(config, plan=plan).to(self.device)
        self.optimizer = self._new_optimizer()
        self.time_bins = assign_time_bins(cohort.survival_months, self.edges)
        self.policy = ScoreUpdatePolicy.from_config(config)
        self.caches: dict[Path, ScoreCache] = {}
        self.selectors: dict[Path, PatchSelector] = {}
        for bank in cohort.banks():
            suffix = f".rank{self.rank}" if self.world > 1 else ""
            cache = ScoreCache(self.workdir / f"{bank.path.stem}.dps{suffix}.h5", bank)
            self.caches[bank.path] = cache
            self.selectors[bank.path] = PatchSelector.from_config(bank, cache, config)
        # The caches remember the DPS bookkeeping across processes (a federated client is a new
        # process every round), so a fresh trainer continues from them.
        first_cache = next(iter(self.caches.values()), None)
        self.epoch = first_cache.epochs_ended if first_cache is not None else 0
        self.previous_train_cindex: float | None = first_cache.last_train_cindex if first_cache is not None else None
        self.head_stats: HeadStats | None = None
        self.rng = np.random.default_rng(config.seed + 7919 * self.rank)
        self.ddp_model: torch.nn.Module | None = None

    # ---- pieces the federation reuses

    def _new_optimizer(self) -> torch.optim.Optimizer:
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def consolidate(self, plan: ConsolidationPlan) -> None:
        """Apply an ACS plan (computed here or by the server) and restart the optimizer on the new shapes."""
        self.model.apply_consolidation(plan)
        self.optimizer = self._new_optimizer()
        if self.ddp_model is not None:
            self.ddp_model = wrap_ddp(self.model, self.device)

    def collecting_head_stats(self) -> bool:
        return self.config.acs and self.model.consolidation_plan is None

    # ---- batches

    def _batches(self, cohort: Cohort, selectors: dict[Path, PatchSelector], time_bins: np.ndarray,
                 indices: np.ndarray, *, train: bool, rng: np.random.Generator) -> Iterator[Batch]:
        """Select patches and read them (in a background thread, overlapping compute)."""
        config = self.config

        def produce() -> Iterator[Batch]:
            for start in range(0, len(indices), config.batch_size):
                chunk = indices[start:start + config.batch_size]
                refs = [cohort.refs[i] for i in chunk]
                selections = [selectors[r.bank.path].select(r.patient, train=train, rng=rng) for r in refs]
                offsets = [self.genomic_layout.offset(r.patient.cancer) for r in refs]
                # A cancer the layout does not know has no trained genomic positions: its patients go without.
                genomics = [self.genomic_scaler.apply(r.patient.cancer, r.bank.genomics(r.patient))
                            if config.use_genomics and offset is not None else None
                            for r, offset in zip(refs, offsets, strict=True)]
                yield collate(selections, genomics, config.genomic_piece, time_bins[chunk], cohort.censorship[chunk],
                              chunk, [offset or 0 for offset in offsets])

        return prefetch(produce(), depth=2)

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # ---- training

    def train_epoch(self, on_batch: Callable[[int, float], None] | None = None, *, proximal_mu: float = 0.0,
                    proximal_reference: Mapping[str, Tensor] | None = None) -> EpochReport:
        """One pass over this shard's patients; then the DPS score-adoption decision.

        ``proximal_mu`` > 0 adds FedProx's proximal term (mu / 2) ||w - w_ref||^2 to every step's loss, with
        ``proximal_reference`` the weights w_ref (by parameter name) to stay near: in a federation, the global
        model the round started from, so a site with a skewed cohort cannot drift far from what the others agree
        on (Li et al. 2020). mu = 0 is plain local training.
        """
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu {proximal_mu} must not be negative")
        if proximal_mu > 0 and proximal_reference is None:
            raise ValueError("proximal_mu > 0 needs the proximal_reference weights")
        proximal = self._proximal_pairs(proximal_reference) if proximal_mu > 0 else []
        start = time.perf_counter()
        model = self.ddp_model or self.model
        model.train()
        self.model.reset_routing_counts()
        self.model.enable_head_stats(self.collecting_head_stats())
        shard = np.arange(self.rank, len(self.cohort), self.world)
        if self.config.balanced_sampling:
            order = shard[balanced_order(self.time_bins[shard], self.cohort.censorship[shard], self.rng)]
        else:
            order = self.rng.permutation(shard)
        risk = np.full(len(self.cohort), np.nan)
        # Under DDP the shards may differ by a patient: join() lets the shorter one stop early.
        uneven = self.ddp_model.join() if self.ddp_model is not None else contextlib.nullcontext()
        with uneven:
            loss_sum, seen = self._train_batches(model, order, risk, on_batch, proximal_mu, proximal)
        self.model.enable_head_stats(False)
        risk, seen, loss_sum = gather_epoch(risk, seen, loss_sum, self.world)
        drawn = np.flatnonzero(np.isfinite(risk))  # balanced sampling draws with replacement: some are not drawn
        train_cindex = evaluate_risks(self.cohort.subset(drawn), risk[drawn]).cindex if seen else math.nan
        self.epoch += 1
        adopt = self.policy.should_adopt(self.epoch, train_cindex, self.previous_train_cindex)
        for cache in self.caches.values():
            cache.end_epoch(adopt, train_cindex=train_cindex)
            cache.save()
        self.previous_train_cindex = train_cindex
        counts = all_reduce_sum(self.model.routing_counts().detach().cpu().numpy(), self.world)
        genomic = all_reduce_sum(self.model.genomic_token_counts().detach().cpu().numpy(), self.world)
        return EpochReport(self.epoch, loss_sum / max(seen, 1), train_cindex, adopt,
                           time.perf_counter() - start, seen, counts, genomic_tokens=genomic)

    def _proximal_pairs(self, reference: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(parameter, its reference value on this device) for every trainable parameter; a reference that lacks
        one, or holds another shape, is an error rather than a silently partial term."""
        pairs = []
        for name, parameter in self.model.named_parameters():
            if name not in reference or tuple(reference[name].shape) != tuple(parameter.shape):
                raise ValueError(f"proximal reference: no weights of shape {tuple(parameter.shape)} for {name}")
            pairs.append((parameter, reference[name].detach().to(self.device, parameter.dtype)))
        return pairs

    @staticmethod
    def _proximal_term(mu: float, pairs: list[tuple[Tensor, Tensor]]) -> Tensor | float:
        """(mu / 2) ||w - w_ref||^2 over the pairs (0 when off)."""
        if mu == 0 or not pairs:
            return 0.0
        return 0.5 * mu * sum(torch.sum((w - ref) ** 2) for w, ref in pairs)

    def _train_batches(self, model: torch.nn.Module, order: np.ndarray, risk: np.ndarray,
                       on_batch: Callable[[int, float], None] | None, proximal_mu: float = 0.0,
                       proximal: list[tuple[Tensor, Tensor]] | None = None) -> tuple[float, int]:
        """Optimizer steps over ``order``; fills ``risk`` (train mode) and returns (loss sum, patients).

        Each batch of ``batch_size`` patients is fed in micro-batches whose gradients add up to
        the batch's (the loss of each is weighted by its share), so memory is bounded by
        ``micro_batch_size`` patients while the optimizer sees the configured batch.
        """
        config = self.config
        loss_sum, seen = 0.0, 0
        for batch in self._batches(self.cohort, self.selectors, self.time_bins, order, train=True, rng=self.rng):
            self.optimizer.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for micro in batch.split(micro_batch_patients(config, batch.sequence_length)):
                micro.to(self.device)
                with self._autocast():
                    out = model(micro.wsi, micro.wsi_mask, micro.genomics, micro.genomics_mask,
                                genomic_offset=micro.genomic_offset)
                logits = out.hazard_logits.float()
                loss = nll_survival_loss(logits, micro.time_bin, micro.censorship, beta=config.survival_beta)
                if config.cox_loss_weight > 0:
                    loss = loss + config.cox_loss_weight * self._cox_term(logits, micro)
                share = len(micro.indices) / len(batch.indices)
                # The proximal term is a per-step penalty like the others: its micro-batch shares sum to 1.
                penalty = self._genomic_penalty() + self._proximal_term(proximal_mu, proximal or [])
                ((loss + out.aux_loss.float() + penalty) * share).backward()
                if self.collecting_head_stats():
                    stats = self.model.collect_head_stats(loss_scale=len(batch.indices))
                    self.head_stats = stats if self.head_stats is None else self.head_stats + stats
                self._stage_scores(micro, out.token_scores)
                risk[micro.indices] = risk_from_hazard_logits(logits.detach()).cpu().numpy()
                batch_loss += float(loss.detach()) * share
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self._schedule_learning_rate()
            self.optimizer.step()
            self.step += 1
            loss_sum += batch_loss * len(batch.indices)
            seen += len(batch.indices)
            if on_batch is not None:
                on_batch(len(batch.indices), batch_loss)
        return loss_sum, seen

    def _cox_term(self, hazard_logits: Tensor, micro: Batch) -> Tensor:
        """The Cox ranking term on the micro-batch's risks, risk sets within a cancer (times in months)."""
        months = torch.as_tensor(self.cohort.survival_months[micro.indices], device=hazard_logits.device)
        _, cancer_codes = np.unique(self.cohort.cancers[micro.indices].astype(str), return_inverse=True)
        return cox_partial_likelihood_loss(risk_from_hazard_logits(hazard_logits), months, micro.censorship,
                                           torch.as_tensor(cancer_codes, device=hazard_logits.device))

    def _genomic_penalty(self) -> Tensor:
        """``genomic_l1`` x the L1 norm of the genomic token embedding (0 when off)."""
        if self.config.genomic_l1 == 0:
            return torch.zeros((), device=self.device)
        return self.config.genomic_l1 * self.model.genomic_embed.l1_norm()

    def _schedule_learning_rate(self) -> None:
        """Warm-up and cosine decay over ``total_steps`` (`cancermoe.recipe.learning_rate_factor`)."""
        if self.total_steps <= 0:
            return
        warmup = round(self.config.warmup_fraction * self.total_steps)
        factor = learning_rate_factor(self.step, self.total_steps, warmup, self.config.final_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor

    def _stage_scores(self, batch: Batch, token_scores: Tensor, *, cohort: Cohort | None = None,
                      selectors: dict[Path, PatchSelector] | None = None) -> None:
        """DPS token scores (`ModelOutput.token_scores`) of this forward pass, back to (slide, row) in a cache.

        By default into the training selectors' caches; test-time DPS passes its own ``cohort`` (the
        batch's indices point into it) and scratch ``selectors``.
        """
        cohort = self.cohort if cohort is None else cohort
        selectors = self.selectors if selectors is None else selectors
        scores = token_scores.float().cpu().numpy()
        for index, selection, row in zip(batch.indices, batch.selections, scores, strict=True):
            selectors[cohort.refs[index].bank.path].stage_scores(selection, row[: selection.n_tokens])

    def reduced_head_stats(self) -> HeadStats | None:
        """Head statistics summed over all processes (identical on every rank)."""
        if self.head_stats is None or self.world == 1:
            return self.head_stats
        arrays = {k: all_reduce_sum(v, self.world) for k, v in self.head_stats.to_dict().items()}
        return HeadStats.from_dict(arrays)

    # ---- prediction

    @torch.no_grad()
    def predict(self, cohort: Cohort) -> np.ndarray:
        """Risk of every patient of ``cohort`` (higher = earlier death), in eval mode (`predict_details`)."""
        return self.predict_details(cohort).risk

    @torch.no_grad()
    def predict_details(self, cohort: Cohort, *, patches: bool = False) -> PredictionDetails:
        """Risk and hazard logits of every patient of ``cohort`` in eval mode, and with ``patches`` the tokens the
        final pass looked at and their scores.

        Selection is deterministic DPS from the scores the caches hold, then sparse inference. With
        ``test_time_dps_passes`` = k > 0 (and dps mode), patients none of whose slides has a score (a
        new site, held-out patients) first get k scoring passes in a scratch cache of their own (never
        saved; training caches are not touched), which move their keys to the best-scored patches; the
        final pass then selects from those scores. Cost for such a patient: k scoring forwards + 1.
        """
        self.model.eval()
        selectors = self._prediction_selectors(cohort)
        passes = self.config.test_time_dps_passes if self.config.dps_mode == "dps" else 0
        newcomers = self._unscored_patients(cohort, selectors) if passes else np.zeros(0, dtype=np.int64)
        if newcomers.size == 0:
            return self._final_pass(cohort, selectors, patches)
        details = PredictionDetails(np.zeros(len(cohort)), np.zeros((len(cohort), self.config.n_bins)),
                                    [None] * len(cohort) if patches else None)
        known = np.setdiff1d(np.arange(len(cohort)), newcomers)
        if known.size:
            details.fill(known, self._final_pass(cohort.subset(known), selectors, patches))
        unscored = cohort.subset(newcomers)
        scratch = self._scratch_selectors(unscored)
        for pass_index in range(passes):
            self._test_time_pass(unscored, scratch, pass_index)
        details.fill(newcomers, self._final_pass(unscored, scratch, patches))
        return details

    def _prediction_selectors(self, cohort: Cohort) -> dict[Path, PatchSelector]:
        """The training selectors, plus one over a fresh neutral (scratch) cache per evaluation-only bank."""
        selectors = dict(self.selectors)
        for bank in cohort.banks():
            if bank.path not in selectors:  # an evaluation-only bank: scores never trained, neutral
                selectors[bank.path] = self._scratch_selector(bank)
        return selectors

    def _scratch_selector(self, bank: Bank) -> PatchSelector:
        cache = ScoreCache(self.workdir / f"{bank.path.stem}.eval-dps.h5", bank, scratch=True)
        return PatchSelector.from_config(bank, cache, self.config)

    def _scratch_selectors(self, cohort: Cohort) -> dict[Path, PatchSelector]:
        """Fresh scratch selectors for every bank of ``cohort``, training banks included (their caches untouched)."""
        return {bank.path: self._scratch_selector(bank) for bank in cohort.banks()}

    @staticmethod
    def _unscored_patients(cohort: Cohort, selectors: dict[Path, PatchSelector]) -> np.ndarray:
        """Indices of patients with slides of which none has a score in its selector's cache."""
        return np.array([i for i, ref in enumerate(cohort.refs) if ref.patient.slide_ids and not any(
            selectors[ref.bank.path].cache.is_scored(slide) for slide in ref.patient.slide_ids)], dtype=np.int64)

    def _test_time_pass(self, cohort: Cohort, selectors: dict[Path, PatchSelector], pass_index: int) -> None:
        """One test-time DPS pass: explore, score the selected tokens, adopt the scores in the scratch caches.

        ``first-cls`` scores every given token under sparse inference, so a pass costs an inference
        forward; ``last-cls`` needs the unfiltered forward (the training shape, no dropout) to score
        more than the qN kept tokens.
        """
        for selector in selectors.values():
            selector.explore(pass_index)
        sparse = None if self.config.dps_score == "first-cls" else False
        try:
            for batch in self._batches(cohort, selectors, np.zeros(len(cohort), dtype=np.int64),
                                       np.arange(len(cohort)), train=False, rng=np.random.default_rng(0)):
                batch.to(self.device)
                with self._autocast():
                    out = self.model(batch.wsi, batch.wsi_mask, batch.genomics, batch.genomics_mask,
                                     genomic_offset=batch.genomic_offset, sparse_inference=sparse)
                self._stage_scores(batch, out.token_scores, cohort=cohort, selectors=selectors)
        finally:
            for selector in selectors.values():
                selector.explore(None)
        for selector in selectors.values():
            selector.cache.end_epoch(adopt=True)

    def _final_pass(self, cohort: Cohort, selectors: dict[Path, PatchSelector], patches: bool) -> PredictionDetails:
        """One eval-mode pass over ``cohort`` from the selectors' current scores: risks, hazard logits and, with
        ``patches``, each patient's tokens with the DPS score (``config.dps_score``) this pass gave them."""
        details = PredictionDetails(np.zeros(len(cohort)), np.zeros((len(cohort), self.config.n_bins)),
                                    [None] * len(cohort) if patches else None)
        unused_bins = np.zeros(len(cohort), dtype=np.int64)  # prediction needs no survival targets
        batches = self._batches(cohort, selectors, unused_bins, np.arange(len(cohort)), train=False,
                                rng=np.random.default_rng(0))
        for batch in batches:
            batch.to(self.device)
            with self._autocast():
                out = self.model(batch.wsi, batch.wsi_mask, batch.genomics, batch.genomics_mask,
                                 genomic_offset=batch.genomic_offset)
            logits = out.hazard_logits.float()
            details.risk[batch.indices] = risk_from_hazard_logits(logits).cpu().numpy()
            details.hazard_logits[batch.indices] = logits.cpu().numpy()
            if details.patches is not None:
                scores = out.token_scores.float().cpu().numpy()
                for index, selection, row in zip(batch.indices, batch.selections, scores, strict=True):
                    details.patches[index] = PatchScores.of(selection, row[: selection.n_tokens])
        return details

    def evaluate(self, cohort: Cohort) -> Evaluation:
        return evaluate_risks(cohort, self.predict(cohort))

    # ---- checkpoints

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (weights, plan, optimizer, rng, DPS bookkeeping)."""
        plan = self.model.consolidation_plan
        return {
            "config": self.config.to_dict(),
            "edges": self.edges.tolist(),
            "plan": plan.to_dict() if plan is not None else None,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "previous_train_cindex": self.previous_train_cindex,
            "head_stats": self.head_stats.to_dict() if self.head_stats is not None else None,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "genomic_scaler": self.genomic_scaler.to_dict(),
            "genomic_layout": self.genomic_layout.to_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state["plan"] is not None and self.model.consolidation_plan is None:
            self.model.apply_consolidation(ConsolidationPlan.from_dict(state["plan"]))
            self.optimizer = self._new_optimizer()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.previous_train_cindex = state["previous_train_cindex"]
        self.head_stats = HeadStats.from_dict(state["head_stats"]) if state["head_stats"] is not None else None
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state.get("step", 0))
        self.genomic_scaler = GenomicScaler.from_dict(state.get("genomic_scaler"))
        if "genomic_layout" in state:
            self.genomic_layout = GenomicLayout.from_dict(state["genomic_layout"])


# --------------------------------------------------------------------------- distributed helpers


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel; buffers (the routing counts) are not synced per forward: each rank counts its own."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def all_reduce_sum(array: np.ndarray, world: int) -> np.ndarray:
    if world == 1:
        return array
    import torch.distributed as dist

    tensor = torch.from_numpy(np.array(array, dtype=np.float64).reshape(-1))
    dist.all_reduce(tensor)
    return tensor.numpy().reshape(np.shape(array))


def gather_epoch(risk: np.ndarray, seen: int, loss_sum: float, world: int) -> tuple[np.ndarray, int, float]:
    """Combine the shards' risks (NaN where a rank did not train a patient), counts and loss sums."""
    if world == 1:
        return risk, seen, loss_sum
    filled = all_reduce_sum(np.nan_to_num(risk, nan=0.0), world)
    totals = all_reduce_sum(np.array([seen, loss_sum], dtype=np.float64), world)
    return filled, int(totals[0]), float(totals[1])


# --------------------------------------------------------------------------- checkpoint files


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """torch.save into a temporary file, then rename (cancermoe.files): a crash never leaves a half-written
    checkpoint."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def consolidation_plan_now(trainer: SiteTrainer) -> ConsolidationPlan | None:
    """The plan from the head statistics gathered so far, or None if ACS is off or none were gathered."""
    stats = trainer.reduced_head_stats()
    if not trainer.config.acs or stats is None or stats.n_samples == 0:
        return None
    return compute_consolidation_plan(stats, trainer.config.consolidation_ratio)
