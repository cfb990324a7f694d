"""`cmoe-client`: a hospital's node in the federation. Runs a Flower SuperNode next to the patch bank.

    cmoe-client --site=A --bank /data/A.h5 --superlink coordinator.example.org:9092 --insecure

Two processes, both supervised here: Flower's SuperNode (`client.supernode`: ``flower-supernode`` with its idle
wait shortened) with ``--isolation process``, and our executor (`client.executor`), one long-lived process that
imports torch and this package once and runs every message through the ClientApp. A fresh random SuperExec
secret (``<workdir>/superexec.secret``, mode 0600) is shared by the two at each start, so no other local process
can claim the site's tasks from the SuperNode. An executor that exits is started again (a crash loop waits
`EXECUTOR_RESTART_SECONDS` between starts); the SuperNode's restarts are below.

The bank is checked before anything starts (a bad bank is a one-line error), and so is the installed Flower:
both processes use Flower internals of the 1.42 series, and another version is a one-line error naming it.
Every reply is checked against the protocol before it leaves and recorded,
structure only, in ``<workdir>/audit.jsonl`` (see `client.audit`).
A coordinator that cannot be reached at start is waited for up to
``--connect-timeout`` seconds (a note every 10 s), then the client stops with
one ``error: --superlink HOST:PORT: ...`` line. If the SuperNode exits later,
while the coordinator is away, it is restarted with a bounded backoff; after
``--max-restarts`` failures in a row the client gives up with a clear message
and a non-zero exit code.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from cancermoe.bank import open_bank
from cancermoe.cli.common import run_app
from cancermoe.errors import InputError
from cancermoe.files import write_text_atomically
from client.refusals import REFUSAL_LOG_ENV, new_refusals, refusal_log
from fedcommon import processes
from fedcommon.certs import check_site_credentials

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def node_config(site: str, bank: Path, workdir: Path, device: str) -> str:
    """Flower's --node-config: TOML values, strings quoted."""
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    pairs = (("site", site), ("bank", str(bank)), ("workdir", str(workdir)), ("device", device),
             ("audit-log", str(workdir / "audit.jsonl")))
    return " ".join(f"{k}={quoted(v)}" for k, v in pairs)


def client_security(ca: Path | None, key: Path | None, insecure: bool) -> list[str]:
    """SuperNode flags: TLS with the federation's CA and this site's authentication key, or --insecure."""
    if insecure:
        if ca is not None or key is not None:
            raise InputError("--insecure", "contradicts --ca/--key: choose one")
        return ["--insecure"]
    if ca is None or key is None:
        raise InputError("cmoe-client", "needs --ca CA.pem and --key SITE.key from the coordinator's cmoe-certs "
                                        "(or --insecure for a loopback test)")
    for path, what in ((ca, "CA certificate"), (key, "site key")):
        if not path.is_file():
            raise InputError(path, f"{what}: no such file")
    check_site_credentials(ca, key)
    return ["--root-certificates", str(ca.resolve()), "--auth-supernode-private-key", str(key.resolve())]


@cli.command()
def main_cmd(
    site: str = typer.Option(..., "--site", help="This site's name (as the coordinator knows it)."),
    bank: Path = typer.Option(..., "--bank", help="This site's patch bank (.h5); it never leaves the site."),
    superlink: str = typer.Option(..., "--superlink", help="Coordinator address HOST:PORT."),
    ca: Path = typer.Option(None, "--ca", help="The federation's CA certificate (ca.pem from cmoe-certs)."),
    key: Path = typer.Option(None, "--key", help="This site's private key (sites/<site>.key from cmoe-certs)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain connection (test setups only)."),
    workdir: Path = typer.Option(None, "--workdir", help="Site-local state: DPS score cache, logs."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    node_port: int = typer.Option(None, "--node-port", help="Local port of the SuperNode (default: a free one)."),
    max_restarts: int = typer.Option(5, "--max-restarts", min=0, help="Restarts in a row before giving up."),
    connect_timeout: float = typer.Option(60.0, "--connect-timeout", min=0,
                                          help="Seconds to wait for the coordinator to be reachable at start."),
) -> None:
    """Join a CancerMoE federation as one hospital site."""
    coordinator = processes.parse_address(superlink, "--superlink")
    security = client_security(ca, key, insecure)
    bank = bank.resolve()
    with open_bank(bank) as opened:  # fail here, with the bank's own error, not inside Flower
        patients = len(opened.patients)
    check_flower()
    workdir = (workdir or Path(f"cmoe-site-{site}")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = node_port or processes.free_port()
    secret = write_superexec_secret(workdir)
    # Never --allow-runtime-dependency-installation: the site runs only its installed, pinned package.
    command = [sys.executable, "-m", "client.supernode", *security, "--superlink", superlink,
               "--node-config", node_config(site, bank, workdir, device), "--port", str(port),
               "--max-wait-time", "60", "--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    executor = [sys.executable, "-m", "client.executor", "--runtime-api", f"127.0.0.1:{port}",
                "--secret-file", str(secret), "--served-log", str(workdir / SERVED_LOG),
                "--parent-pid", str(os.getpid())]
    # The executor's app-bundle gate (client.fab_guard) finds the refusal log through the environment.
    os.environ[REFUSAL_LOG_ENV] = str(refusal_log(workdir))
    typer.echo(f"site {site}: {patients} patients in {bank}; joining {superlink}")
    wait_for_coordinator(superlink, *coordinator, connect_timeout)
    raise typer.Exit(supervise(command, workdir / "supernode.log", max_restarts, workdir / "flwr-home",
                               executor_command=executor))


SERVED_LOG = "executor.jsonl"  # one line per message the executor served (client.executor)
SECRET_FILE = "superexec.secret"
EXECUTOR_RESTART_SECONDS = 5.0  # an executor that lived shorter than this waits that long before its next start


def check_flower() -> None:
    """A one-line error naming the installed Flower unless it has the internals the SuperNode patch and the
    executor use (flwr 1.42.*)."""
    from client import executor, supernode

    try:
        supernode.check_flower()
        executor.check_flower()
    except supernode.FlowerMoved as problem:
        raise InputError("cmoe-client", str(problem)) from None


def write_superexec_secret(workdir: Path) -> Path:
    """A fresh random secret shared by the SuperNode and the executor, readable by this user only."""
    path = workdir / SECRET_FILE
    write_text_atomically(path, secrets.token_hex(32), mode=0o600)
    return path


POLL_SECONDS = 0.5
CONNECT_NOTE_SECONDS = 10.0
REPLY_SENT = "Sent successfully"  # what the SuperNode logs once a reply has reached the coordinator's SuperLink
REPLY_GRACE_SECONDS = 30.0
# The coordinator collects replies every 0.1 s (server.exchange), but only from nodes still connected, and a
# loaded machine delays it: a node that leaves first is reported as unavailable instead of with its reply.
REPLY_PICKUP_SECONDS = 10.0

# What Flower's SuperNode log says when the coordinator turns a site away, and what it means for the operator.
REFUSALS = (
    ("certificate has expired", "the coordinator's certificate has expired (its operator renews it with "
                                "`cmoe-certs renew-server`)"),
    ("CERTIFICATE_VERIFY_FAILED", "the coordinator's certificate is not signed by this --ca"),
    ("Failed to activate SuperNode", "the coordinator refused this site's key: it is not registered there "
                                     "(ask the coordinator to add sites/<site>.pub to its --pki folder)"),
    ("Unable to parse the private key", "--key is not a site key made by cmoe-certs (OpenSSH ECDSA format)"),
)


def wait_for_coordinator(address: str, host: str, port: int, timeout: float) -> None:
    """Return once the coordinator's address accepts connections; `InputError` naming it after ``timeout`` s.

    Flower's SuperNode retries an unreachable SuperLink silently, and the restarts would keep this site waiting
    for minutes: a wrong address or a closed firewall should be one line, now. Only the start is checked; a
    coordinator that goes away later is waited for by the restarts (it may be resuming its job)."""
    started = time.monotonic()
    next_note = CONNECT_NOTE_SECONDS
    while True:
        elapsed = time.monotonic() - started
        problem = processes.connection_problem(host, port, timeout=max(0.5, min(5.0, timeout - elapsed)))
        if problem is None:
            return
        elapsed = time.monotonic() - started
        if elapsed >= timeout:
            raise InputError(f"--superlink {address}",
                             f"cannot reach the coordinator ({problem}) within {timeout:g} s")
        if elapsed >= next_note:
            typer.echo(f"coordinator {address} not reachable yet ({problem}); trying for {timeout - elapsed:.0f} s "
                       "more", err=True)
            next_note += CONNECT_NOTE_SECONDS
        time.sleep(min(1.0, max(0.0, timeout - elapsed)))


def superlink_refusal(log_path: Path) -> str:
    """One line: why the SuperNode gave up, from its log; a generic line when the log says nothing known."""
    text = processes.tail(log_path, 200)
    for marker, meaning in REFUSALS:
        if marker in text:
            return meaning
    return "the SuperNode could not stay connected to the coordinator"


class ExecutorKeeper:
    """Keeps one executor process (`client.executor`) running beside the SuperNode: started again whenever it
    exits, at once unless it lived under `EXECUTOR_RESTART_SECONDS` (then after that long: no crash loop)."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.command, self.log_path, self.env = command, log_path, env
        self.process: subprocess.Popen | None = None
        self.started_at = self.next_start = 0.0

    def keep_alive(self) -> None:
        now = time.monotonic()
        if self.process is not None:
            if (code := self.process.poll()) is None:
                return
            lived = now - self.started_at
            self.next_start = now if lived >= EXECUTOR_RESTART_SECONDS else now + EXECUTOR_RESTART_SECONDS
            typer.echo(f"executor (pid {self.process.pid}) exited with code {code} after {lived:.0f} s; starting "
                       f"a new one (log: {self.log_path})", err=True)
            self.process = None
        if now >= self.next_start:
            self.process = processes.start(self.command, self.log_path, self.env)
            self.started_at = now

    def stop(self) -> None:
        processes.stop(self.process)


def supervise(command: list[str], log_path: Path, max_restarts: int, flwr_home: Path,
              executor_command: list[str] | None = None) -> int:
    """Run the SuperNode; restart it with backoff 2, 4, 8 ... 60 s when it fails; exit code of the last run.
    Beside it, keep the executor (``executor_command``) running (`ExecutorKeeper`); it outlives SuperNode
    restarts (it waits for the Runtime API to answer again).

    A line that this site's ClientApps add to its refusal log (``client.refusals``, beside ``log_path``: a bank
    that broke, a key registered under another site) is printed as ``error: ...``, and the SuperNode is
    stopped: exit code 2, as for a bank refused at start.
    """
    failures = 0
    child = None
    env = processes.flower_env(flwr_home)
    executor = ExecutorKeeper(executor_command, log_path.parent / "executor.log", env) if executor_command else None
    refusals = refusal_log(log_path.parent)
    seen = len(new_refusals(refusals, 0))  # lines of an earlier cmoe-client run are not news

    def stop_all() -> None:
        processes.stop(child)
        if executor is not None:
            executor.stop()

    def forward(signum: int, _frame: object) -> None:
        stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        child = processes.start(command, log_path, env)
        # Polled, not child.wait(): a blocking wait holds the Popen's lock, and the SIGTERM handler's own
        # wait on the child would then time out instead of seeing it exit.
        log_size = 0
        while (code := child.poll()) is None:
            if refused := new_refusals(refusals, seen):
                code = leave_after_refusal(child, refused, log_path, log_size)
                stop_all()
                return code
            if executor is not None:
                executor.keep_alive()
            log_size = log_path.stat().st_size if log_path.exists() else 0
            time.sleep(POLL_SECONDS)
        if code == 0:
            stop_all()
            return 0
        failures += 1
        if failures > max_restarts:
            typer.echo(f"error: {superlink_refusal(log_path)} (the SuperNode failed {failures} times in a row; "
                       f"log: {log_path})", err=True)
            stop_all()
            return 1
        delay = min(60, 2 ** failures)
        typer.echo(f"SuperNode exited with code {code}; restarting in {delay} s "
                   f"({failures}/{max_restarts})", err=True)
        time.sleep(delay)


def leave_after_refusal(child: subprocess.Popen, refused: list[str], log_path: Path, log_offset: int) -> int:
    """Tell the operator what this site refused, let the error reply that tells the coordinator why this site
    leaves arrive, stop the SuperNode; exit code 2 (a user error: restarting cannot fix it)."""
    for line in refused:
        typer.echo(f"error: {line}", err=True)
    if wait_for_reply_sent(child, log_path, log_offset, REPLY_GRACE_SECONDS):
        time.sleep(REPLY_PICKUP_SECONDS)
    processes.stop(child)
    return 2


def wait_for_reply_sent(child: subprocess.Popen, log_path: Path, offset: int, timeout: float) -> bool:
    """True once the SuperNode's log shows a reply sent after byte ``offset``; False if the SuperNode exits
    or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        with open(log_path, "rb") as log:
            log.seek(offset)
            if REPLY_SENT.encode() in log.read():
                return True
        time.sleep(POLL_SECONDS)
    return False


def main() -> None:
    run_app(cli)


if __name__ == "__main__":
    main()
