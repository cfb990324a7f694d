"""A round is one exchange, polled at sub-second intervals, served at each site by one long-lived executor.

- `server.exchange`: replies are pulled until every message has one or the timeout passes.
- One exchange a round: round r's training message carries round r - 1's model to evaluate first; the
  evaluation in the training reply is the same as an evaluate message's; only the last round's model gets an
  evaluate message of its own.
- The Flower internals we patch or call are checked at start-up (flwr 1.42.*), and a mismatch names the version.
- Real processes: three sites over loopback with TLS and site keys; one executor process per site serves every
  message (its pid unchanged across rounds); an executor killed mid-message is started again, the round completes
  without that site, and the next round is served by the new executor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from cancermoe.errors import InputError
from cancermoe.model import CancerMoE
from client import executor, supernode
from client.cli import SECRET_FILE, SERVED_LOG, write_superexec_secret
from fedcommon import flower_internals
from fedcommon.flower_internals import FlowerMoved
from fedcommon.packing import LAYOUT, PACKED, pack, unpack
from fedcommon.processes import free_port, wait_for_port
from fedcommon.protocol import EVALUATION_RECORD, EvalReport
from server import cli as server_cli
from server.app import REPLY_PULLS
from server.exchange import exchange
from server.strategy import CancerMoEStrategy
from server.weights import numpy_to_arrays
from tests.federation_helpers import SMALL_MODEL, grid_of_sites, make_message, synth_site
from tests.process_helpers import BIN, start, stop
from tests.test_federation_inprocess import configs, run_job

# --------------------------------------------------------------------------- server.exchange


class SlowGrid:
    """Answers one pushed message per pull, in order; the last ``silent`` messages never."""

    def __init__(self, silent: int = 0) -> None:
        self.silent = silent
        self.answerable: list[str] = []
        self.pulls = 0

    def push_messages(self, sent):
        ids = [f"id-{i}" for i in range(len(list(sent)))]
        self.answerable = ids[:len(ids) - self.silent]
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        waiting = [i for i in self.answerable if i in set(message_ids)]
        if not waiting:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=waiting[0]), has_content=lambda: False)]


def messages(n: int) -> list[Message]:
    return [Message(RecordDict(), message_type="train", dst_node_id=i + 1) for i in range(n)]


@pytest.fixture()
def identity():
    from tests.federation_helpers import set_task_identity

    set_task_identity()


def test_exchange_pulls_until_every_message_has_its_reply(identity) -> None:
    grid = SlowGrid()
    replies = exchange(grid, messages(3), timeout=60, poll=0.001)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-0", "id-1", "id-2"]
    assert grid.pulls == 3  # one reply per pull: it went on pulling, and stopped once all were in


def test_exchange_returns_what_arrived_when_a_site_stays_silent(identity) -> None:
    grid = SlowGrid(silent=1)
    replies = exchange(grid, messages(3), timeout=0.2, poll=0.001)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-0", "id-1"]
    assert grid.pulls > 3  # it kept asking for the silent one until the timeout


def test_exchange_asks_a_grid_without_push_and_pull_through_send_and_receive(identity) -> None:
    class Plain:
        def send_and_receive(self, sent, *, timeout=None):
            return [Message(RecordDict(), reply_to=m) for m in sent]

    assert len(exchange(Plain(), messages(2), timeout=1)) == 2
    assert exchange(Plain(), [], timeout=1) == []


# --------------------------------------------------------------------------- weights packed on the wire


def model_arrays() -> ArrayRecord:
    model, _ = configs()
    torch.manual_seed(0)
    return numpy_to_arrays({k: v.numpy() for k, v in CancerMoE(model).state_dict().items()})


def test_packed_weights_are_one_array_and_unpack_to_the_same_named_arrays(identity) -> None:
    arrays = model_arrays()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    packed = pack(content)
    assert list(packed["arrays"]) == [PACKED] and LAYOUT in packed and pack(packed) is packed
    unpacked = unpack(packed)
    assert list(unpacked["arrays"]) == list(arrays) and unpacked["config"]["server-round"] == 1
    for name, array in arrays.items():
        np.testing.assert_array_equal(unpacked["arrays"][name].numpy(), array.numpy(), err_msg=name)
    # What Flower sends object by object (and the SuperLink serves request by request): ~92 objects become 8.
    sizes = [len(get_all_nested_objects(Message(c, message_type="train", dst_node_id=1))) for c in (content, packed)]
    assert sizes[0] > 50 and sizes[1] < 10, sizes
    assert unpack(content) is content  # not packed: nothing to do


def test_a_packing_that_does_not_fit_its_layout_is_refused(identity) -> None:
    packed = pack(RecordDict({"arrays": model_arrays()}))
    packed[LAYOUT]["ndims"] = [*packed[LAYOUT]["ndims"][:-1], 3]
    with pytest.raises(ValueError, match="packed arrays"):
        unpack(packed)


class EchoGrid:
    """Records what is pushed; answers every message with a copy of its content (as a site's packing mod would
    reply packed), or with ``broken`` content."""

    def __init__(self, broken: RecordDict | None = None) -> None:
        self.pushed: list[Message] = []
        self.broken = broken

    def push_messages(self, sent):
        self.pushed = list(sent)
        return [f"id-{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):
        replies = []
        for i, message in enumerate(self.pushed):
            reply = Message(self.broken if self.broken is not None else message.content, reply_to=message)
            reply.metadata.__dict__["_reply_to_message_id"] = f"id-{i}"
            replies.append(reply)
        return replies


def test_the_coordinator_packs_what_it_pushes_and_unpacks_what_it_pulls(identity) -> None:
    arrays = model_arrays()
    grid = EchoGrid()
    (reply,) = exchange(grid, [Message(RecordDict({"arrays": arrays}), message_type="train", dst_node_id=1)], 60)
    assert list(grid.pushed[0].content["arrays"]) == [PACKED]
    assert list(reply.content["arrays"]) == list(arrays) and LAYOUT not in reply.content
    broken = pack(RecordDict({"arrays": arrays}))
    broken[LAYOUT]["names"] = ["a"]
    (reply,) = exchange(EchoGrid(broken), [Message(RecordDict({"arrays": arrays}), message_type="train",
                                                   dst_node_id=1)], 60)
    assert list(reply.content["arrays"]) == [PACKED]  # passed on as it came: admission refuses its weights


def test_a_site_answers_packed_weights_with_the_same_reply_packed(sites, tmp_path) -> None:
    model, federation = configs()
    strategy = CancerMoEStrategy(model, federation, edges=np.array([0.0, 10.0, 25.0, 50.0, np.inf]))
    config = {**dict(strategy.shared_config(1)), "local-epochs": 1}
    message = make_message(config, "train", model_arrays(), node=1)
    plain = grid_of_sites(sites, tmp_path / "plain").send_and_receive([message])[0]
    packed_message = make_message(config, "train", model_arrays(), node=1)
    packed_message.content = pack(packed_message.content)
    packed = grid_of_sites(sites, tmp_path / "packed").send_and_receive([packed_message])[0]
    assert list(packed.content["arrays"]) == [PACKED]
    unpacked = unpack(packed.content)
    assert list(unpacked["arrays"]) == list(plain.content["arrays"])
    for name, array in plain.content["arrays"].items():
        np.testing.assert_array_equal(unpacked["arrays"][name].numpy(), array.numpy(), err_msg=name)
    timings = ("train-seconds", "work-seconds")
    assert ({k: v for k, v in unpacked["metrics"].items() if k not in timings}
            == {k: v for k, v in plain.content["metrics"].items() if k not in timings})
    # The audit log records the named arrays the handler returned, as for an unpacked message.
    entries = [json.loads(line) for line in (tmp_path / "packed" / "site-A" / "audit.jsonl").read_text().splitlines()]
    assert set(entries[-1]["arrays"]) == set(plain.content["arrays"])


# --------------------------------------------------------------------------- one exchange a round


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sites")
    return {"A": synth_site(root / "A.h5", 1, cancers=("BRCA", "LUAD")),
            "B": synth_site(root / "B.h5", 2, cancers=("LUAD", "KIRC"))}


def test_the_evaluation_in_a_training_reply_is_the_evaluate_reply(sites, tmp_path) -> None:
    """The same weights, asked once inside a training message and once in an evaluate message: the same counts."""
    model, federation = configs()
    strategy = CancerMoEStrategy(model, federation, edges=np.array([0.0, 10.0, 25.0, 50.0, np.inf]))
    torch.manual_seed(0)
    weights = numpy_to_arrays({k: v.numpy() for k, v in CancerMoE(model).state_dict().items()})
    train = {**dict(strategy.shared_config(2)), "local-epochs": 1, **strategy.evaluation_request()}
    evaluate = {**dict(strategy.shared_config(1)), **strategy.evaluation_request()}
    grid = grid_of_sites(sites, tmp_path)
    with_training, alone = grid.send_and_receive([make_message(train, "train", weights, node=1),
                                                  make_message(evaluate, "evaluate", weights, node=1)])
    shape = (len(strategy.grid.risk_edges) - 1, len(strategy.grid.time_edges) - 1, 2)
    riding = EvalReport.from_metrics(dict(with_training.content[EVALUATION_RECORD]), shape)
    own = EvalReport.from_metrics(dict(alone.content["metrics"]), shape)
    assert riding.patients == own.patients > 0 and riding.cancers.keys() == own.cancers.keys()
    for cancer, part in own.cancers.items():
        assert riding.cancers[cancer].pairs == part.pairs
        np.testing.assert_array_equal(riding.cancers[cancer].histogram, part.histogram)
    assert "arrays" in with_training.content and with_training.content["metrics"]["work-seconds"] > 0
    # A training message that does not ask (a job's first round) gets no evaluation back.
    first = {**dict(strategy.shared_config(1)), "local-epochs": 1}
    (plain,) = grid.send_and_receive([make_message(first, "train", weights, node=2)])
    assert EVALUATION_RECORD not in plain.content


@pytest.mark.slow
def test_a_round_is_one_exchange_and_only_the_last_model_has_an_evaluate_message(sites, tmp_path) -> None:
    grid = grid_of_sites(sites, tmp_path)
    job = run_job(grid, tmp_path / "server", rounds=3)
    kinds = [(m.message_type, m.dst_node_id) for m in (message.metadata for message in grid.sent)]
    assert [k for k, _ in kinds].count("query") == 2
    assert [k for k, _ in kinds].count("train") == 6  # 3 rounds x 2 sites
    assert [k for k, _ in kinds].count("evaluate") == 2  # the last round's model only
    asked = [int(m.content["config"].get("evaluate", 0)) for m in grid.sent if m.metadata.message_type == "train"]
    assert asked == [0, 0, 1, 1, 1, 1]  # round 1 starts from weights with nothing to evaluate
    for number in (1, 2, 3):
        record = job.strategy.records[number]
        assert record.sites_evaluated == ["A", "B"] and "cindex/all" in record.metrics, number
        assert record.metrics["seconds/slowest_site_work"] >= record.metrics["seconds/slowest_site_training"] > 0
    rows = [json.loads(line) for line in (tmp_path / "server" / "progress.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]


# --------------------------------------------------------------------------- Flower internals, checked


def test_the_installed_flower_is_the_one_we_patch_and_call() -> None:
    supernode.check_flower()
    executor.check_flower()


def test_a_flower_that_moved_is_refused_naming_its_version(monkeypatch) -> None:
    monkeypatch.setattr(flower_internals, "flower_version", lambda: "1.43.0")
    with pytest.raises(FlowerMoved, match=r"installed flwr 1\.43\.0: this project supports flwr 1\.42\.\*"):
        supernode.check_flower()
    with pytest.raises(InputError, match=r"installed flwr 1\.43\.0"):
        server_cli.check_flower()
    monkeypatch.setattr(flower_internals, "flower_version", lambda: "1.42.0")
    monkeypatch.setitem(executor.FLOWER_INTERNALS, "flwr.supernode.runtime.run_clientapp", ("push_messages",))
    with pytest.raises(FlowerMoved, match=r"installed flwr 1\.42\.0: no flwr\.supernode\.runtime\.run_clientapp"
                                          r"\.push_messages \(relied on by the site's executor"):
        executor.check_flower()
    monkeypatch.setattr(flower_internals, "PULL_SETTINGS", {**flower_internals.PULL_SETTINGS, "patience": 1})
    assert flower_internals.object_pull_problems(REPLY_PULLS) == [f"{REPLY_PULLS}.pull_objects has no patience"]


def test_object_pulls_retry_quickly_once_adjusted(monkeypatch) -> None:
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # undone after the test
    original = http_grid.pull_objects
    flower_internals.quick_object_pulls(REPLY_PULLS)
    flower_internals.quick_object_pulls(REPLY_PULLS)  # twice: still one adjustment
    adjusted = http_grid.pull_objects
    assert adjusted.func is original and adjusted.keywords == flower_internals.PULL_SETTINGS
    tries = []

    def pull_once_missing(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) == 1:
            from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

            raise ObjectUnavailableError(object_id)
        return b"content"

    assert adjusted(["x"], pull_once_missing, max_concurrent_pulls=1) == {"x": b"content"}
    assert tries == ["x", "x"]


def test_the_supernode_patch_shortens_exactly_its_two_waits(monkeypatch) -> None:
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    sleeps = supernode.FastSleeps()
    for seconds in (3, 0.5, 1.0):
        sleeps.sleep(seconds)
    assert slept == [supernode.IDLE_SECONDS, supernode.REPLY_SECONDS, 1.0]
    assert sleeps.monotonic is time.monotonic  # everything else is the real module


def test_a_fresh_superexec_secret_readable_by_its_owner_only(tmp_path) -> None:
    first = write_superexec_secret(tmp_path).read_text()
    path = write_superexec_secret(tmp_path)
    assert path.name == SECRET_FILE and len(path.read_text()) == 64 and path.read_text() != first
    assert path.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- real processes

WAIT_S = 400  # a ceiling only: every wait is on a line in a file


def served(site_dir: Path) -> list[dict]:
    path = site_dir / SERVED_LOG
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return rows


def wait_for(condition, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}"
                              for log in logs)
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.fault
def test_one_executor_per_site_serves_every_message_and_a_killed_one_is_replaced(tmp_path) -> None:
    pki = tmp_path / "pki"
    certs = [sys.executable, "-m", "server.certs_cli"]
    subprocess.run([*certs, "init", str(pki), "--host", "coordinator.test"], capture_output=True, check=True)
    site_cancers = {"A": (1, ("BRCA", "LUAD")), "B": (2, ("LUAD", "KIRC")), "C": (3, ("BRCA", "KIRC"))}
    banks = {}
    for name, (seed, cancers) in site_cancers.items():
        subprocess.run([*certs, "site", str(pki), name], capture_output=True, check=True)
        banks[name] = synth_site(tmp_path / f"{name}.h5", seed, patients=30, cancers=cancers)
    port = free_port()
    sets = [arg for item in [*SMALL_MODEL, "round_timeout=300", "wait_for_sites=300"] for arg in ("--set", item)]
    server = start([str(BIN / "cmoe-server"), "--rounds", "3", "--min-sites", "3", "--pki", str(pki),
                    "--listen", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "server"), *sets],
                   tmp_path / "server.out")
    clients = {}
    site_dirs = {name: tmp_path / f"site-{name}" for name in banks}
    logs = [tmp_path / "server.out", *(tmp_path / f"client-{n}.out" for n in banks),
            *(d / "executor.log" for d in site_dirs.values())]
    try:
        assert wait_for_port("127.0.0.1", port, timeout=120, process=server), (tmp_path / "server.out").read_text()
        for name, bank in banks.items():
            clients[name] = start([str(BIN / "cmoe-client"), "--site", name, "--bank", str(bank), "--superlink",
                                   f"127.0.0.1:{port}", "--ca", str(pki / "ca.pem"),
                                   "--key", str(pki / "sites" / f"{name}.key"), "--workdir", str(site_dirs[name])],
                                  tmp_path / f"client-{name}.out")
        # Site A's executor has taken round 2's message (evaluate round 1, train round 2): killed mid-message.
        wait_for(lambda: any(r.get("round") == 2 and r["status"] == "running" for r in served(site_dirs["A"])),
                 "site A's executor to start round 2", logs)
        killed = next(r["pid"] for r in served(site_dirs["A"]) if r.get("round") == 2)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        code = server.poll()
    finally:
        for process in [server, *clients.values()]:
            stop(process)
    assert code == 0, (tmp_path / "server.out").read_text()[-3000:]

    results = json.loads((tmp_path / "server" / "results.json").read_text())
    rounds = {row["round"]: row for row in results["rounds"]}
    assert sorted(rounds) == [1, 2, 3]  # every round completed, the one A's executor died in included
    assert sorted(rounds[1]["sites_trained"]) == ["A", "B", "C"]
    assert sorted(rounds[2]["sites_trained"]) == ["B", "C"] and "A" in rounds[2]["excluded"], rounds[2]
    assert sorted(rounds[3]["sites_trained"]) == ["A", "B", "C"]  # served by A's new executor
    for name in ("B", "C"):  # one process served every message of the job: query, 3 trainings, 1 evaluation
        rows = [r for r in served(site_dirs[name]) if r["status"] != "running"]
        assert [(r["type"], r.get("round")) for r in rows] == [("query", None), ("train", 1), ("train", 2),
                                                              ("train", 3), ("evaluate", 3)], rows
        assert all(r["status"] == "completed" for r in rows) and len({r["pid"] for r in rows}) == 1, rows
    rows = served(site_dirs["A"])
    before = [r for r in rows if r["pid"] == killed]
    after = [r for r in rows if r["pid"] != killed]
    assert [(r["type"], r.get("round"), r["status"]) for r in before][-1] == ("train", 2, "running")
    assert len({r["pid"] for r in after}) == 1, after  # one new executor, for everything after the kill
    assert [(r["type"], r.get("round")) for r in after if r["status"] == "completed"] == [("train", 3),
                                                                                         ("evaluate", 3)]
    assert f"executor (pid {killed}) exited" in (tmp_path / "client-A.out").read_text()
    output = (tmp_path / "server.out").read_text()
    assert "registered sites: A, B, C" in output
