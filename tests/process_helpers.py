"""Real processes for the end-to-end tests: start them in their own session, stop them as a service manager
does, or crash them as a power cut does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedcommon import processes

BIN = Path(sys.executable).parent  # this environment's programs: cmoe-*, flower-*, flwr, mlflow


def start(args: list[str], log: Path) -> subprocess.Popen:
    """As cmoe-server starts Flower's programs (own session, output appended to ``log``), one thread each."""
    return processes.start(args, log, {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"})


def stop(process: subprocess.Popen) -> None:
    """A clean stop (SIGTERM to the process group), as a service manager does it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            crash(process)


def descendants(pid: int) -> list[int]:
    """Every process started under ``pid``, whatever session or process group it moved to."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def crash(process: subprocess.Popen) -> None:
    """What a power cut does: SIGKILL to the process and everything under it, all at once, no cleanup."""
    doomed = [process.pid, *descendants(process.pid)]
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in doomed):
        time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
