"""A site is who its key says: the site refuses to work under another site's key, and the coordinator drops
(and records as a security event) a reply whose site name is not the one its node's key is registered under.

In-process: the real ClientApp (with its mods), the real Job and strategy, a real MLflow store; the transport
is the Grid stand-in. The coordinator's registry is the file cmoe-server writes (node id -> site name).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from server.app import Job, JobSettings
from server.config import SITE_NODES
from tests.federation_helpers import InProcessGrid, set_task_identity, site_context, synth_site
from tests.test_federation_inprocess import configs


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("identity")
    return {"A": synth_site(root / "A.h5", 1, patients=30), "B": synth_site(root / "B.h5", 2, patients=30)}


def job_with_registry(tmp_path: Path, registry: dict[int, str]) -> Job:
    workdir = tmp_path / "server"
    workdir.mkdir()
    (workdir / SITE_NODES).write_text(json.dumps({str(node): site for node, site in registry.items()}))
    model, federation = configs(rounds=1, min_sites=1)
    return Job(JobSettings(workdir, f"sqlite:///{workdir / 'mlflow.db'}", "test", False, model, federation))


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_site_started_with_another_sites_key_refuses_to_work_and_says_why(banks, tmp_path) -> None:
    set_task_identity()
    # Node 2 authenticated with site C's key, but its operator started it as --site B.
    grid = InProcessGrid({1: site_context(1, "A", banks["A"], tmp_path / "site-A"),
                          2: site_context(2, "B", banks["B"], tmp_path / "site-B")})
    job = job_with_registry(tmp_path, {1: "A", 2: "C"})
    job.run(grid)
    refusals = (tmp_path / "site-B" / "refusals.log").read_text().splitlines()
    assert refusals and refusals[0] == ("--site B does not match --key: the coordinator has this key registered as "
                                        "site C (use that site's key, or --site=C)")
    assert not (tmp_path / "site-A" / "refusals.log").exists()
    record = job.strategy.records[1]
    assert record.sites_trained == ["A"] and record.sites_evaluated == ["A"]
    # Node 2 computed nothing: no training reply of B reached the audit log.
    assert not (tmp_path / "site-B" / "audit.jsonl").exists()


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_reply_under_another_sites_name_is_dropped_as_a_security_event(banks, tmp_path) -> None:
    set_task_identity()
    # A modified client at node 2 (registered as C) skips the site-side check and replies as site A.
    grid = InProcessGrid({1: site_context(1, "A", banks["A"], tmp_path / "site-A"),
                          2: site_context(2, "A", banks["B"], tmp_path / "site-impostor")})
    honest_send = grid.send_and_receive

    def without_site_check(messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            if message.metadata.dst_node_id == 2:
                message.content["config"]["registered-site"] = ""
        return honest_send(messages, timeout=timeout)

    grid.send_and_receive = without_site_check
    job = job_with_registry(tmp_path, {1: "A", 2: "C"})
    job.run(grid)
    record = job.strategy.records[1]
    assert record.sites_trained == ["A"]
    assert record.excluded == {"C": "replied as site 'A' with the key registered for site 'C'"}
    assert record.security_events == ["C"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}").get_run(job.tracker.run_id)
    assert run.data.metrics["security_events"] == 1.0
    assert run.data.tags["security_event/round_1/C"].startswith("replied as site 'A'")


@pytest.mark.slow
def test_without_site_authentication_names_are_not_checked(banks, tmp_path) -> None:
    set_task_identity()
    grid = InProcessGrid({1: site_context(1, "A", banks["A"], tmp_path / "site-A")})
    model, federation = configs(rounds=1, min_sites=1)
    workdir = tmp_path / "server"
    job = Job(JobSettings(workdir, f"sqlite:///{workdir / 'mlflow.db'}", "test", False, model, federation))
    job.run(grid)
    assert job.strategy.records[1].sites_trained == ["A"] and job.strategy.records[1].security_events == []
    assert all(message.content["config"]["registered-site"] == "" for message in grid.sent)
