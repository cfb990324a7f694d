"""cmoe-simulate: virtual sites (banks, or one synthetic world split into non-IID sites), the ClientApp behind
each partition id, one-line refusals, and the whole job on Flower's Ray simulation with MLflow tracking."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from cancermoe.bank import open_bank
from cancermoe.cli.common import run_app
from cancermoe.config import CancerMoEConfig
from cancermoe.synthetic import SynthSpec, draw_cohort, synthesize_bank
from simulate.cli import cli
from simulate.engine import RayResources, VirtualSiteApp
from simulate.sites import WorldSplit, bank_sites, write_world_banks
from tests.federation_helpers import SMALL_MODEL, set_task_identity, synth_site

SMALL_WORLD = ["--patients-per-site", "30", "--patches", "30", "--feature-dim", "16", "--genomic-features", "8"]


# --------------------------------------------------------------------------- the virtual sites


def test_a_cancer_mix_decides_the_cancers_and_no_mix_draws_as_before() -> None:
    base = SynthSpec(site="A", patients=200, cancers=("BRCA", "KIRC", "LUAD"), patches=10, feature_dim=4,
                     genomic_features=8, seed=3)
    only_kirc = draw_cohort(base.__class__(**{**base.__dict__, "cancer_mix": (0.0, 1.0, 0.0)}))
    assert {p.cancer for p in only_kirc} == {"KIRC"}
    mostly_brca = draw_cohort(base.__class__(**{**base.__dict__, "cancer_mix": (0.9, 0.05, 0.05)}))
    assert sum(p.cancer == "BRCA" for p in mostly_brca) > 150
    # A spec without a mix keeps its JSON (stored in every synthetic bank) and its patients.
    assert "cancer_mix" not in json.loads(base.to_json())
    uniform = draw_cohort(base)
    assert 50 < sum(p.cancer == "BRCA" for p in uniform) < 85


def test_a_world_split_is_seeded_non_iid_and_of_varying_sizes() -> None:
    split = WorldSplit(sites=40, alpha=0.3, mean_patients=40, size_sd=0.6, min_patients=12, seed=5)
    sizes, mixes = split.draw()
    again_sizes, again_mixes = split.draw()
    assert np.array_equal(sizes, again_sizes) and np.array_equal(mixes, again_mixes)
    assert sizes.min() >= 12 and sizes.max() > 2 * np.median(sizes) > 0  # sizes vary, none below the floor
    assert np.allclose(mixes.sum(axis=1), 1.0)
    # alpha 0.3: most sites are dominated by one cancer; alpha 100: every site has about the world's mix
    assert np.median(mixes.max(axis=1)) > 0.6
    even = WorldSplit(sites=40, alpha=100.0, seed=5).draw()[1]
    assert even.max() < 0.5 and even.min() > 0.2
    specs = split.specs()
    assert [s.site for s in specs] == [f"S{i:02d}" for i in range(40)]
    assert len({s.seed for s in specs}) == 40 and {s.world_seed for s in specs} == {0}  # one world, own patients
    assert WorldSplit(sites=40, alpha=0.3, seed=6).draw()[0].tolist() != sizes.tolist()


def test_world_banks_hold_each_sites_mix_and_are_reused(tmp_path) -> None:
    split = WorldSplit(sites=4, alpha=0.2, mean_patients=30, patches=20, feature_dim=8, genomic_features=8, seed=1)
    sites = write_world_banks(split, tmp_path / "banks", tmp_path)
    sizes, mixes = split.draw()
    for site, size, mix in zip(sites, sizes, mixes, strict=True):
        with open_bank(site.bank) as bank:
            assert len(bank) == size and bank.attrs["site"] == site.name
            dominant = split.cancers[int(np.argmax(mix))]
            counts = {c: sum(p.cancer == c for p in bank.patients) for c in split.cancers}
            if mix.max() > 0.8:  # a site of (nearly) one cancer holds mostly that cancer
                assert counts[dominant] >= 0.6 * size, (site.name, mix, counts)
    stamp = sites[0].bank.stat().st_mtime_ns
    assert write_world_banks(split, tmp_path / "banks", tmp_path) == sites
    assert sites[0].bank.stat().st_mtime_ns == stamp  # the same spec's bank is not rewritten
    other = WorldSplit(sites=4, alpha=5.0, mean_patients=30, patches=20, feature_dim=8, genomic_features=8, seed=1)
    with pytest.raises(Exception, match="another site's bank"):
        write_world_banks(other, tmp_path / "banks", tmp_path)


def test_the_virtual_site_app_runs_the_clientapp_as_the_site_of_its_partition(tmp_path) -> None:
    """Flower's simulation names a node only by its partition id: the reply must come from that site's bank."""
    banks = [synth_site(tmp_path / f"{name}.h5", seed=k + 1, patients=30) for k, name in enumerate(["H1", "H2"])]
    sites = bank_sites(banks, tmp_path / "job")
    app = VirtualSiteApp(sites, device="cpu")
    set_task_identity()
    config = CancerMoEConfig(feature_dim=16, tokens=32)
    edges = np.arange(0.0, 600.5, 0.5)
    replies = {}
    for partition in (1, 0):
        sites[partition].workdir.mkdir(parents=True)
        message = Message(content=RecordDict({"config": ConfigRecord({
            "time-edges": edges.tolist(), "cmoe-config": json.dumps(config.to_dict()), "eval-fraction": 0.2,
            "seed": 0, "registered-site": ""})}), message_type="query", dst_node_id=partition + 7)
        context = Context(run_id=1, node_id=partition + 7, node_config={"partition-id": partition,
                                                                         "num-partitions": 2},
                          state=RecordDict(), run_config={})
        reply = app(message, context)
        assert not reply.has_error(), reply.error
        replies[partition] = reply
        assert context.node_config["site"] == sites[partition].name
        assert (sites[partition].workdir / "audit.jsonl").exists()  # the ClientApp's mods ran, at that site
    assert [str(replies[p].content["site"]["site"]) for p in (0, 1)] == ["H1", "H2"]
    # each reply counts its own site's training patients (the two banks differ in who is in them)
    with open_bank(banks[0]) as first, open_bank(banks[1]) as second:
        sizes = [len(first), len(second)]
    patients = [int(replies[p].content["metrics"]["num-examples"]) for p in (0, 1)]
    assert all(0 < n < size for n, size in zip(patients, sizes, strict=True)), (patients, sizes)
    with pytest.raises(RuntimeError, match="partition-id 2"):
        app.node_config(2)


def test_ray_resources_ask_for_fractions_and_leave_an_existing_cluster_its_own() -> None:
    local = RayResources(cpus=2, cpus_per_site=0.5).backend_config()
    assert local["init_args"]["num_cpus"] == 2 and local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    cluster = RayResources(address="10.0.0.5:6379", cpus_per_site=0.25).backend_config()
    assert cluster["init_args"] == {"address": "10.0.0.5:6379"}


# --------------------------------------------------------------------------- refusals: one line, exit 2, no Ray


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        run_app(cli, list(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.bad_input
def test_bad_simulations_are_one_line_refusals(tmp_path, capsys) -> None:
    work = ["--workdir", str(tmp_path / "job")]
    a = synth_site(tmp_path / "A.h5", seed=1, patients=20)
    assert "not both" in refused(capsys, str(a), "--sites", "3", *work)
    assert "no sites" in refused(capsys, *work)
    assert "more than the 3 sites" in refused(capsys, "--sites", "3", "--min-sites", "4", *work)
    assert "alpha" in refused(capsys, "--sites", "3", "--alpha", "0", *work)
    assert "--cpus-per-site" in refused(capsys, "--sites", "3", "--cpus", "1", "--cpus-per-site", "2", *work)
    port = closed_port()
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in refused(
        capsys, "--sites", "3", "--ray-address", f"127.0.0.1:{port}", *work)
    assert "not HOST:PORT" in refused(capsys, "--sites", "3", "--ray-address", "nowhere", *work)
    assert "missing.h5" in refused(capsys, str(tmp_path / "missing.h5"), *work)
    twin = synthesize_bank(tmp_path / "twin.h5", SynthSpec(site="A", patients=20, patches=20, feature_dim=16,
                                                           genomic_features=8))
    assert "is site 'A' again" in refused(capsys, str(a), str(twin), *work)
    wide = synthesize_bank(tmp_path / "wide.h5", SynthSpec(site="W", patients=20, patches=20, feature_dim=32,
                                                           genomic_features=8))
    assert "feature dimension 32" in refused(capsys, str(a), str(wide), *work)
    assert "does not match the banks' 16" in refused(capsys, str(a), "--set", "feature_dim=8", *work)
    assert "unknown config key" in refused(capsys, str(a), "--set", "tokns=3", *work)
    assert "contradicts --force" in refused(capsys, str(a), "--resume", "--force", *work)
    assert not (tmp_path / "job").exists()  # every refusal came before anything was written
    (tmp_path / "job").mkdir()
    assert "no checkpoint to resume from" in refused(capsys, str(a), "--resume", *work)


@pytest.mark.bad_input
def test_without_the_simulation_extra_it_says_what_to_install(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("simulate.cli.ray_installed", lambda: False)
    assert "pip install 'cancermoe-fl[simulation]'" in refused(capsys, "--sites", "3", "--workdir", str(tmp_path))


# --------------------------------------------------------------------------- the whole job on Ray


def run_simulate(*argv: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    command = [sys.executable, "-c", "from simulate.cli import main; main()", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def mlflow_metrics(uri: str) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """Every metric of the job's run: name -> [(step, value)], and the run's tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cancermoe-fl")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'federated-training'")
    assert len(runs) == 1
    run = runs[0]
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
               for key in run.data.metrics}
    return history, run.data.tags


@pytest.mark.process
def test_cmoe_simulate_runs_the_federated_job_on_ray_with_mlflow_metrics_per_cancer(tmp_path) -> None:
    workdir = tmp_path / "sim"
    done = run_simulate("--sites", "3", "--rounds", "2", "--alpha", "0.5", "--cpus", "2", "--cpus-per-site", "1",
                        "--workdir", str(workdir), *SMALL_WORLD, *[f"--set={s}" for s in SMALL_MODEL])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = done.stdout
    assert "3 virtual sites" in out and "local Ray, 2.0 CPUs" in out
    assert "round   1" in out and "round   2" in out and "s per site-round" in out
    sites = json.loads((workdir / "sites.json").read_text())["sites"]
    assert [s["site"] for s in sites] == ["S0", "S1", "S2"]
    mixes = [tuple(sorted(s["patients"])) for s in sites]
    assert len(set(mixes)) > 1 or len({sum(s["patients"].values()) for s in sites}) > 1  # not three copies

    rounds = [json.loads(line) for line in (workdir / "progress.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["sites_trained"]) == ["S0", "S1", "S2"] and not r["excluded"] for r in rounds), rounds
    held_out_cancers = {k.split("/")[1] for k in rounds[-1]["metrics"]
                        if k.startswith("eval_patients/") and k.count("/") == 1 and k != "eval_patients/all"}
    assert held_out_cancers, rounds[-1]["metrics"]

    history, tags = mlflow_metrics(f"sqlite:///{workdir / 'mlflow.db'}")
    for cancer in held_out_cancers:  # the same per-cancer metrics a real federation logs, every round
        for name in (f"cindex/{cancer}", f"eval_patients/{cancer}", f"cindex_cross/{cancer}"):
            assert [step for step, _ in history[name]] == [1, 2], (name, sorted(history))
        assert history[f"eval_patients/{cancer}"][-1][1] == rounds[-1]["metrics"][f"eval_patients/{cancer}"]
    for site in ("S0", "S1", "S2"):
        assert [step for step, _ in history[f"train_patients/site/{site}"]] == [1, 2]
    assert "best.round" in tags
    assert (workdir / "model.pt").exists() and (workdir / "best.pt").exists()
    assert all((workdir / "sites" / s / "audit.jsonl").exists() for s in ("S0", "S1", "S2"))

    # --resume: one more round of the same job, in the same MLflow run; other sites are refused
    world = ["--sites", "3", "--alpha", "0.5", "--cpus", "2", "--workdir", str(workdir), *SMALL_WORLD,
             *[f"--set={s}" for s in SMALL_MODEL]]
    other = run_simulate(*world, "--split-seed", "1", "--resume", "--rounds", "3")
    assert other.returncode == 2 and "ran on other sites" in other.stderr, other.stderr[-2000:]
    more = run_simulate(*world, "--resume", "--rounds", "3")
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-4000:]
    assert "3 sites x 1 rounds" in more.stdout  # the timing counts this run's round only
    rounds = [json.loads(line) for line in (workdir / "progress.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    history, _ = mlflow_metrics(f"sqlite:///{workdir / 'mlflow.db'}")  # still one run
    for cancer in held_out_cancers:
        assert [step for step, _ in history[f"cindex/{cancer}"]] == [1, 2, 3]


@pytest.mark.process
def test_cmoe_simulate_joins_an_existing_ray_cluster(tmp_path) -> None:
    """--ray-address: the job runs on a Ray cluster this test started (and stops), not on a Ray of its own."""
    ray = pytest.importorskip("ray")
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
                       namespace="cmoe-test")
    try:
        address = context.address_info["gcs_address"]
        banks = [synth_site(tmp_path / f"{name}.h5", seed=k + 1, patients=30) for k, name in enumerate("AB")]
        done = run_simulate(*map(str, banks), "--rounds", "1", "--ray-address", address, "--cpus-per-site", "0.5",
                            "--workdir", str(tmp_path / "sim"), *[f"--set={s}" for s in SMALL_MODEL])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert f"Ray cluster {address}" in done.stdout
        rounds = [json.loads(line) for line in (tmp_path / "sim" / "progress.jsonl").read_text().splitlines()]
        assert sorted(rounds[0]["sites_trained"]) == ["A", "B"]
        # The cluster saw the simulation's driver as a job of its own (besides this test's).
        from ray._private import state

        assert len(state.jobs()) >= 2
    finally:
        ray.shutdown()


@pytest.mark.process
def test_bench_simulation_prints_seconds_per_site_round(tmp_path) -> None:
    """bench/simulation.py still runs (tiny: 2 sites, 1 round); the full-size command is in its docstring."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "simulation.py"
    done = subprocess.run([sys.executable, str(bench), "--sites", "2", "--rounds", "1", "--patients-per-site", "16",
                           "--patches", "10", "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=420, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    row = re.search(r"^\| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ / [\d.]+ \|$",
                    done.stdout, re.MULTILINE)
    assert row, done.stdout
    wall, before, rounds, after, per_site_round = map(float, row.groups())
    assert abs(before + rounds + after - wall) < 0.5 and per_site_round == pytest.approx(rounds / 2, abs=0.03)
