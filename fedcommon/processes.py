"""Starting Flower's own processes (SuperLink, SuperNode, the `flwr` CLI) and waiting on them.

Flower 1.42 has no public Python API to start a SuperLink or SuperNode, so
`cmoe-server` and `cmoe-client` drive its command-line programs, taken from
the same environment as this package.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cancermoe.errors import InputError

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_program(name: str) -> str:
    """A Flower program (flower-superlink, flwr, ...) of this Python environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Our environment with Flower's telemetry off and this environment's programs first on PATH
    (the SuperLink starts helpers such as flower-superexec by name)."""
    folders = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    env = {**os.environ, **FLOWER_ENV, "PATH": os.pathsep.join(folders)}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InputError(flag, f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> bool:
    """True once something accepts TCP connections on host:port; False on timeout or if ``process`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection((host if host != "0.0.0.0" else "127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def connection_problem(host: str, port: int, timeout: float = 5.0) -> str | None:
    """None when host:port accepts a TCP connection now; otherwise why not, in a few words for the operator."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:  # a firewall that drops packets, a host that is off
        return f"no answer in {timeout:g} s"
    except socket.gaierror:
        return f"cannot resolve the host name {host}"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()


def start(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a long-running program, output to ``log_path``, in its own process group (stopped whole)."""
    log_file = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=timeout)


def run_flwr(args: list[str], flwr_home: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` and return its JSON (the CLI's own success flag checked by callers)."""
    result = subprocess.run([flower_program("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                            env=flower_env(flwr_home), timeout=timeout)
    text = result.stdout.strip()
    start_at = text.find("{")
    try:
        return json.loads(text[start_at:]) if start_at >= 0 else {"success": False, "error": result.stderr}
    except json.JSONDecodeError:
        return {"success": False, "error": (result.stdout + result.stderr)[-2000:]}


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
