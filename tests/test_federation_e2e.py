"""End to end over loopback: a real SuperLink (cmoe-server), real SuperNodes (cmoe-client), a real
`mlflow server`; the dashboard's data is read back through MLflow's REST API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cancermoe.cohort import open_cohort
from cancermoe.experiment import load_model
from cancermoe.survival import PairCounts, concordance_counts, harrell_cindex, km_counts, logrank_test_from_counts
from cancermoe.train import load_checkpoint
from client.site import split_site
from fedcommon.federated_eval import uniform_time_edges
from fedcommon.processes import free_port, wait_for_port
from server.config import FederationConfig
from tests.federation_helpers import SMALL_MODEL, synth_site
from tests.process_helpers import BIN, start, stop


def rest(base: str, path: str, body: dict | None = None, **params: str) -> dict:
    """GET with query parameters, or POST ``body`` as JSON (MLflow's search endpoints are POST)."""
    url = f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_mlflow_server(root: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    process = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'dash.db'}",
                     "--default-artifact-root", str(root / "dash-artifacts"), "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"], root / "mlflow.log")
    assert wait_for_port("127.0.0.1", port, timeout=60, process=process), (root / "mlflow.log").read_text()
    return f"http://127.0.0.1:{port}", process


SITES = (("A", 1, ("BRCA", "LUAD")), ("B", 2, ("LUAD", "KIRC")), ("C", 3, ("BRCA", "KIRC")))


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    """One job: a real `mlflow server`, cmoe-server and three cmoe-client sites on loopback, two rounds."""
    root = tmp_path_factory.mktemp("e2e")
    dashboard, mlflow = start_mlflow_server(root)
    banks = {name: synth_site(root / f"{name}.h5", seed, cancers=cancers) for name, seed, cancers in SITES}
    port = free_port()
    sets = [arg for item in [*SMALL_MODEL, "consolidate_round=1"] for arg in ("--set", item)]
    server = start([str(BIN / "cmoe-server"), "--rounds", "2", "--min-sites", "3", "--insecure",
                    "--listen", f"127.0.0.1:{port}", "--workdir", str(root / "server"),
                    "--tracking-uri", dashboard, "--experiment", "e2e", *sets], root / "server.out")
    clients = []
    try:
        assert wait_for_port("127.0.0.1", port, timeout=60, process=server), (root / "server.out").read_text()
        for name, bank in banks.items():
            clients.append(start([str(BIN / "cmoe-client"), "--site", name, "--bank", str(bank), "--superlink",
                                  f"127.0.0.1:{port}", "--insecure", "--workdir", str(root / f"site-{name}")],
                                 root / f"client-{name}.out"))
        code = server.wait(timeout=480)
    finally:
        for process in [server, *clients]:
            stop(process)
    output = (root / "server.out").read_text()
    assert code == 0, output + (root / "server" / "serverapp.log").read_text()[-3000:]
    yield {"root": root, "banks": banks, "dashboard": dashboard, "output": output}
    stop(mlflow)


@pytest.mark.process
def test_three_sites_two_rounds_over_a_real_superlink(federation) -> None:
    root, banks, dashboard, output = (federation[k] for k in ("root", "banks", "dashboard", "output"))
    assert "round   1" in output and "round   2" in output and "dashboard:" in output
    assert "joining" in (root / "client-A.out").read_text()
    # What left each site over the real transport: its audit log (structure only) passed the guard.
    for name in banks:
        entries = [json.loads(line) for line in (root / f"site-{name}" / "audit.jsonl").read_text().splitlines()]
        assert [e["type"] for e in entries].count("train") == 2 and all(e["refused"] == [] for e in entries)

    # What the researchers' dashboard shows, read through the tracking server's REST API.
    experiment = rest(dashboard, "experiments/get-by-name", experiment_name="e2e")["experiment"]
    runs = rest(dashboard, "runs/search", body={"experiment_ids": [experiment["experiment_id"]]})
    parents = [r for r in runs.get("runs", []) if "mlflow.parentRunId" not in
               {t["key"] for t in r["data"].get("tags", [])}]
    assert len(parents) == 1
    run_id = parents[0]["info"]["run_id"]
    for cancer in ("BRCA", "LUAD", "KIRC"):
        for key in (f"cindex/{cancer}", f"cindex_lower/{cancer}", f"cindex_upper/{cancer}",
                    f"eval_events/{cancer}"):
            history = rest(dashboard, "metrics/get-history", run_id=run_id, metric_key=key)
            assert sorted(m["step"] for m in history["metrics"]) == [1, 2], key
    params = {p["key"]: p["value"] for p in parents[0]["data"]["params"]}
    assert params["model.tokens"] == "32" and params["federation.rounds"] == "2"
    site_runs = [r for r in runs["runs"] if r not in parents]
    assert len(site_runs) == 3
    for site_run in site_runs:
        history = rest(dashboard, "metrics/get-history", run_id=site_run["info"]["run_id"], metric_key="eval_events")
        assert sorted(m["step"] for m in history["metrics"]) == [1, 2]


@pytest.mark.process
def test_the_federated_cindex_is_the_central_cindex_of_the_same_patients(federation, tmp_path) -> None:
    """The global model of the last round, scored centrally on the union of the sites' held-out patients:
    the same pair counts, interval and risk groups as the federation reported, and a cross-site c-index
    within its stated binning bound of the pooled one."""
    root, banks = federation["root"], federation["banks"]
    last = json.loads((root / "server" / "results.json").read_text())["rounds"][-1]
    model = root / "server" / "model.pt"
    fed = FederationConfig()
    seed = load_checkpoint(model)["config"]["seed"]
    per_cancer: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for site, bank in banks.items():
        _, held = split_site(open_cohort([bank]), fed.eval_fraction, seed)
        risk = load_model(model, held, tmp_path / site).predict(held)
        for cancer in held.cancer_codes():
            at = held.cancers == cancer
            per_cancer.setdefault(cancer, []).append((risk[at], held.survival_months[at], held.censorship[at]))
    assert sorted(per_cancer) == ["BRCA", "KIRC", "LUAD"]
    everything = PairCounts()
    metrics = last["metrics"]
    for cancer, parts in per_cancer.items():
        stratified = sum((concordance_counts(*part) for part in parts), PairCounts())  # pairs within a site
        everything = everything + stratified
        assert last["pairs"][cancer] == [stratified.concordant, stratified.discordant, stratified.tied_risk]
        assert metrics[f"cindex/{cancer}"] == pytest.approx(stratified.cindex, abs=1e-5)
        lower, upper = stratified.interval()
        assert metrics[f"cindex_lower/{cancer}"] == pytest.approx(lower, abs=1e-5)
        assert metrics[f"cindex_upper/{cancer}"] == pytest.approx(upper, abs=1e-5)
        risk, months, censorship = (np.concatenate(column) for column in zip(*parts, strict=True))
        assert metrics[f"eval_patients/{cancer}"] == len(risk)
        assert metrics[f"eval_events/{cancer}"] == int((censorship == 0).sum())
        pooled = harrell_cindex(risk, months, censorship)  # pairs across sites too
        assert abs(metrics[f"cindex_cross/{cancer}"] - pooled) <= metrics[f"cindex_cross_binning/{cancer}"] + 1e-5
        # The KM risk groups: the same patients, split at the reported threshold.
        km = last["km"][cancer]
        high = risk >= km["threshold"]
        assert (km["n_high"], km["n_low"]) == (int(high.sum()), int((~high).sum()))
        time_edges = uniform_time_edges(fed.eval_time_horizon_months, fed.eval_time_step_months)
        _, p_value = logrank_test_from_counts(km_counts(months[~high], censorship[~high], time_edges),
                                              km_counts(months[high], censorship[high], time_edges))
        assert km["logrank_p"] == pytest.approx(p_value, rel=1e-9)
    assert last["pairs"]["all"] == [everything.concordant, everything.discordant, everything.tied_risk]


@pytest.mark.process
@pytest.mark.bad_input
def test_cli_refusals_are_one_line(tmp_path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], capture_output=True, text=True, timeout=120)

    no_flag = run(str(BIN / "cmoe-server"), "--rounds", "1", "--min-sites", "1", "--workdir", str(tmp_path / "s"))
    assert no_flag.returncode == 2 and no_flag.stderr.count("\n") == 1 and "--insecure" in no_flag.stderr
    unknown = run(str(BIN / "cmoe-server"), "--rounds", "1", "--min-sites", "1", "--insecure",
                  "--workdir", str(tmp_path / "s"), "--set", "colour=blue")
    assert unknown.returncode == 2 and "unknown config key 'colour'" in unknown.stderr
    exposed = run(str(BIN / "cmoe-server"), "--rounds", "1", "--min-sites", "1", "--insecure",
                  "--allow-insecure-remote", "--listen", "0.0.0.0:9092", "--workdir", str(tmp_path / "s"))
    assert exposed.returncode == 2 and exposed.stderr.count("\n") == 1
    assert exposed.stderr.startswith("error: --listen: 0.0.0.0 would expose Flower's unauthenticated control API")
    bad_bank = tmp_path / "bad.h5"
    bad_bank.write_text("nope")
    client = run(str(BIN / "cmoe-client"), "--site", "A", "--bank", str(bad_bank), "--superlink", "127.0.0.1:1",
                 "--insecure")
    assert client.returncode == 2 and client.stderr.strip() == f"error: {bad_bank}: not an HDF5 file"
    assert "Traceback" not in no_flag.stderr + unknown.stderr + exposed.stderr + client.stderr


@pytest.mark.process
def test_tls_and_site_authentication_by_default(tmp_path) -> None:
    """cmoe-certs PKI -> cmoe-server --pki (TLS + registered site keys) -> cmoe-client --ca --key; one round."""
    pki = tmp_path / "pki"
    certs = [sys.executable, "-m", "server.certs_cli"]
    assert subprocess.run([*certs, "init", str(pki), "--host", "coordinator.test"], capture_output=True).returncode == 0
    for site in ("A", "B"):
        assert subprocess.run([*certs, "site", str(pki), site], capture_output=True).returncode == 0
    banks = {name: synth_site(tmp_path / f"{name}.h5", seed) for name, seed in (("A", 1), ("B", 2))}
    port = free_port()
    sets = [arg for item in SMALL_MODEL for arg in ("--set", item)]
    server = start([str(BIN / "cmoe-server"), "--rounds", "1", "--min-sites", "2", "--pki", str(pki),
                    "--listen", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "server"), *sets],
                   tmp_path / "server.out")
    clients = []
    try:
        assert wait_for_port("127.0.0.1", port, timeout=60, process=server), (tmp_path / "server.out").read_text()
        for name, bank in banks.items():
            clients.append(start([str(BIN / "cmoe-client"), "--site", name, "--bank", str(bank), "--superlink",
                                  f"127.0.0.1:{port}", "--ca", str(pki / "ca.pem"),
                                  "--key", str(pki / "sites" / f"{name}.key"),
                                  "--workdir", str(tmp_path / f"site-{name}")], tmp_path / f"client-{name}.out"))
        code = server.wait(timeout=300)
    finally:
        for process in [server, *clients]:
            stop(process)
    output = (tmp_path / "server.out").read_text()
    assert code == 0, output
    assert "registered sites: A, B" in output and "round   1" in output
    results = json.loads((tmp_path / "server" / "results.json").read_text())
    assert sorted(results["rounds"][0]["sites_trained"]) == ["A", "B"]


@pytest.mark.process
@pytest.mark.bad_input
def test_a_wrong_ca_an_unregistered_key_or_another_sites_key_is_refused_with_one_clear_line(tmp_path) -> None:
    certs = [sys.executable, "-m", "server.certs_cli"]
    for folder, site in ((tmp_path / "pki", "A"), (tmp_path / "other", "X")):
        subprocess.run([*certs, "init", str(folder), "--host", "localhost"], capture_output=True, check=True)
        subprocess.run([*certs, "site", str(folder), site], capture_output=True, check=True)
    bank = synth_site(tmp_path / "A.h5", 1, patients=20)
    port = free_port()
    server = start([str(BIN / "cmoe-server"), "--rounds", "1", "--min-sites", "1", "--pki", str(tmp_path / "pki"),
                    "--listen", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "server"),
                    "--set", "wait_for_sites=60"], tmp_path / "server.out")
    try:
        assert wait_for_port("127.0.0.1", port, timeout=60, process=server), (tmp_path / "server.out").read_text()
        cases = {
            "not signed by this --ca": (tmp_path / "other" / "ca.pem", tmp_path / "pki" / "sites" / "A.key"),
            "refused this site's key": (tmp_path / "pki" / "ca.pem", tmp_path / "other" / "sites" / "X.key"),
        }
        for expected, (ca, key) in cases.items():
            client = subprocess.run(
                [str(BIN / "cmoe-client"), "--site", "A", "--bank", str(bank), "--superlink", f"127.0.0.1:{port}",
                 "--ca", str(ca), "--key", str(key), "--workdir", str(tmp_path / f"site-{key.stem}-{ca.parent.name}"),
                 "--max-restarts", "1"], capture_output=True, text=True, timeout=120)
            assert client.returncode == 1
            errors = [line for line in client.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and expected in errors[0], client.stderr
        # Site A's key, started as site B: the coordinator's first message names A; the site stops and says so.
        impostor = subprocess.run(
            [str(BIN / "cmoe-client"), "--site", "B", "--bank", str(bank), "--superlink", f"127.0.0.1:{port}",
             "--ca", str(tmp_path / "pki" / "ca.pem"), "--key", str(tmp_path / "pki" / "sites" / "A.key"),
             "--workdir", str(tmp_path / "site-B"), "--max-restarts", "1"], capture_output=True, text=True,
            timeout=180)
        errors = [line for line in impostor.stderr.splitlines() if line.startswith("error:")]
        assert impostor.returncode == 2 and len(errors) == 1, impostor.stderr
        assert errors[0] == ("error: --site B does not match --key: the coordinator has this key registered as site A "
                             "(use that site's key, or --site=A)")
    finally:
        stop(server)


@pytest.mark.bad_input
def test_insecure_is_refused_off_loopback_and_with_pki(tmp_path) -> None:
    from cancermoe.errors import InputError
    from client.cli import client_security
    from server.cli import check_listen_address, transport_security

    with pytest.raises(InputError, match="unauthenticated control API"):
        check_listen_address("0.0.0.0", expose_control_api=False)
    check_listen_address("0.0.0.0", expose_control_api=True)
    check_listen_address("127.0.0.1", expose_control_api=False)

    with pytest.raises(InputError, match="would expose plain connections"):
        transport_security(None, True, "0.0.0.0", allow_insecure_remote=False)
    assert transport_security(None, True, "0.0.0.0", allow_insecure_remote=True) is None
    with pytest.raises(InputError, match="no --pki folder"):
        transport_security(None, False, "127.0.0.1", allow_insecure_remote=False)
    with pytest.raises(InputError, match="contradicts --pki"):
        transport_security(tmp_path, True, "127.0.0.1", allow_insecure_remote=False)
    with pytest.raises(InputError, match="needs --ca"):
        client_security(None, None, insecure=False)
    with pytest.raises(InputError, match="no such file"):
        client_security(tmp_path / "ca.pem", tmp_path / "A.key", insecure=False)


@pytest.mark.process
@pytest.mark.fault
def test_stopping_the_server_stops_its_superlink(tmp_path) -> None:
    """SIGTERM to cmoe-server (a service manager's stop) must not leave the SuperLink running."""
    port = free_port()
    server = start([str(BIN / "cmoe-server"), "--rounds", "1", "--min-sites", "1", "--insecure",
                    "--listen", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "server"),
                    "--set", "wait_for_sites=60"], tmp_path / "server.out")
    assert wait_for_port("127.0.0.1", port, timeout=60, process=server), (tmp_path / "server.out").read_text()
    stop(server)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and wait_for_port("127.0.0.1", port, timeout=0.5):
        time.sleep(0.5)
    assert not wait_for_port("127.0.0.1", port, timeout=0.5), "the SuperLink outlived cmoe-server"
