"""Fault tolerance over loopback with real processes: a real `cmoe-server` (SuperLink + ServerApp) and three
real `cmoe-client`s (SuperNode + ClientApps), each broken the way a hospital network breaks them.

- A site killed mid-round (a machine crash: every process of it, SIGKILL): the round completes with the other
  sites, the site is recorded as missing for it, and once restarted it trains again.
- The coordinator killed mid-job (SuperLink, ServerApp and `cmoe-server`, SIGKILL) and restarted with
  ``--resume``: every round exactly once, in one MLflow run.
- A site whose patch bank breaks while it runs: its operator gets one clear line naming the file, the
  coordinator records the site as failed and the job goes on without it.
- A site whose coordinator cannot be reached: one line naming the address, within --connect-timeout.

Every wait is on something observable (a port, a line in a file); the timeouts are only ceilings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cancermoe.config import load_config
from cancermoe.errors import InputError
from cancermoe.model import CancerMoE
from client.cli import wait_for_coordinator
from client.site import unreadable_bank
from fedcommon.processes import free_port, wait_for_port
from server.app import CHECKPOINT, Job, JobSettings
from server.config import FederationConfig
from server.strategy import CancerMoEStrategy
from server.weights import numpy_to_arrays
from tests.federation_helpers import (
    SMALL_MODEL,
    InProcessGrid,
    make_message,
    set_task_identity,
    site_context,
    synth_site,
)
from tests.process_helpers import BIN, crash, start, stop

SITES = {"A": (1, ("BRCA", "LUAD")), "B": (2, ("LUAD", "KIRC")), "C": (3, ("BRCA", "KIRC"))}
PATIENTS = 30
# A SIGKILLed SuperNode is declared offline by the SuperLink after two missed 30 s heartbeats (Flower's fixed
# HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL); the round timeout is only a ceiling above that.
ROUND_TIMEOUT_S = 150
WAIT_S = 300  # ceiling on any one wait below; a loaded 2-core CI machine is slow, never this slow


def wait_for(condition: Callable[[], bool], what: str, logs: list[Path], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{_tail(log)}" for log in logs)
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.2)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no file)"


def jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file another process appends to (a half-written last line is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Federation:
    """One job in ``root``: the coordinator's folder, the sites' banks and folders, the processes' outputs."""

    def __init__(self, root: Path, sites: list[str], rounds: int, min_sites: int) -> None:
        self.root = root
        self.rounds = rounds
        self.min_sites = min_sites
        self.port = free_port()
        self.workdir = root / "server"
        self.banks = {name: synth_site(root / f"{name}.h5", SITES[name][0], patients=PATIENTS, cancers=SITES[name][1])
                      for name in sites}
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}

    @property
    def server_out(self) -> Path:
        return self.root / "server.out"

    def client_out(self, site: str) -> Path:
        return self.root / f"client-{site}.out"

    def site_dir(self, site: str) -> Path:
        return self.root / f"site-{site}"

    @property
    def logs(self) -> list[Path]:
        return [self.server_out, *(self.client_out(s) for s in self.clients), self.workdir / "superlink.log"]

    def start_server(self, *extra: str) -> None:
        sets = [arg for item in [*SMALL_MODEL, f"round_timeout={ROUND_TIMEOUT_S}", f"wait_for_sites={WAIT_S}"]
                for arg in ("--set", item)]
        self.server = start([str(BIN / "cmoe-server"), "--rounds", str(self.rounds), "--min-sites",
                             str(self.min_sites), "--insecure", "--listen", f"127.0.0.1:{self.port}", "--workdir",
                             str(self.workdir), *sets, *extra], self.server_out)
        assert wait_for_port("127.0.0.1", self.port, timeout=WAIT_S, process=self.server), _tail(self.server_out)

    def start_everyone(self) -> None:
        """The coordinator, then every site of the federation."""
        self.start_server()
        for site in self.banks:
            self.start_client(site)

    def start_client(self, site: str) -> None:
        """A site's cmoe-client; started again, it keeps its work folder (its DPS cache, its logs)."""
        self.clients[site] = start([str(BIN / "cmoe-client"), "--site", site, "--bank", str(self.banks[site]),
                                    "--superlink", f"127.0.0.1:{self.port}", "--insecure",
                                    "--workdir", str(self.site_dir(site))], self.client_out(site))

    def wait_server(self) -> int:
        deadline = time.monotonic() + 4 * WAIT_S
        while self.server.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("cmoe-server did not finish\n" + "\n".join(f"--- {p}\n{_tail(p)}" for p in self.logs))
            time.sleep(0.5)
        return self.server.returncode

    def progress(self) -> list[dict]:
        return jsonl(self.workdir / "progress.jsonl")

    def audit(self, site: str) -> list[dict]:
        return jsonl(self.site_dir(site) / "audit.jsonl")

    def supernode_log(self, site: str) -> str:
        path = self.site_dir(site) / "supernode.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def results(self) -> dict:
        return json.loads((self.workdir / "results.json").read_text())

    def close(self) -> None:
        for process in [self.server, *self.clients.values()]:
            if process is not None:
                stop(process)


@pytest.fixture()
def federation(tmp_path):
    made: list[Federation] = []

    def make(sites: list[str], rounds: int, min_sites: int) -> Federation:
        made.append(Federation(tmp_path, sites, rounds, min_sites))
        return made[-1]

    yield make
    for job in made:
        job.close()


# --------------------------------------------------------------------------- real processes


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.fault
def test_a_site_killed_mid_round_is_left_out_and_rejoins_after_a_restart(federation) -> None:
    """min_sites=3: every round starts with all three sites connected, so site C is sure to be in round 1."""
    job = federation(["A", "B", "C"], rounds=2, min_sites=3)
    job.start_everyone()
    # Site C has its round-1 training message: its ClientApp is starting, its reply is seconds away.
    wait_for(lambda: "Receiving: train message" in job.supernode_log("C"), "site C to receive round 1", job.logs)
    crash(job.clients["C"])
    assert not [e for e in job.audit("C") if e["type"] == "train"], "site C replied before it was killed"
    job.start_client("C")

    assert job.wait_server() == 0, _tail(job.server_out, 60)
    first, second = job.results()["rounds"]
    assert sorted(first["sites_trained"]) == ["A", "B"], first  # the round completed with the others
    assert "C" in first["excluded"], first  # ... and says which site was missing
    assert sorted(second["sites_trained"]) == ["A", "B", "C"], second  # the restarted site trained again
    assert [e["round"] for e in job.audit("C") if e["type"] == "train"] == [2]
    assert job.clients["C"].poll() is None, _tail(job.client_out("C"))  # the restarted client runs on


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.fault
def test_the_coordinator_killed_and_resumed_loses_and_repeats_no_round(federation) -> None:
    job = federation(["A", "B"], rounds=3, min_sites=2)
    job.start_everyone()
    # Round 1 is committed and both sites are working on round 3 (each has its round-3 message in full). Round r is
    # evaluated in round r + 1's message, so the coordinator commits round 1 once round 2's replies are in, before
    # it sends round 3; round 2 waits for round 3's replies.
    wait_for(lambda: all((job.site_dir(s) / "snapshots" / "round-00003").exists() for s in ("A", "B")),
             "both sites to start round 3", job.logs)
    assert [row["round"] for row in job.progress()] == [1]
    run_id = torch.load(job.workdir / CHECKPOINT, weights_only=False)["run_id"]
    crash(job.server)  # cmoe-server, its SuperLink, ServerApp and helpers: the coordinator's machine died
    job.start_server("--resume")  # same work folder, same port; the sites' SuperNodes reconnect by themselves

    assert job.wait_server() == 0, _tail(job.server_out, 60)
    results = job.results()
    assert [row["round"] for row in results["rounds"]] == [1, 2, 3]
    assert [row["round"] for row in job.progress()] == [1, 2, 3]
    for row in results["rounds"]:
        assert sorted(row["sites_trained"]) == ["A", "B"], row
    assert results["run_id"] == run_id  # the same MLflow run continued
    tracking = MlflowClient(f"sqlite:///{job.workdir / 'mlflow.db'}")
    experiment = tracking.get_experiment_by_name("cancermoe-fl")
    parents = [run for run in tracking.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.run_id for run in parents] == [run_id]
    assert parents[0].info.status == "FINISHED"
    for key in ("cindex/all", "round_seconds", "loss/train"):
        assert sorted(m.step for m in tracking.get_metric_history(run_id, key)) == [1, 2, 3], key


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.fault
def test_a_bank_that_breaks_while_the_site_runs_is_one_line_and_the_job_goes_on(federation) -> None:
    job = federation(["A", "B", "C"], rounds=2, min_sites=2)
    job.start_everyone()
    # cmoe-client checked the bank at start; now the file is cut short under it (a failed copy, a full disk).
    wait_for(lambda: "joining" in _tail(job.client_out("C")), "site C to check its bank and start", job.logs)
    bank = job.banks["C"]
    os.truncate(bank, bank.stat().st_size // 2)

    wait_for(lambda: job.clients["C"].poll() is not None, "site C's cmoe-client to stop", job.logs)
    assert job.clients["C"].returncode == 2
    output = job.client_out("C").read_text()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bank}: HDF5 file cannot be opened"), output
    assert "Traceback" not in output

    assert job.wait_server() == 0, _tail(job.server_out, 60)
    rounds = job.results()["rounds"]
    assert [row["round"] for row in rounds] == [1, 2]
    for row in rounds:
        assert sorted(row["sites_trained"]) == ["A", "B"], row  # the federation went on without site C
    # Without site authentication an error reply names no site: it is keyed by node id, and says which site.
    # Site C's node answers every message with that error until its cmoe-client stops (~10 s after the refusal);
    # a round is quicker than that, so the next round may still be sent to it and then find it gone.
    excluded = [(node, why) for row in rounds for node, why in row["excluded"].items()]
    bank_broke = "error reply: site C: its patch bank cannot be read"
    assert bank_broke in [why for _, why in excluded], rounds
    assert len({node for node, _ in excluded}) == 1, rounds  # one node left out: site C's
    assert all(why == bank_broke or "Node Unavailable" in why for _, why in excluded), rounds


@pytest.mark.process
@pytest.mark.fault
def test_a_site_whose_coordinator_cannot_be_reached_says_so_in_one_line(tmp_path) -> None:
    port = free_port()  # nobody listens there
    bank = synth_site(tmp_path / "A.h5", 1, patients=10)
    started = time.monotonic()
    result = subprocess.run([str(BIN / "cmoe-client"), "--site", "A", "--bank", str(bank), "--insecure",
                             "--superlink", f"127.0.0.1:{port}", "--connect-timeout", "5",
                             "--workdir", str(tmp_path / "site-A")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.monotonic() - started
    assert result.returncode != 0 and seconds < 30, (seconds, result.stderr)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: --superlink 127.0.0.1:{port}: cannot reach the coordinator (connection refused) "
                      "within 5 s"], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "site-A" / "supernode.log").exists()  # no SuperNode was started to retry in silence


# --------------------------------------------------------------------------- in process


@pytest.mark.fault
def test_the_coordinator_wait_ends_as_soon_as_it_listens_and_names_it_when_it_never_does() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        wait_for_coordinator(f"127.0.0.1:{port}", "127.0.0.1", port, timeout=5)  # returns at once
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        wait_for_coordinator(f"127.0.0.1:{port}", "127.0.0.1", port, timeout=1)
    assert time.monotonic() - started < 5
    assert caught.value.where == f"--superlink 127.0.0.1:{port}"
    assert caught.value.problem == "cannot reach the coordinator (connection refused) within 1 s"


@pytest.mark.fault
def test_unreadable_bank_names_the_file_and_leaves_other_failures_alone(tmp_path) -> None:
    bank = synth_site(tmp_path / "A.h5", 1, patients=10)
    assert unreadable_bank(bank, RuntimeError("a bug, not the bank")) is None
    os.truncate(bank, bank.stat().st_size // 2)
    problem = unreadable_bank(bank, KeyError("what HDF5 says mid-read"))
    assert isinstance(problem, InputError) and problem.where == str(bank)
    assert "truncated or corrupt" in problem.problem


@pytest.mark.fault
def test_a_broken_bank_replies_an_error_without_its_path_and_tells_the_operator(tmp_path) -> None:
    set_task_identity()
    bank = synth_site(tmp_path / "C.h5", 3, patients=10)
    grid = InProcessGrid({1: site_context(1, "C", bank, tmp_path / "site-C")})
    model = load_config(overrides=SMALL_MODEL)
    strategy = CancerMoEStrategy(model, FederationConfig(min_sites=1), edges=np.array([0.0, 10.0, 25.0, np.inf]))
    config = {**dict(strategy.shared_config(1)), "local-epochs": 1}
    torch.manual_seed(0)
    weights = numpy_to_arrays({k: v.numpy() for k, v in CancerMoE(model).state_dict().items()})
    os.truncate(bank, bank.stat().st_size // 2)

    reply = grid.send_and_receive([make_message(config, "train", weights)])[0]
    assert reply.has_error() and reply.error.reason == "site C: its patch bank cannot be read"
    refusals = (tmp_path / "site-C" / "refusals.log").read_text().splitlines()
    assert len(refusals) == 1 and refusals[0].startswith(f"{bank}: HDF5 file cannot be opened")
    assert "round 1 train" in refusals[0]


class Killed(BaseException):
    """A hard kill at an exact point of the round, which no handler in the job may catch."""


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_crash_around_the_checkpoint_reports_every_round_once(tmp_path, monkeypatch, moment) -> None:
    """The checkpoint is a round's commit point: killed just before it, the round is redone on --resume; just
    after it, the round is not redone but its progress line and MLflow metrics are still written, once."""
    import server.app

    set_task_identity()
    banks = {name: synth_site(tmp_path / f"{name}.h5", SITES[name][0], patients=PATIENTS, cancers=SITES[name][1])
             for name in ("A", "B")}
    grid = InProcessGrid({i + 1: site_context(i + 1, name, bank, tmp_path / f"site-{name}")
                          for i, (name, bank) in enumerate(banks.items())})
    workdir = tmp_path / "server"
    model = load_config(overrides=SMALL_MODEL)
    federation = FederationConfig(rounds=3, min_sites=2)

    def settings(resume: bool) -> JobSettings:
        return JobSettings(workdir, f"sqlite:///{workdir / 'mlflow.db'}", "test", resume, model, federation)

    real_save = server.app.save_checkpoint

    def save_then_maybe_die(path, state):
        is_round_2 = Path(path).name == CHECKPOINT and state.get("round") == 2
        if is_round_2 and moment == "before":
            raise Killed
        real_save(path, state)
        if is_round_2:
            raise Killed

    monkeypatch.setattr(server.app, "save_checkpoint", save_then_maybe_die)
    with pytest.raises(Killed):
        Job(settings(resume=False)).run(grid)
    monkeypatch.setattr(server.app, "save_checkpoint", real_save)
    committed = torch.load(workdir / CHECKPOINT, weights_only=False)["round"]
    assert committed == (1 if moment == "before" else 2)

    resumed = Job(settings(resume=True))
    resumed.run(grid)
    rows = [json.loads(line) for line in (workdir / "progress.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]
    tracking = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for key in ("round_seconds", "cindex/all"):
        assert sorted(m.step for m in tracking.get_metric_history(resumed.tracker.run_id, key)) == [1, 2, 3], key
    assert len(tracking.search_runs([tracking.get_experiment_by_name("test").experiment_id],
                                    filter_string="tags.`mlflow.runName` = 'federated-training'")) == 1
