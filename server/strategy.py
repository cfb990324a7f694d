"""CancerMoE's federated strategy: Flower's FedAvg round structure, our aggregation and schedules.

One concept per method, as in Flower's own FedAvg:

- `round_zero` (before round 1) gathers each site's death-time histogram and,
  with ``standardize_genomics``, its training patients' genomic moments, and
  sets the survival time bins and the pooled genomic standardization.
- `configure_train` sends the global weights plus what every site must agree
  on: the model config, the survival time bins, the genomic standardization,
  the ACS consolidation plan (once decided), the local epochs.
- `aggregate_train` drops the replies `server.admission` refuses (unregistered
  or mismatched sites, error replies, malformed or invalid updates, norm
  outliers; recorded, the checks' failures as security events), then
  aggregates load-aware (experts by tokens routed, attention heads by
  importance, the rest by patients) or plain FedAvg, and at the
  configured round turns the summed head statistics into one consolidation plan
  applied to the global model.
- Evaluation rides in the next round's training message: round r's train
  message carries the global model of round r - 1 with the risk x time grid and
  ``evaluate`` = 1; the site evaluates that model first, then trains from it, and
  its reply carries both (the evaluation as the ``evaluation`` MetricRecord).
  `aggregate_evaluate` sums the sites' counts into per-cancer c-indices
  (site-stratified and cross-site), per site c-indices, and Kaplan-Meier curves
  of high vs low predicted risk; with ``validation_fraction``, also the
  federated validation c-index the job chooses its best round by. Only the
  last round's model gets an evaluate message of its own (`configure_evaluate`).
  So a round is one exchange with the sites (`server.app.Job.run` drives it).

Rounds are numbered from ``round_offset + 1`` so a resumed job continues its
numbering and schedules (Flower restarts at 1).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from cancermoe.acs import ConsolidationPlan, HeadStats, compute_consolidation_plan
from cancermoe.config import CancerMoEConfig
from cancermoe.genomics import GenomicLayout, GenomicMoments, GenomicScaler
from cancermoe.model import MODALITY_CLS, CancerMoE
from cancermoe.risk_groups import RISK_GROUP_QUANTILES
from cancermoe.survival import PairCounts
from fedcommon.federated_eval import (
    RiskGroupCounts,
    RiskTimeGrid,
    binning_error_bound,
    cindex_from_histogram,
    compare_risk_groups,
    hazard_risk_edges,
    pairs_sharing_a_bin,
    quantile_edges_from_histogram,
    risk_grid_per_cancer,
    risk_groups_from_histogram,
    risk_thresholds_from_histogram,
    uniform_time_edges,
)
from fedcommon.protocol import EVALUATE_FLAG, EVALUATION_RECORD, EvalReport, TimeHistogram, TrainReport
from server.admission import ReplyAdmission, exclude, site_name
from server.aggregation import ServerAdam, ServerMomentum, SiteUpdate, aggregate_fedavg, aggregate_load_aware
from server.config import FederationConfig
from server.dashboard import expert_shares, site_evaluation_metrics, site_training_metrics
from server.exchange import exchange
from server.weights import numpy_to_arrays, state_to_numpy

log = logging.getLogger("cmoe.server")
MODALITY_NAMES = ("cls", "wsi", "genomics")  # rows of the routing counts (cancermoe.model.MODALITY_*)


class NotEnoughSites(RuntimeError):
    """Fewer sites than ``min_sites`` connected within ``wait_for_sites`` seconds."""


@dataclass
class RoundRecord:
    """What one round produced, for tracking, checkpoints and the final table."""

    round: int
    sites_trained: list[str] = field(default_factory=list)
    sites_evaluated: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # site -> why its reply was dropped
    security_events: list[str] = field(default_factory=list)  # sites among those whose reply failed a check
    metrics: dict[str, float] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> its own run's metrics
    site_versions: dict[str, str] = field(default_factory=dict)  # site -> the code version its reply names
    km: dict[str, dict] = field(default_factory=dict)  # cancer -> curves, group sizes, threshold, log-rank p
    pairs: dict[str, list[int]] = field(default_factory=dict)  # cancer (and "all") -> site-stratified pair counts
    # cancer -> risk-group thresholds, quantiles of the pooled held-out risk histogram (stored with the model files)
    risk_thresholds: dict[str, list[float]] = field(default_factory=dict)
    expert_tokens: np.ndarray | None = None  # [modalities, experts] summed over sites
    seconds: float = 0.0


def consolidate_weights(config: CancerMoEConfig, weights: dict[str, np.ndarray],
                        plan: ConsolidationPlan) -> dict[str, np.ndarray]:
    """The global weights with the plan's head merges applied (what every site then loads)."""
    model = CancerMoE(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.apply_consolidation(plan)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def wait_for_sites(grid: Grid, min_sites: int, timeout: float) -> list[int]:
    """Node ids once ``min_sites`` are connected; `NotEnoughSites` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < min_sites:
        if time.monotonic() > deadline:
            raise NotEnoughSites(f"only {len(nodes)} of the {min_sites} required sites connected "
                                 f"within {timeout:.0f} s")
        time.sleep(1.0)
    return nodes


def server_optimizer(federation: FederationConfig) -> ServerMomentum | ServerAdam:
    """How the global model takes each round's aggregate (`FederationConfig.server_optimizer`)."""
    if federation.server_optimizer == "adam":
        return ServerAdam(federation.server_lr, federation.server_adam_tau)
    return ServerMomentum(federation.server_lr, federation.server_momentum)


class CancerMoEStrategy(FedAvg):
    def __init__(self, model_config: CancerMoEConfig, federation: FederationConfig, *, edges: np.ndarray,
                 plan: ConsolidationPlan | None = None, head_stats: HeadStats | None = None,
                 round_offset: int = 0, registered_sites: dict[int, str] | None = None,
                 genomic_scaler: GenomicScaler | None = None, genomic_layout: GenomicLayout | None = None,
                 server_optimizer_state: dict[str, np.ndarray] | None = None) -> None:
        super().__init__(min_train_nodes=federation.min_sites, min_evaluate_nodes=federation.min_sites,
                         min_available_nodes=federation.min_sites)
        self.model_config = model_config
        self.federation = federation
        self.edges = np.asarray(edges, dtype=np.float64)
        self.plan = plan
        self.head_stats = head_stats
        # The pooled standardization of every site's training patients (None: genomics as stored)
        self.genomic_scaler = genomic_scaler
        # Where each cancer's genomic tokens sit, set in round 0 from the cancers and gene counts the sites report
        self.genomic_layout = genomic_layout
        self.round_offset = round_offset
        # how the global model takes the sites' aggregate (server lr, momentum or FedAdam); its state is checkpointed
        self.server_optimizer = server_optimizer(federation)
        self.server_optimizer.load(server_optimizer_state)
        # who is who (registered keys, echoed names), what was sent, and which replies may be read
        self.admission = ReplyAdmission(registered_sites)
        # risk = -sum_t S(t) lies in [-n_bins, 0]: the first grid needs nothing from the sites; later
        # grids put equal shares of the pooled patients in each bin (from the summed histograms).
        self.risk_edges = hazard_risk_edges(model_config.n_bins, federation.risk_bins)
        self.records: dict[int, RoundRecord] = {}
        self.current_weights: dict[str, np.ndarray] = {}
        self.grid = self.evaluation_grid()

    # ---- helpers

    def absolute_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def record(self, server_round: int) -> RoundRecord:
        number = self.absolute_round(server_round)
        return self.records.setdefault(number, RoundRecord(number))

    def _messages(self, grid: Grid, arrays: ArrayRecord | None, config: ConfigRecord, kind: str) -> list[Message]:
        """One message per connected site; each tells the site the name its key is registered under, so a site
        started with another --site name can say so to its operator (client.identity)."""
        nodes = wait_for_sites(grid, self.federation.min_sites, self.federation.wait_for_sites)
        messages = []
        for node in nodes:
            content = RecordDict({"config": ConfigRecord({**config, "registered-site":
                                                          self.admission.registered_sites.get(node, "")})})
            if arrays is not None:
                content["arrays"] = arrays
            messages.append(Message(content=content, message_type=kind, dst_node_id=node))
        return messages

    def shared_config(self, server_round: int) -> ConfigRecord:
        """What every site must agree on this round."""
        return ConfigRecord({
            "server-round": self.absolute_round(server_round),
            "cmoe-config": json.dumps(self.model_config.to_dict()),
            "edges": [float(e) for e in self.edges],
            "plan": json.dumps(self.plan.to_dict()) if self.plan is not None else "",
            "genomic-scaler": json.dumps(self.genomic_scaler.to_dict()) if self.genomic_scaler is not None else "",
            "genomic-layout": json.dumps(self.genomic_layout.to_dict()) if self.genomic_layout is not None else "",
            "eval-fraction": float(self.federation.eval_fraction),
            "seed": int(self.model_config.seed),
        })

    # ---- training

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The global weights to train from; from a job's second round on, also the request to evaluate them
        first (they are the previous round's model: `evaluation_request`). A job's first round starts from
        weights that need none (the initial ones, or a resumed job's, evaluated before the checkpoint)."""
        self.current_weights = state_to_numpy(arrays)  # the reference replies are validated against
        shared = self.shared_config(server_round)
        shared["local-epochs"] = int(self.federation.local_epochs)
        shared["proximal-mu"] = float(self.federation.proximal_mu)  # the key Flower's FedProx sends
        shared["total-rounds"] = int(self.federation.rounds)  # the sites' learning-rate schedule spans the job
        if server_round > 1:
            shared.update(self.evaluation_request())
        messages = self._messages(grid, arrays, shared, MessageType.TRAIN)
        self.admission.sent[MessageType.TRAIN] = messages
        self.record(server_round).metrics["bytes/down"] = float(sum(payload_bytes(m.content) for m in messages))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.record(server_round)
        replies = list(replies)
        self.admission.note_silent_sites(record, MessageType.TRAIN, replies, self.federation.round_timeout)
        record.metrics["bytes/up"] = float(sum(payload_bytes(r.content) for r in replies if r.has_content()))
        previous = self.current_weights
        updates, reports = self.admission.admit_updates(
            record, replies, previous, n_experts=self.n_experts, n_layers=self.model_config.n_layers,
            n_heads=self.n_heads, max_update_norm_ratio=self.federation.max_update_norm_ratio)
        for site, why in record.excluded.items():
            log.warning("round %d: reply of site %s excluded: %s", record.round, site, why)
        if not updates:
            log.warning("round %d: no valid training reply; the global model is unchanged", record.round)
            return None, None
        weights = self.server_optimizer.step(previous, self._aggregate(updates, previous))
        self._accumulate_head_stats(reports)
        if (self.model_config.acs and self.plan is None and self.head_stats is not None
                and record.round >= self.federation.consolidate_round and self.head_stats.n_samples > 0):
            self.plan = compute_consolidation_plan(self.head_stats, self.model_config.consolidation_ratio)
            weights = consolidate_weights(self.model_config, weights, self.plan)
            self.server_optimizer.reset()
            log.info("round %d: attention consolidated to %s heads per layer", record.round,
                     [layer.n_clusters for layer in self.plan.layers])
        self.current_weights = weights
        record.sites_trained = [u.site for u in updates]
        tokens = sum(r.expert_tokens for r in reports)
        record.expert_tokens = tokens
        pairs = sum((r.pairs for r in reports), PairCounts())
        patients = sum(r.patients for r in reports)
        record.metrics["loss/train"] = sum(r.loss * r.patients for r in reports) / max(patients, 1)
        record.metrics["seconds/slowest_site_training"] = max(r.seconds for r in reports)
        record.metrics["seconds/slowest_site_work"] = slowest_site_work(replies)
        record.metrics["cindex/train"] = pairs.cindex
        for update, report in zip(updates, reports, strict=True):
            record.metrics[f"train_patients/site/{update.site}"] = float(update.n_patients)
            record.site_metrics.setdefault(update.site, {}).update(site_training_metrics(report))
        total = float(tokens.sum()) or 1.0
        for expert in range(tokens.shape[1]):
            record.metrics[f"expert_load/{expert}"] = float(tokens[:, expert].sum()) / total
        record.metrics.update(expert_shares(tokens, MODALITY_NAMES))
        return numpy_to_arrays(weights), MetricRecord({"num-examples": patients})

    @property
    def n_experts(self) -> int:
        return self.model_config.n_experts if self.model_config.smoe else 1

    @property
    def n_heads(self) -> int:
        return self.plan.layers[0].n_clusters if self.plan is not None else self.model_config.n_heads

    def _aggregate(self, updates: list[SiteUpdate], previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.federation.aggregation == "fedavg":
            return aggregate_fedavg(updates)
        # The survival head reads the CLS token only, so in the last block (the experts') only CLS tokens' expert
        # outputs reach the loss: load-aware-cls weights each expert by those, not by every token routed.
        modalities = (MODALITY_CLS,) if self.federation.aggregation == "load-aware-cls" else None
        return aggregate_load_aware(updates, previous, n_layers=self.model_config.n_layers, n_heads=self.n_heads,
                                    head_dim=self.model_config.d_model // self.model_config.n_heads,
                                    n_experts=self.n_experts, expert_modalities=modalities)

    def _accumulate_head_stats(self, reports: list[TrainReport]) -> None:
        if self.plan is not None:
            return
        for report in reports:
            if report.head_samples == 0:
                continue
            stats = HeadStats(list(report.head_importance), list(report.head_similarity), report.head_samples)
            self.head_stats = stats if self.head_stats is None else self.head_stats + stats

    # ---- evaluation

    def evaluation_grid(self) -> RiskTimeGrid:
        time_edges = uniform_time_edges(self.federation.eval_time_horizon_months, self.federation.eval_time_step_months)
        return RiskTimeGrid(self.risk_edges, time_edges)

    def evaluation_request(self) -> dict[str, Any]:
        """What a message needs for the site to evaluate the weights it carries: this round's risk x time grid."""
        self.grid = self.evaluation_grid()
        return {EVALUATE_FLAG: 1, **self.grid.to_config()}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """An evaluate message of its own: only for the last round's model (the others are evaluated in the
        next round's training message)."""
        shared = self.shared_config(server_round)
        for key, value in self.evaluation_request().items():
            shared[key] = value
        messages = self._messages(grid, arrays, shared, MessageType.EVALUATE)
        self.admission.sent[MessageType.EVALUATE] = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message], *,
                           kind: str = MessageType.EVALUATE) -> MetricRecord | None:
        """The evaluation of round ``server_round``'s model from ``replies``: the ``metrics`` of evaluate replies,
        or (``kind`` = train) the ``evaluation`` record of the next round's training replies."""
        record = self.record(server_round)
        shape = (len(self.grid.risk_edges) - 1, len(self.grid.time_edges) - 1, 2)
        reports: dict[str, EvalReport] = {}
        replies = list(replies)
        self.admission.note_silent_sites(record, kind, replies, self.federation.round_timeout)
        name = "metrics" if kind == MessageType.EVALUATE else EVALUATION_RECORD
        for reply in replies:
            if (site := self.admission.admit(record, reply, "evaluation error")) is None:
                continue
            try:
                reports[site] = EvalReport.from_metrics(dict(reply.content[name]), shape)
            except (KeyError, ValueError, TypeError) as exc:
                exclude(record, site, f"malformed evaluation reply: {exc}", security_event=True)
                continue
            record.site_versions[site] = str(reply.content["site"].get("version", ""))
            record.site_metrics.setdefault(site, {}).update(
                site_evaluation_metrics(reports[site], self.federation.min_eval_events))
        record.sites_evaluated = sorted(reports)
        self._summarise_evaluation(record, reports)
        self._update_risk_grid(reports)
        return MetricRecord({k: v for k, v in record.metrics.items() if math.isfinite(v)})

    def _summarise_evaluation(self, record: RoundRecord, reports: dict[str, EvalReport]) -> None:
        """Per cancer and over all: the site-stratified and the cross-site c-index, each with its 95%
        interval; held-out patients and deaths per cancer and per site, flagged when too few; KM curves."""
        cancers = sorted({c for r in reports.values() for c in r.cancers})
        stratified_all, cross_all = PairCounts(), PairCounts()
        patients_all = deaths_all = 0
        shared_all = 0.0  # pairs the binning may misjudge, over all cancers
        for cancer in cancers:
            parts = [r.cancers[cancer] for r in reports.values() if cancer in r.cancers]
            stratified = sum((p.pairs for p in parts), PairCounts())
            histogram = sum(p.histogram for p in parts)
            cross = cindex_from_histogram(histogram)
            shared = pairs_sharing_a_bin(histogram)
            binning = binning_error_bound(shared, cross.comparable)
            record.metrics.update(cindex_metrics("cindex", cancer, stratified))
            record.metrics.update(cindex_metrics("cindex_cross", cancer, cross, widen=binning))
            record.metrics[f"cindex_cross_binning/{cancer}"] = binning
            shared_all += shared
            patients, deaths = int(histogram.sum()), int(histogram[..., 1].sum())
            record.metrics.update(held_out_metrics(cancer, patients, deaths, self.federation.min_eval_events))
            record.pairs[cancer] = pair_list(stratified)
            stratified_all, cross_all = stratified_all + stratified, cross_all + cross
            patients_all, deaths_all = patients_all + patients, deaths_all + deaths
            if (groups := risk_groups_from_histogram(histogram, self.grid)) is not None:
                record.km[cancer] = km_summary(groups)
            thresholds = risk_thresholds_from_histogram(histogram, self.grid.risk_edges, RISK_GROUP_QUANTILES)
            if thresholds is not None:
                record.risk_thresholds[cancer] = thresholds
        record.metrics.update(cindex_metrics("cindex", "all", stratified_all))
        binning_all = binning_error_bound(shared_all, cross_all.comparable)
        record.metrics.update(cindex_metrics("cindex_cross", "all", cross_all, widen=binning_all))
        record.metrics["cindex_cross_binning/all"] = binning_all
        record.metrics.update(held_out_metrics("all", patients_all, deaths_all, self.federation.min_eval_events))
        record.pairs["all"] = pair_list(stratified_all)
        self._summarise_validation(record, reports)
        for site, report in reports.items():
            pairs = sum((c.pairs for c in report.cancers.values()), PairCounts())
            record.metrics.update(cindex_metrics("cindex", f"site/{site}", pairs))
            site_deaths = 0
            for cancer, part in report.cancers.items():
                patients, deaths = int(part.histogram.sum()), int(part.histogram[..., 1].sum())
                record.metrics[f"eval_patients/site/{site}/{cancer}"] = float(patients)
                record.metrics[f"eval_events/site/{site}/{cancer}"] = float(deaths)
                site_deaths += deaths
            record.metrics.update(held_out_metrics(f"site/{site}", report.patients, site_deaths,
                                                   self.federation.min_eval_events))

    def _summarise_validation(self, record: RoundRecord, reports: dict[str, EvalReport]) -> None:
        """The federated validation c-index (pairs within a site and a cancer, summed over sites): overall as
        ``validation_cindex`` with its interval, per cancer as ``validation_cindex/<cancer>``. Nothing when no
        site holds validation patients."""
        per_cancer: dict[str, PairCounts] = {}
        for report in reports.values():
            for cancer, counts in report.validation.items():
                per_cancer[cancer] = per_cancer.get(cancer, PairCounts()) + counts
        if not per_cancer:
            return
        for cancer, counts in sorted(per_cancer.items()):
            record.metrics.update(cindex_metrics("validation_cindex", cancer, counts))
        total = sum(per_cancer.values(), PairCounts())
        lower, upper = total.interval(0.95)
        record.metrics.update({"validation_cindex": total.cindex, "validation_cindex_lower": lower,
                               "validation_cindex_upper": upper})
        record.pairs["validation"] = pair_list(total)

    def _update_risk_grid(self, reports: dict[str, EvalReport]) -> None:
        """Next round: risk bins of equal pooled shares of each cancer's patients (so each cancer's median and
        tertiles lie near an edge), never coarser than the first round's uniform grid.

        The shares follow this round's risks; the next round's model may move every risk of a cancer
        outside them (into one bin: no cross-site pair, no risk groups). Keeping the uniform edges too
        bounds a bin's width by (risk range) / ``risk_bins`` wherever the risks go.
        """
        per_cancer: dict[str, np.ndarray] = {}
        for report in reports.values():
            for cancer, part in report.cancers.items():
                per_cancer[cancer] = per_cancer.get(cancer, 0) + part.histogram.sum(axis=(1, 2))
        if any(np.any(counts) for counts in per_cancer.values()):
            shares = risk_grid_per_cancer(per_cancer, self.grid.risk_edges, self.federation.risk_bins)
            self.risk_edges = np.union1d(shares, hazard_risk_edges(self.model_config.n_bins, self.federation.risk_bins))

    # ---- round 0

    def round_zero(self, grid: Grid) -> None:
        """Sets the global survival time bins (`edges`) from the sites' death-time histograms and, with
        ``standardize_genomics``, the pooled genomic standardization (`genomic_scaler`) from the sums of their
        training patients' genomic moments. No patient's time or genomic value leaves a site."""
        fine = uniform_time_edges(self.federation.time_grid_max_months, self.federation.time_grid_months)
        config = ConfigRecord({"time-edges": [float(e) for e in fine],
                               "cmoe-config": json.dumps(self.model_config.to_dict()),
                               "eval-fraction": float(self.federation.eval_fraction),
                               "seed": int(self.model_config.seed)})
        self.admission.sent[MessageType.QUERY] = self._messages(grid, None, config, MessageType.QUERY)
        replies = exchange(grid, self.admission.sent[MessageType.QUERY], self.federation.round_timeout)
        total = np.zeros(len(fine) - 1, dtype=np.int64)
        moments = GenomicMoments()
        first_round = self.record(1)  # round 0 prepares round 1: who failed it is reported with round 1
        # Summed in site order, not arrival order, so the pooled statistics (floats) are the same every run.
        for reply in sorted(replies, key=site_name):
            # Admitting a reply also learns its node's site name, for naming that node's error replies later.
            if (site := self.admission.admit(first_round, reply, "error reply")) is None:
                continue
            try:
                histogram = TimeHistogram.from_metrics(dict(reply.content["metrics"]))
                if histogram.deaths.shape != total.shape:
                    raise ValueError(f"{histogram.deaths.size} time bins, expected {total.size}")
                pooled = moments + histogram.genomics
            except (KeyError, ValueError, TypeError) as exc:
                exclude(first_round, site, f"malformed round-0 reply: {exc}", security_event=True)
                continue
            total += histogram.deaths
            moments = pooled
        if total.sum() == 0:
            raise RuntimeError("no site reported an observed death: survival time bins cannot be set")
        self.edges = quantile_edges_from_histogram(total, fine, self.model_config.n_bins)
        if self.model_config.genomics_by_cancer:
            self.genomic_layout = GenomicLayout.of_moments(moments, self.model_config.genomic_piece)
            self.genomic_layout.check_fits(self.model_config.max_genomic_tokens)
        if self.model_config.standardize_genomics:
            self.genomic_scaler = moments.scaler()
            log.info("genomics standardized with the pooled training patients of %s",
                     ", ".join(f"{c} ({n})" for c, n in sorted(moments.patients.items())) or "no cancer")


def slowest_site_work(replies: Iterable[Message]) -> float:
    """The longest local work among the training replies of one exchange: each site's wall time for the whole
    message (``work-seconds``: the evaluation of the previous model when asked, the training, their setup)."""
    return max([float(reply.content["metrics"].get("work-seconds", 0.0)) for reply in replies
                if reply.has_content() and "metrics" in reply.content] or [0.0])


def cindex_metrics(prefix: str, group: str, counts: PairCounts, widen: float = 0.0) -> dict[str, float]:
    """``{prefix}/{group}`` and its 95% interval as ``{prefix}_lower/{group}``, ``{prefix}_upper/{group}``.

    ``widen``: a bound on the value's own error (the cross-site c-index's binning), added on both
    sides so the interval covers the exact c-index of the same patients too (clipped to [0, 1]).
    """
    lower, upper = counts.interval(0.95)
    if widen > 0 and math.isfinite(lower):
        lower, upper = max(0.0, lower - widen), min(1.0, upper + widen)
    return {f"{prefix}/{group}": counts.cindex, f"{prefix}_lower/{group}": lower, f"{prefix}_upper/{group}": upper}


def held_out_metrics(group: str, patients: int, deaths: int, min_events: int) -> dict[str, float]:
    """How many held-out patients and deaths a c-index rests on; ``few_events`` = 1.0 below ``min_events`` deaths."""
    return {f"eval_patients/{group}": float(patients), f"eval_events/{group}": float(deaths),
            f"few_events/{group}": float(deaths < min_events)}


def km_summary(groups: RiskGroupCounts) -> dict[str, Any]:
    """Curves, group sizes, the risk threshold and the log-rank p-value of one cancer's risk groups."""
    comparison = compare_risk_groups(groups)
    counts = {name: {"at_risk": c.at_risk.tolist(), "deaths": c.deaths.tolist(), "censored": c.censored.tolist()}
              for name, c in (("high", groups.high), ("low", groups.low))}
    return {"edges": comparison.edges.tolist(), "high": comparison.high_survival.tolist(),
            "low": comparison.low_survival.tolist(), "logrank_p": comparison.p_value,
            "n_high": comparison.n_high, "n_low": comparison.n_low, "threshold": groups.threshold,
            "counts": counts}


def pair_list(counts: PairCounts) -> list[int]:
    """[concordant, discordant, tied_risk]: the integers a c-index is computed from, kept with the round."""
    return [counts.concordant, counts.discordant, counts.tied_risk]


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays plus 8 per metric/config value: what the wire carries, give or take framing."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += 8 * sum(len(v) if isinstance(v, list) else 1 for v in record.values())
    return total
