"""The ClientApp handlers, the strategy and the server Job, run in-process through a Grid stand-in.

Real banks, real MLflow store, real checkpoints; only the transport is replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from mlflow.tracking import MlflowClient

from cancermoe.config import load_config
from cancermoe.model import CancerMoE
from fedcommon.protocol import EvalReport, TimeHistogram, TrainReport, is_allowed_metric_key
from server.app import CHECKPOINT, Job, JobSettings
from server.config import FederationConfig
from server.strategy import CancerMoEStrategy, NotEnoughSites
from server.weights import numpy_to_arrays
from tests.federation_helpers import (
    SMALL_MODEL,
    InProcessGrid,
    grid_of_sites,
    make_message,
    set_task_identity,
    site_context,
    synth_site,
)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sites")
    return {"A": synth_site(root / "A.h5", 1, cancers=("BRCA", "LUAD")),
            "B": synth_site(root / "B.h5", 2, cancers=("LUAD", "KIRC"))}


@pytest.fixture()
def grid(sites, tmp_path) -> InProcessGrid:
    return grid_of_sites(sites, tmp_path)


def configs(**federation):
    model = load_config(overrides=SMALL_MODEL)
    return model, FederationConfig(**{"rounds": 2, "min_sites": 2, "consolidate_round": 1, **federation})


# --------------------------------------------------------------------------- handlers


def test_train_and_evaluate_handlers_reply_with_aggregates_only(grid) -> None:
    model, federation = configs()
    strategy = CancerMoEStrategy(model, federation, edges=np.array([0.0, 10.0, 25.0, 50.0, np.inf]))
    torch.manual_seed(0)
    weights = CancerMoE(model).state_dict()
    train_config = dict(strategy.shared_config(1))
    train_config["local-epochs"] = 1
    reply = grid.send_and_receive([make_message(train_config, "train", numpy_to_arrays(
        {k: v.numpy() for k, v in weights.items()}), node=1)])[0]
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert all(is_allowed_metric_key(k) for k in metrics), sorted(metrics)
    report = TrainReport.from_metrics(metrics)
    assert report.patients > 0 and report.expert_tokens.sum() > 0 and report.head_samples == report.patients
    assert report.genomic_tokens.shape == (model.max_genomic_tokens,) and report.genomic_tokens.sum() > 0
    returned = reply.content["arrays"].to_torch_state_dict()
    assert returned.keys() == weights.keys()
    assert any(not torch.equal(returned[k], weights[k]) for k in weights)  # it trained
    assert reply.content["site"]["site"] == "A"

    eval_config = dict(strategy.shared_config(1))
    eval_config.update(strategy.grid.to_config())
    reply = grid.send_and_receive([make_message(eval_config, "evaluate", reply.content["arrays"], node=2)])[0]
    metrics = dict(reply.content["metrics"])
    assert all(is_allowed_metric_key(k) for k in metrics), sorted(metrics)
    shape = (strategy.grid.n_risk_bins, strategy.grid.n_time_bins, 2)
    evaluation = EvalReport.from_metrics(metrics, shape)
    assert set(evaluation.cancers) == {"LUAD", "KIRC"}
    held = sum(int(c.histogram.sum()) for c in evaluation.cancers.values())
    assert held == evaluation.patients  # every evaluation patient is counted once, and only counts leave


def test_the_strategy_sends_proximal_mu_and_the_site_trains_towards_the_global_weights(grid) -> None:
    """FedProx end to end through the handler: proximal_mu in the FederationConfig reaches the site as proximal-mu,
    and a site told a large mu returns weights nearer the ones it was sent than a site told mu = 0."""
    model, _ = configs()
    torch.manual_seed(0)
    weights = {k: v.numpy() for k, v in CancerMoE(model).state_dict().items()}
    drift = {}
    for mu in (0.0, 10.0):
        strategy = CancerMoEStrategy(model, configs(proximal_mu=mu)[1], edges=np.array([0.0, 10.0, 25.0, 50.0, np.inf]))
        sent = list(strategy.configure_train(1, numpy_to_arrays(weights), None, grid))
        assert sent[0].content["config"]["proximal-mu"] == mu
        reply = grid.send_and_receive(sent[:1])[0]  # the strategy's own message (round 1: the site's DPS snapshot)
        assert not reply.has_error(), reply.error
        returned = reply.content["arrays"].to_torch_state_dict()
        drift[mu] = sum(float(np.sum((returned[k].numpy() - weights[k]) ** 2)) for k in weights)
    assert 0 < drift[10.0] < 0.5 * drift[0.0], drift


def test_the_sites_learning_rate_schedule_spans_the_job_not_each_round(grid) -> None:
    """warmup_fraction and final_lr_ratio reach the sites as a schedule over the whole job (total-rounds): with the
    whole job a warm-up, round 1 of 100 trains at ~1% of lr and moves the weights far less than without a
    schedule; round 100 of 100 (warm-up over) moves them as far as no schedule does."""
    model, _ = configs()
    torch.manual_seed(0)
    weights = {k: v.numpy() for k, v in CancerMoE(model).state_dict().items()}
    strategy = CancerMoEStrategy(model, configs(rounds=100)[1], edges=np.array([0.0, 10.0, 25.0, 50.0, np.inf]))
    sent = list(strategy.configure_train(1, numpy_to_arrays(weights), None, grid))
    assert sent[0].content["config"]["total-rounds"] == 100

    def drift(warmup: float, server_round: int) -> float:
        config = dict(strategy.shared_config(1))
        config.update({"local-epochs": 1, "total-rounds": 100, "server-round": server_round,
                       "cmoe-config": json.dumps(model.replace(warmup_fraction=warmup).to_dict())})
        reply = grid.send_and_receive([make_message(config, "train", numpy_to_arrays(weights), node=1)])[0]
        assert not reply.has_error(), reply.error
        returned = reply.content["arrays"].to_torch_state_dict()
        return sum(float(np.sum((returned[k].numpy() - weights[k]) ** 2)) for k in weights)

    constant, first, last = drift(0.0, 1), drift(1.0, 1), drift(1.0, 100)
    assert 0 < first < 0.05 * constant, (first, constant)
    assert last == pytest.approx(constant, rel=0.2), (last, constant)


def test_time_histogram_query_counts_training_deaths(grid) -> None:
    model, federation = configs()
    strategy = CancerMoEStrategy(model, federation, edges=np.zeros(0))
    strategy.round_zero(grid)
    edges = strategy.edges
    assert edges[0] == 0 and edges[-1] == np.inf and len(edges) == model.n_bins + 1
    assert np.all(np.diff(edges[1:-1]) > 0)
    replies = grid.received
    for reply in replies:
        histogram = TimeHistogram.from_metrics(dict(reply.content["metrics"]))
        assert 0 < histogram.deaths.sum() <= histogram.patients


# --------------------------------------------------------------------------- the job


def run_job(grid: InProcessGrid, workdir: Path, resume: bool = False, **federation) -> Job:
    model, fed = configs(**federation)
    settings = JobSettings(workdir, f"sqlite:///{workdir / 'mlflow.db'}", "test", resume, model, fed)
    job = Job(settings)
    job.run(grid)
    return job


def metric_history(workdir: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_job_logs_cindex_per_cancer_every_round_and_consolidates(grid, tmp_path) -> None:
    job = run_job(grid, tmp_path / "server")
    run_id = job.tracker.run_id
    for cancer in ("BRCA", "LUAD", "KIRC"):
        assert [step for step, _ in metric_history(tmp_path / "server", run_id, f"cindex/{cancer}")] == [1, 2]
    assert [s for s, _ in metric_history(tmp_path / "server", run_id, "cindex/site/A")] == [1, 2]
    assert job.strategy.plan is not None  # consolidated after round 1, the same plan for both sites
    state = torch.load(tmp_path / "server" / CHECKPOINT, weights_only=False)
    assert state["round"] == 2 and state["plan"] == job.strategy.plan.to_dict()
    results = json.loads((tmp_path / "server" / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert (tmp_path / "server" / "figures" / "km_by_cancer.png").stat().st_size > 0
    # Without validation_fraction best.pt can only be chosen on the held-out c-index, and says so.
    heldout = [r["metrics"]["cindex/all"] for r in results["rounds"]]
    assert all("validation_cindex" not in r["metrics"] for r in results["rounds"])
    assert results["best"]["round"] == 1 + int(np.argmax(heldout)) and results["last"]["round"] == 2
    assert results["best"]["chosen"].startswith("best.pt chosen on the held-out c-index: optimistic")
    # Genomics standardized by default: the model carries the pooled scaler the sites used.
    scaler = torch.load(tmp_path / "server" / "model.pt", weights_only=False)["genomic_scaler"]
    assert scaler["mean"] and scaler == job.strategy.genomic_scaler.to_dict()
    # ... and the genomic token layout they trained with: every cancer of the grid at positions of its own.
    layout = torch.load(tmp_path / "server" / "model.pt", weights_only=False)["genomic_layout"]
    assert layout == job.strategy.genomic_layout.to_dict() and set(layout["genes"]) == set(scaler["mean"])


@pytest.mark.slow
class ReversedGrid(InProcessGrid):
    """Replies in the reverse of the order the messages went out: another arrival order, as over a real network."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))


@pytest.mark.slow
def test_the_global_model_does_not_depend_on_the_order_replies_arrive_in(sites, tmp_path) -> None:
    # Three sites: a sum of two floats is the same in either order, a sum of three need not be.
    sites = {**sites, "C": synth_site(tmp_path / "C.h5", 3, cancers=("BRCA", "KIRC"))}
    in_order = run_job(grid_of_sites(sites, tmp_path / "one"), tmp_path / "one" / "server", min_sites=3)
    reversed_grid = ReversedGrid(grid_of_sites(sites, tmp_path / "two").contexts)
    reversed_order = run_job(reversed_grid, tmp_path / "two" / "server", min_sites=3)
    first, second = (torch.load(job.settings.workdir / "model.pt", weights_only=False) for job in (in_order,
                                                                                                    reversed_order))
    assert first["genomic_scaler"] == second["genomic_scaler"] and first["plan"] == second["plan"]
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name


@pytest.mark.fault
def test_a_site_that_does_not_reply_is_left_out_and_rejoins(grid, tmp_path) -> None:
    model, federation = configs(rounds=2, min_sites=1)
    job = Job(JobSettings(tmp_path / "server", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}", "test", False,
                          model, federation))
    original = grid.send_and_receive
    train_rounds = []

    def flaky(messages, *, timeout=None):
        """Site B (node 2) does not answer the first round's training: it dropped, then comes back."""
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            train_rounds.append(True)
        grid.down = {2} if len(train_rounds) == 1 else set()
        return original(messages, timeout=timeout)

    grid.send_and_receive = flaky
    job.run(grid)
    assert job.strategy.records[1].sites_trained == ["A"]
    assert sorted(job.strategy.records[2].sites_trained) == ["A", "B"]


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("server_optimizer", [{}, {"server_momentum": 0.9},
                                              {"server_optimizer": "adam", "server_lr": 0.01}],
                         ids=["fedavg-step", "server-momentum", "fedadam"])
def test_resume_gives_the_same_model_as_an_uninterrupted_job(sites, tmp_path, server_optimizer) -> None:
    """With server momentum or FedAdam the checkpoint must also carry the optimizer's state: without it round 3
    would differ."""
    def fresh_grid(tag: str) -> InProcessGrid:
        set_task_identity()
        return InProcessGrid({i + 1: site_context(i + 1, name, bank, tmp_path / f"{tag}-site-{name}")
                              for i, (name, bank) in enumerate(sites.items())})

    straight = run_job(fresh_grid("straight"), tmp_path / "straight", rounds=3, **server_optimizer)
    grid = fresh_grid("resumed")
    run_job(grid, tmp_path / "resumed", rounds=2, **server_optimizer)  # "interrupted" after round 2
    resumed = run_job(grid, tmp_path / "resumed", resume=True, rounds=3, **server_optimizer)
    for key, value in straight.weights.items():
        np.testing.assert_array_equal(value, resumed.weights[key], err_msg=key)
    steps = [s for s, _ in metric_history(tmp_path / "resumed", resumed.tracker.run_id, "cindex/all")]
    assert steps == [1, 2, 3]  # the same MLflow run continues, no round lost or repeated


@pytest.mark.slow
@pytest.mark.fault
def test_too_few_sites_fails_with_a_clear_message(grid, tmp_path) -> None:
    model, federation = configs(min_sites=3, wait_for_sites=1.0)
    job = Job(JobSettings(tmp_path / "server", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}", "test", False,
                          model, federation))
    with pytest.raises(NotEnoughSites, match="only 2 of the 3 required sites connected within 1 s"):
        job.run(grid)


@pytest.mark.slow
def test_rounds_record_payload_bytes_and_site_training_time(grid, tmp_path) -> None:
    job = run_job(grid, tmp_path / "server", rounds=1)
    metrics = job.strategy.records[1].metrics
    model_bytes = sum(v.nbytes for v in job.weights.values())
    assert metrics["bytes/down"] >= 2 * model_bytes  # the weights went to both sites
    assert metrics["bytes/up"] >= 2 * model_bytes
    assert metrics["seconds/slowest_site_training"] > 0


@pytest.mark.slow
def test_privacy_audit_every_reply_holds_only_weights_and_aggregates(grid, tmp_path) -> None:
    """Record everything the sites send during a whole job: weights under the model's own names, and only
    the metric keys the protocol allows (counts, histograms, sums), never a per-patient array."""
    job = run_job(grid, tmp_path / "server", rounds=2)
    parameter_names = set(job.weights)
    model, _ = configs()
    for name in ("A", "B"):
        entries = [json.loads(line) for line in (tmp_path / f"site-{name}" / "audit.jsonl").read_text().splitlines()]
        assert {e["type"] for e in entries} == {"query", "train", "evaluate"}
        for entry in entries:
            assert entry["refused"] == [] and entry["config"] == ["site", "version"]
            assert all(is_allowed_metric_key(k) for k in entry["metrics"]), entry["metrics"]
            if entry["type"] == "train":
                assert set(entry["arrays"]) <= set(CancerMoE(model).state_dict()) | parameter_names
            else:
                assert entry["arrays"] == {}
    replies = [r for r in grid.received if r.has_content()]
    assert len(replies) == len(grid.sent)  # the audit saw every message that left


@pytest.mark.bad_input
def test_a_reply_with_a_disallowed_key_is_not_sent(tmp_path) -> None:
    from flwr.app import MetricRecord, RecordDict

    from client.audit import DisallowedContent, audit_mod

    set_task_identity()
    context = site_context(1, "A", tmp_path / "A.h5", tmp_path / "site")
    message = make_message({"server-round": 1}, "evaluate")

    def leaky_handler(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"risk-per-patient": [0.1, 0.7, 0.3]})}), reply_to=msg)

    with pytest.raises(DisallowedContent, match="metric risk-per-patient may not leave the site"):
        audit_mod(message, context, leaky_handler)
    entry = json.loads((tmp_path / "site" / "audit.jsonl").read_text().splitlines()[-1])
    assert entry["refused"] == ["metric risk-per-patient"] and entry["round"] == 1
