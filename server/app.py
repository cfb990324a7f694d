"""The Flower ServerApp: one federated training job, from the first round (or a checkpoint) to the final model.

Started by the SuperLink when `cmoe-server` submits the run. It reads its
settings from the run config (the effective configs as JSON, the work
folder, the tracking URI), runs `CancerMoEStrategy` round by round (one exchange a round: `Job._rounds`),
and after every round logs to MLflow, checkpoints atomically and appends a
progress line that `cmoe-server` prints.

Two models come out: ``model.pt``, the last round's, and ``best.pt``, the
round with the best federated validation c-index (with ``validation_fraction``;
without it, the best held-out c-index, which is optimistic and says so).
``results.json`` reports the held-out c-index of both, each with how it was
chosen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from cancermoe.acs import ConsolidationPlan, HeadStats
from cancermoe.config import CancerMoEConfig
from cancermoe.files import write_text_atomically
from cancermoe.genomics import GenomicLayout, GenomicScaler
from cancermoe.model import CancerMoE
from cancermoe.risk_groups import RISK_GROUP_QUANTILES, RiskGroups
from cancermoe.train import save_checkpoint
from fedcommon.flower_internals import quick_object_pulls
from server import dashboard
from server.config import SITE_NODES, FederationConfig, configs_from_json
from server.exchange import exchange
from server.strategy import CancerMoEStrategy, NotEnoughSites, RoundRecord
from server.tracking import RunTracker
from server.weights import numpy_to_arrays, state_to_numpy

log = logging.getLogger("cmoe.server")
app = ServerApp()

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
FINAL = "model.pt"
PROGRESS = "progress.jsonl"
RESULTS = "results.json"
TRACKED = "tracked-round.txt"  # the last round whose metrics went to MLflow (sent, or in the tracker's disk buffer)


@dataclass(frozen=True)
class JobSettings:
    workdir: Path
    tracking_uri: str
    experiment: str
    resume: bool
    model: CancerMoEConfig
    federation: FederationConfig

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> JobSettings:
        model, federation = configs_from_json(str(run_config["configs"]))
        workdir = Path(str(run_config["workdir"]))
        uri = str(run_config.get("tracking-uri", "")) or f"sqlite:///{workdir / 'mlflow.db'}"
        return cls(workdir, uri, str(run_config.get("experiment", "cancermoe-fl")), bool(run_config.get("resume")),
                   model, federation)


def initial_weights(config: CancerMoEConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(config.seed)
    return {k: v.numpy() for k, v in CancerMoE(config).state_dict().items()}


def flat_params(model: CancerMoEConfig, federation: FederationConfig) -> dict[str, Any]:
    return {**{f"model.{k}": v for k, v in model.to_dict().items()},
            **{f"federation.{k}": v for k, v in federation.to_dict().items()}}


def with_privacy(strategy: CancerMoEStrategy, federation: FederationConfig) -> Strategy:
    """The strategy itself, or wrapped in Flower's central DP with server-side fixed clipping.

    Flower's wrapper clips every reply's update before our aggregation sees it and adds noise calibrated for
    ``min_sites`` sites (conservative when more take part). Its rule, kept: a round in which any site replied
    with an error is not aggregated (the model stays as it was), since the noise assumes every sampled site.
    """
    if not federation.differential_privacy:
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=federation.dp_noise_multiplier,
                                                      clipping_norm=federation.dp_clipping_norm,
                                                      num_sampled_clients=federation.min_sites)


def selection_metric(model: CancerMoEConfig) -> str:
    """The round metric ``best.pt`` is chosen by: the federated validation c-index when the sites keep a
    validation share, else (no honest choice is possible) the held-out c-index."""
    return "validation_cindex" if model.validation_fraction > 0 else "cindex/all"


def selection_protocol(model: CancerMoEConfig) -> str:
    """How ``best.pt`` was chosen, in words (results.json, the console, MLflow)."""
    if model.validation_fraction > 0:
        return (f"best.pt: the round with the best federated validation c-index ({model.validation_fraction:.0%} "
                "of each site's training patients, stratified by cancer and event); held-out patients never "
                "take part")
    return ("best.pt chosen on the held-out c-index: optimistic (no validation_fraction, so the held-out "
            "patients chose the round they are then scored on)")


def server_optimizer_state(checkpoint: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
    """The server optimizer's state in a job checkpoint (checkpoints of 2026-12-06 call it ``server_velocity``)."""
    if not checkpoint:
        return None
    return checkpoint.get("server_optimizer_state", checkpoint.get("server_velocity"))


def registered_sites(workdir: Path) -> dict[int, str]:
    """Node id -> site name of every registered site key (cmoe-server writes it; absent without --pki)."""
    path = workdir / SITE_NODES
    return {int(node): str(site) for node, site in json.loads(path.read_text()).items()} if path.exists() else {}


class Job:
    """Round bookkeeping around the strategy: tracking, checkpoints, progress, final artifacts."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self.workdir = settings.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = self._load_checkpoint() if settings.resume else None
        self.done = int(state["round"]) if state else 0
        self.history: list[dict[str, Any]] = state["history"] if state else []
        self.best = float(state["best"]) if state else -math.inf  # the selection metric of the best round
        self.best_round = int(state.get("best_round", 0)) if state else 0
        self._described_sites: set[str] = set()  # sites whose run got its params from this process
        self.tracker = RunTracker(settings.tracking_uri, settings.experiment, run_name="federated-training",
                                  run_id=state["run_id"] if state else None, buffer_dir=self.workdir)
        if state:
            self._catch_up(state)
        else:
            self.tracker.log_params(flat_params(settings.model, settings.federation))
            (self.workdir / PROGRESS).unlink(missing_ok=True)
            (self.workdir / TRACKED).unlink(missing_ok=True)
        plan = ConsolidationPlan.from_dict(state["plan"]) if state and state["plan"] else None
        stats = HeadStats.from_dict(state["head_stats"]) if state and state["head_stats"] else None
        edges = np.asarray(state["edges"]) if state else np.zeros(0)
        scaler = state.get("genomic_scaler") if state else None
        layout = state.get("genomic_layout") if state else None
        self.strategy = CancerMoEStrategy(settings.model, settings.federation, edges=edges, plan=plan,
                                          head_stats=stats, round_offset=self.done,
                                          registered_sites=registered_sites(self.workdir),
                                          genomic_scaler=GenomicScaler.from_dict(scaler) if scaler is not None
                                          else None,
                                          genomic_layout=GenomicLayout.from_dict(layout) if layout is not None
                                          else None,
                                          server_optimizer_state=server_optimizer_state(state))
        if state:
            self.strategy.risk_edges = np.asarray(state["risk_edges"])
        self.weights = state["weights"] if state else None

    def _load_checkpoint(self) -> dict[str, Any] | None:
        path = self.workdir / CHECKPOINT
        return torch.load(path, weights_only=False) if path.exists() else None

    # ---- the job

    def run(self, grid: Grid) -> None:
        federation = self.settings.federation
        remaining = federation.rounds - self.done
        if remaining <= 0:
            log.info("all %d rounds already done", federation.rounds)
            self.finish()
            return
        if self.strategy.edges.size == 0:
            self.strategy.round_zero(grid)
        weights = self.weights if self.weights is not None else initial_weights(self.settings.model)
        self._rounds(grid, numpy_to_arrays(weights), remaining)
        self.finish()

    def _rounds(self, grid: Grid, arrays: ArrayRecord, rounds: int) -> None:
        """Flower's round loop (`Strategy.start`: configure_train, send, aggregate_train, and after each round
        the job's bookkeeping), with one exchange a round instead of two: round r's training message carries
        round r - 1's model, which each site evaluates before training from it (`CancerMoEStrategy.configure_train`),
        so round r - 1 is evaluated, chosen, checkpointed and reported once round r's replies are in, before round
        r is aggregated (the checkpoint holds the strategy as round r - 1 left it). The last round's model gets an
        evaluate message of its own. Replies are pulled at sub-second intervals (`server.exchange`)."""
        federation = self.settings.federation
        strategy = with_privacy(self.strategy, federation)
        config = ConfigRecord()
        for server_round in range(1, rounds + 1):
            start = time.monotonic()
            replies = exchange(grid, strategy.configure_train(server_round, arrays, config, grid),
                               federation.round_timeout)
            if server_round > 1:
                # Read before aggregation: a DP wrapper that skips aggregating a round must not lose its evaluation.
                self.strategy.aggregate_evaluate(server_round - 1, replies, kind=MessageType.TRAIN)
                self.after_round(server_round - 1, arrays)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                arrays = aggregated
            self.strategy.record(server_round).seconds = time.monotonic() - start
        start = time.monotonic()
        replies = exchange(grid, strategy.configure_evaluate(rounds, arrays, config, grid), federation.round_timeout)
        self.strategy.aggregate_evaluate(rounds, replies)
        self.strategy.record(rounds).metrics["seconds/last_evaluation"] = time.monotonic() - start
        self.after_round(rounds, arrays)

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Round ``server_round`` (of this run) is evaluated: choose, checkpoint, report. ``arrays``: its model."""
        if server_round == 0:
            return None
        record = self.strategy.record(server_round)
        weights = state_to_numpy(arrays)
        self.history.append(_summary(record))
        value = record.metrics.get(selection_metric(self.settings.model), math.nan)
        # A round without a defined score (no comparable pair) never becomes best; the first defined one does.
        improved = math.isfinite(value) and value > self.best
        if improved:
            self.best, self.best_round = value, record.round
            save_checkpoint(self.workdir / BEST, {**self._final_state(weights, record.round), "round": record.round})
        tracking = self._tracking(record, best=improved)
        # The checkpoint is the round's commit point: a coordinator killed before it redoes the round on
        # --resume, one killed after it does not. So the round is reported (progress line, MLflow) only once
        # committed, and `_catch_up` reports what a killed job committed but did not report: each round once.
        save_checkpoint(self.workdir / CHECKPOINT, self._checkpoint(record.round, weights, tracking))
        with open(self.workdir / PROGRESS, "a") as progress:
            progress.write(json.dumps(_summary(record)) + "\n")
        self._send_tracking(record.round, tracking)
        self.weights = weights
        return None

    def _catch_up(self, state: dict[str, Any]) -> None:
        """Resuming after a crash: the progress lines are exactly the checkpointed rounds, and the last one is
        sent to MLflow if the crash came between its checkpoint and its tracking."""
        write_text_atomically(self.workdir / PROGRESS, "".join(json.dumps(row) + "\n" for row in self.history))
        tracked = self.workdir / TRACKED
        tracked_round = int(tracked.read_text()) if tracked.exists() else 0
        if state.get("tracking") is not None and tracked_round < self.done:
            self._send_tracking(self.done, state["tracking"])

    def _tracking(self, record: RoundRecord, best: bool = False) -> dict[str, Any]:
        """What MLflow gets for a round: the job's metrics, each site's metrics (its run's), the params of sites
        not yet described, a tag per excluded site, the run's description, and the ``best.*`` tags when this round
        became the best."""
        metrics = {**record.metrics, "round_seconds": record.seconds, "sites/trained": len(record.sites_trained),
                   "sites/excluded": len(record.excluded), "security_events": len(record.security_events)}
        sites = {site: dict(values) for site, values in sorted(record.site_metrics.items())}
        # A site is described once both halves of a round reported its counts.
        site_params = {site: dashboard.site_params(record.site_versions.get(site), values)
                       for site, values in sites.items()
                       if site not in self._described_sites and {"train_patients", "eval_patients"} <= set(values)}
        self._described_sites.update(site_params)
        tags = {f"{'security_event' if site in record.security_events else 'excluded'}/round_{record.round}/{site}":
                why[:250] for site, why in record.excluded.items()}
        if best:
            tags.update(self._best_tags(record))
        tags[dashboard.DESCRIPTION_TAG] = self._description("running")
        return {"metrics": metrics, "sites": sites, "site_params": site_params, "tags": tags}

    def _description(self, status: str, registered: str | None = None) -> str:
        federation = self.settings.federation
        return dashboard.run_description(
            rounds=federation.rounds, local_epochs=federation.local_epochs, aggregation=federation.aggregation,
            eval_fraction=federation.eval_fraction, history=self.history, status=status,
            selection=selection_protocol(self.settings.model), best_round=self.best_round or None,
            registered=registered)

    def _best_tags(self, record: RoundRecord) -> dict[str, str]:
        heldout = record.metrics.get("cindex/all", math.nan)
        return {"best.round": str(record.round), "best.chosen_on": selection_metric(self.settings.model),
                "best.score": f"{self.best:.4f}", "best.heldout_cindex": f"{heldout:.4f}",
                "best.protocol": selection_protocol(self.settings.model)[:250]}

    def _send_tracking(self, round_number: int, tracking: dict[str, Any]) -> None:
        self.tracker.log_metrics(tracking["metrics"], step=round_number)
        for site, params in tracking.get("site_params", {}).items():
            self.tracker.log_site_params(site, params)
        for site, metrics in tracking["sites"].items():
            self.tracker.log_site_metrics(site, metrics, step=round_number)
        if tracking["tags"]:
            self.tracker.set_tags(tracking["tags"])
        write_text_atomically(self.workdir / TRACKED, str(round_number))

    def _checkpoint(self, round_number: int, weights: dict[str, np.ndarray],
                    tracking: dict[str, Any]) -> dict[str, Any]:
        strategy = self.strategy
        return {
            "round": round_number,
            "weights": weights,
            "plan": strategy.plan.to_dict() if strategy.plan is not None else None,
            "head_stats": strategy.head_stats.to_dict() if strategy.head_stats is not None else None,
            # FedAvgM's velocity or FedAdam's moments (empty for plain FedAvg)
            "server_optimizer_state": strategy.server_optimizer.to_dict(),
            "edges": strategy.edges.tolist(),
            "risk_edges": strategy.risk_edges.tolist(),
            "run_id": self.tracker.run_id,
            "history": self.history,
            "tracking": tracking,  # this round's MLflow items, sent again by a resumed job if they never were
            "best": self.best,
            "best_round": self.best_round,
            "genomic_scaler": strategy.genomic_scaler.to_dict() if strategy.genomic_scaler is not None else None,
            "genomic_layout": strategy.genomic_layout.to_dict() if strategy.genomic_layout is not None else None,
            "configs": {"model": self.settings.model.to_dict(), "federation": self.settings.federation.to_dict()},
        }

    def _final_state(self, weights: dict[str, np.ndarray], round_number: int) -> dict[str, Any]:
        """The same layout as `cmoe-train`'s model.pt: config, time bins, plan, weights, genomic standardization
        (the pooled one the sites trained with; identity without standardize_genomics), and the risk-group
        thresholds of round ``round_number``'s evaluation of this model (from the pooled histogram: counts only)."""
        plan, scaler = self.strategy.plan, self.strategy.genomic_scaler
        thresholds = next((row.get("risk_thresholds") for row in self.history if row["round"] == round_number), None)
        groups = RiskGroups(thresholds, RISK_GROUP_QUANTILES,
                            f"the pooled risk histogram of the sites' held-out patients, round {round_number} "
                            "(federated: counts only)") if thresholds else None
        return {"config": self.settings.model.to_dict(), "edges": self.strategy.edges.tolist(),
                "plan": plan.to_dict() if plan is not None else None,
                "model": {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()},
                "genomic_scaler": (scaler or GenomicScaler()).to_dict(),
                "genomic_layout": (self.strategy.genomic_layout or GenomicLayout()).to_dict(),
                "risk_groups": groups.to_dict() if groups else None}

    def done_round(self) -> int:
        """The last round whose model this job holds (0 before the first)."""
        return max((row["round"] for row in self.history), default=0)

    def chosen_models(self) -> dict[str, Any]:
        """The held-out c-index of the best round's model (best.pt) and of the last round's (model.pt), each
        with the round, its validation c-index (null without validation) and how it was chosen."""
        rows = {row["round"]: row["metrics"] for row in self.history}

        def model(round_number: int, file: str, chosen: str) -> dict[str, Any] | None:
            if round_number not in rows:
                return None
            metrics = rows[round_number]
            return {"round": round_number, "file": file, "chosen": chosen,
                    "heldout_cindex": metrics.get("cindex/all"),
                    "heldout_interval": [metrics.get("cindex_lower/all"), metrics.get("cindex_upper/all")],
                    "validation_cindex": metrics.get("validation_cindex")}

        last = max(rows) if rows else 0
        return {"best": model(self.best_round, BEST, selection_protocol(self.settings.model)),
                "last": model(last, FINAL, "model.pt: the last round's global model (no selection)")}

    def finish(self) -> None:
        if self.weights is not None:
            save_checkpoint(self.workdir / FINAL, self._final_state(self.weights, self.done_round()))
        results = {"rounds": self.history, "selection": selection_protocol(self.settings.model),
                   **self.chosen_models(), "run_id": self.tracker.run_id, "experiment_id": self.tracker.experiment_id,
                   "tracking_uri": self.settings.tracking_uri}
        write_text_atomically(self.workdir / RESULTS, json.dumps(results, indent=2))
        self._artifacts()
        self.tracker.set_tags({dashboard.DESCRIPTION_TAG: self._description("finished")})
        self.tracker.flush()
        registered = self._publish_models()
        if registered is not None:
            self.tracker.set_tags({dashboard.DESCRIPTION_TAG: self._description("finished", registered)})
        self.tracker.finish()

    def _publish_models(self) -> str | None:
        """The best and the last global model as MLflow models in the job run, the best registered with its model
        card (`server.registry`); returns its ``models:/`` URI. A tracking server that is down or refuses costs a
        warning, never the job."""
        from server import registry

        run_id = self.tracker.run_id
        if run_id is None or not (self.workdir / FINAL).exists():
            return None
        try:
            version = registry.publish_federated_models(self, run_id)
        except Exception as exc:  # MLflow raises many kinds; none may cost the job its result, which is on disk
            log.warning("models not logged to MLflow (%s: %s); best.pt and model.pt are in %s",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", self.workdir)
            return None
        log.info("the model is registered as models:/%s/%d", registry.MODEL_NAME, version)
        return f"models:/{registry.MODEL_NAME}/{version}"

    def _artifacts(self) -> None:
        from server import plots

        artifact_folders = {CHECKPOINT: "checkpoints", FINAL: "checkpoints", BEST: "best", RESULTS: None}
        for name, folder in artifact_folders.items():
            if (self.workdir / name).exists():
                self.tracker.log_artifact(self.workdir / name, folder)
        last = self.strategy.records.get(max(self.strategy.records)) if self.strategy.records else None
        figures = self.workdir / "figures"
        figures.mkdir(exist_ok=True)
        if last is not None and last.km:
            title = (f"Held-out patients of every site, round {last.round}: predicted high vs low risk, split at "
                     "each cancer's pooled median risk")
            path = plots.km_plot(plots.km_panels(last.km), figures / "km_by_cancer.png", title=title)
            self.tracker.log_artifact(path, "figures")
        if last is not None and last.expert_tokens is not None:
            path = plots.expert_routing_plot(last.expert_tokens, ["CLS", "WSI", "genomics"],
                                             figures / "expert_routing.png", title=f"round {last.round}")
            self.tracker.log_artifact(path, "figures")
        history: dict[str, list[tuple[int, float]]] = {}
        for row in self.history:
            for key, value in row["metrics"].items():
                if key.startswith("cindex/") and "/site/" not in key and value is not None:
                    history.setdefault(key.split("/", 1)[1], []).append((row["round"], value))
        if history:
            path = plots.cindex_over_rounds_plot(history, figures / "cindex_over_rounds.png")
            self.tracker.log_artifact(path, "figures")


def _summary(record: RoundRecord) -> dict[str, Any]:
    return {
        "round": record.round,
        "seconds": round(record.seconds, 2),
        "sites_trained": record.sites_trained,
        "sites_evaluated": record.sites_evaluated,
        "excluded": record.excluded,
        "metrics": {k: _finite_or_none(round(float(v), 5)) for k, v in record.metrics.items()},
        "pairs": record.pairs,
        "km": {cancer: {k: _finite_or_none(km[k]) for k in ("n_low", "n_high", "threshold", "logrank_p")}
               for cancer, km in record.km.items()},
        "risk_thresholds": record.risk_thresholds,
    }


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined value (no comparable pair, no deaths) is null."""
    return value if math.isfinite(value) else None


FAILURE = "failure.txt"


REPLY_PULLS = "flwr.superlink.grid.http_grid"  # the Grid the SuperLink gives the ServerApp; its object pulls


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = JobSettings.from_run_config(dict(context.run_config))
    # Replies are read as soon as their objects are uploaded, not after Flower's 1-10 s retry backoff.
    quick_object_pulls(REPLY_PULLS)
    try:
        Job(settings).run(grid)
    except NotEnoughSites as exc:
        # cmoe-server prints this one line instead of the ServerApp's traceback.
        write_text_atomically(settings.workdir / FAILURE, str(exc))
        raise
