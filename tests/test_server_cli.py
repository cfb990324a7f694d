"""`cmoe-server` following its job: a round line per round, and a 'waiting' line whenever a round is long."""

from __future__ import annotations

import json

from server import cli


class _Running:
    def poll(self) -> None:
        return None


def test_follow_says_what_it_waits_for_between_round_lines(tmp_path, monkeypatch, capsys) -> None:
    progress = tmp_path / "progress.jsonl"
    row = {"round": 1, "seconds": 3.0, "sites_trained": ["A", "B"], "metrics": {"cindex/all": 0.6}, "excluded": []}
    statuses = iter(["pending", "pending", *["running"] * 5, "finished:completed"])
    clock = iter(range(0, 1000, 6))  # each poll of the run is 6 s later

    def flwr_list(args, _home):
        status = next(statuses)
        if status == "running" and not progress.exists():
            progress.write_text(json.dumps(row) + "\n")
        return {"runs": [{"status": status}]}

    monkeypatch.setattr(cli.processes, "run_flwr", flwr_list)
    monkeypatch.setattr(cli, "save_serverapp_log", lambda *_: None)
    monkeypatch.setattr(cli.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(cli, "POLL_SECONDS", 0.0)
    assert cli.follow(tmp_path, tmp_path, "7", _Running(), status_every=10) == "finished:completed"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "waiting for round 1: 12 s so far (run pending)"
    assert lines[1].startswith("round   1")
    assert lines[2:] == ["waiting for round 2: 12 s so far (run running)",
                         "waiting for round 2: 24 s so far (run running)"]


def test_the_demo_waits_for_a_line_the_server_prints() -> None:
    """scripts/demo.sh starts its sites once cmoe-server's output has this line: it must stay the server's."""
    demo = (cli.APP_DIR.parents[1] / "scripts" / "demo.sh").read_text()
    assert 'grep -q "submitted; waiting for"' in demo
    assert 'submitted; waiting for {min_sites} site(s)' in (cli.APP_DIR.parent / "cli.py").read_text()
