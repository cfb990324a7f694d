"""`cmoe-server`: the coordinator. Starts a SuperLink, submits the federated job, follows it to the end.

    cmoe-server --rounds 5 --min-sites 3 --insecure --workdir runs/job1 --set tokens=256

Exits 0 only when the run finished completed (``flwr run`` itself exits 0
whatever happens), printing the per-cancer c-index table and the command that
opens the MLflow dashboard on the job's tracking store.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import typer

from cancermoe.cli.common import list_config_option, run_app
from cancermoe.errors import InputError
from cancermoe.files import write_text_atomically
from fedcommon import processes
from fedcommon.app_bundle import installed_version
from fedcommon.certs import check_server_certificate, site_keys
from server.config import AGGREGATIONS, SITE_NODES, configs_to_json, federation_listing, resolve_configs
from server.dashboard import dashboard_url

APP_DIR = Path(__file__).parent / "flwr_app"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
POLL_SECONDS = 2.0

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def main_cmd(
    rounds: int = typer.Option(..., "--rounds", min=1, help="Federated rounds."),
    min_sites: int = typer.Option(..., "--min-sites", min=1, help="Sites that must take part in every round."),
    listen: str = typer.Option("127.0.0.1:9092", "--listen", help="HOST:PORT the sites connect to."),
    workdir: Path = typer.Option(Path("cmoe-server"), "--workdir", help="Checkpoints, logs, tracking store."),
    config_file: Path = typer.Option(None, "--config", help="TOML file of model/training config keys."),
    overrides: list[str] = typer.Option(None, "--set", help="key=value for any model, training or federation key."),
    aggregation: str = typer.Option("load-aware", "--aggregation", help=" | ".join(AGGREGATIONS)),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow URI (default: sqlite in --workdir)."),
    pki: Path = typer.Option(None, "--pki", help="cmoe-certs folder: TLS + site authentication (the default)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain connections, no site authentication."),
    allow_insecure_remote: bool = typer.Option(False, "--allow-insecure-remote",
                                               help="Allow --insecure on a non-loopback --listen address."),
    expose_control_api: bool = typer.Option(False, "--expose-control-api",
                                            help="Allow a non-loopback --listen (closed test networks only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the job in --workdir from its last round."),
    force: bool = typer.Option(False, "--force", help="Discard a job already in --workdir."),
    experiment: str = typer.Option("cancermoe-fl", "--experiment", help="MLflow experiment name."),
    status_every: float = typer.Option(10.0, "--status-every", min=0,
                                       help="Seconds between 'waiting for round N' lines (0: round lines only)."),
    _list_config: bool = list_config_option(federation_listing),
) -> None:
    """Coordinate federated CancerMoE training across hospital sites."""
    host, port = processes.parse_address(listen, "--listen")
    check_listen_address(host, expose_control_api)
    check_flower()
    security = transport_security(pki, insecure, host, allow_insecure_remote)
    model, federation = resolve_configs(str(config_file) if config_file else None, overrides or [],
                                        {"rounds": rounds, "min_sites": min_sites, "aggregation": aggregation})
    workdir = workdir.resolve()
    prepare_workdir(workdir, resume=resume, force=force)
    effective = workdir / "effective-config.json"
    write_text_atomically(effective,
                          json.dumps({"model": model.to_dict(), "federation": federation.to_dict()}, indent=2))
    typer.echo(f"effective config: {effective}")
    uri = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    flwr_home = write_connection(workdir, port, security)
    # SIGTERM would end Python without running `finally`; as SystemExit it stops the SuperLink on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    superlink = None
    try:
        superlink = start_superlink(workdir, host, port, security)
        register_sites(security, flwr_home, workdir)
        if resume:
            stop_unfinished_runs(flwr_home)
        run_id = submit(workdir, flwr_home, configs_to_json(model, federation), uri, experiment, resume)
        typer.echo(f"run {run_id} submitted; waiting for {min_sites} site(s) on {host}:{port}")
        status = follow(workdir, flwr_home, run_id, superlink, status_every)
    finally:
        processes.stop(superlink)
    if status != "finished:completed":
        failure = workdir / "failure.txt"
        if failure.exists():
            typer.echo(f"error: federated run {run_id} failed: {failure.read_text().strip()}", err=True)
            raise typer.Exit(1)
        log_tail = processes.tail(workdir / "serverapp.log", 15) or processes.tail(workdir / "superlink.log", 15)
        typer.echo(f"federated run {run_id} ended as {status}\n{log_tail}", err=True)
        raise typer.Exit(1)
    print_results(workdir, uri, federation.min_eval_events, federation.eval_fraction)


def prepare_workdir(workdir: Path, *, resume: bool, force: bool) -> None:
    started = (workdir / "checkpoint.pt").exists()
    if started and not (resume or force):
        raise InputError(workdir, "already holds a federated job (use --resume to continue it, --force to restart)")
    if resume and not started:
        raise InputError(workdir, "has no checkpoint to resume from")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "failure.txt").unlink(missing_ok=True)
    if force and not resume:
        for name in ("checkpoint.pt", "best.pt", "model.pt", "results.json", "progress.jsonl", "superlink.db",
                     SITE_NODES, "failure.txt"):
            (workdir / name).unlink(missing_ok=True)


def check_flower() -> None:
    """A one-line error naming the installed Flower unless the ServerApp's reply pulls can be adjusted as in
    flwr 1.42 (`server.app.REPLY_PULLS`)."""
    from fedcommon.flower_internals import moved, object_pull_problems, version_problems
    from server.app import REPLY_PULLS

    if problems := version_problems() + object_pull_problems(REPLY_PULLS):
        raise InputError("cmoe-server", str(moved(problems, "the ServerApp's reply pulls (server/app.py)")))


def check_listen_address(host: str, expose_control_api: bool) -> None:
    """The SuperLink serves Flower's control API (which submits code to every site and has no authentication in
    open-source Flower) on the same port as the sites' fleet API: it stays on loopback, behind the proxy."""
    if host not in LOOPBACK and not expose_control_api:
        raise InputError("--listen", f"{host} would expose Flower's unauthenticated control API to the network; "
                                     "listen on 127.0.0.1 and expose only /v1/fleet through the proxy in "
                                     "deploy/nginx (or add --expose-control-api on a closed test network)")


def transport_security(pki: Path | None, insecure: bool, host: str, allow_insecure_remote: bool) -> Path | None:
    """The PKI folder for TLS + site authentication, or None for plain connections (refused unless asked for)."""
    if pki is not None:
        if insecure:
            raise InputError("--insecure", "contradicts --pki: choose one")
        pki = pki.resolve()
        check_server_certificate(pki)
        return pki
    if not insecure:
        raise InputError("cmoe-server", "no --pki folder: create one with `cmoe-certs init DIR --host NAME` "
                                        "(or pass --insecure for a loopback test)")
    if host not in LOOPBACK and not allow_insecure_remote:
        raise InputError("--listen", f"--insecure on {host} would expose plain connections to the network; "
                                     "use --pki, or add --allow-insecure-remote")
    return None


def write_connection(workdir: Path, port: int, pki: Path | None) -> Path:
    """The `flwr` CLI's connection file: the control API on loopback only."""
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    trust = f'root-certificates = "{pki / "ca.pem"}"' if pki is not None else "insecure = true"
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\n{trust}\n')
    return home


def register_sites(pki: Path | None, flwr_home: Path, workdir: Path) -> None:
    """Register every site key of the PKI folder under its site name (already registered keys are kept), and
    record which node id each key got: the ServerApp checks every reply's site name against it."""
    if pki is None:
        return
    keys = site_keys(pki)
    if not keys:
        raise InputError(pki, "has no site keys: add them with `cmoe-certs site DIR NAME`")
    nodes_file = workdir / SITE_NODES
    nodes = json.loads(nodes_file.read_text()) if nodes_file.exists() else {}
    for site, public_key in sorted(keys.items()):
        reply = processes.run_flwr(["supernode", "register", str(public_key), "local", "--name", site], flwr_home)
        if reply.get("success") and "node-id" in reply:
            nodes[str(reply["node-id"])] = site
        elif "already" not in json.dumps(reply).lower():
            raise InputError(public_key, f"could not register site {site}: {reply.get('error', reply)}")
    write_text_atomically(nodes_file, json.dumps(nodes, indent=2))
    typer.echo(f"registered sites: {', '.join(sorted(keys))}")


def start_superlink(workdir: Path, host: str, port: int, pki: Path | None):
    if pki is None:
        security = ["--insecure"]
    else:
        security = ["--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem"),
                    "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth"]
    command = [processes.flower_program("flower-superlink"), *security, "--database",
               str(workdir / "superlink.db"), "--disable-runtime-dependency-installation",
               "--host", host, "--port", str(port)]
    process = processes.start(command, workdir / "superlink.log", processes.flower_env(workdir / "flwr-home"))
    try:  # a stop (SIGTERM -> SystemExit) may arrive while we wait: the SuperLink must not outlive us
        if not processes.wait_for_port(host, port, timeout=60, process=process):
            raise InputError("--listen", f"the SuperLink did not start on {host}:{port}: "
                                         f"{processes.tail(workdir / 'superlink.log', 3)}")
    except BaseException:
        processes.stop(process)
        raise
    return process


def stop_unfinished_runs(flwr_home: Path) -> None:
    """A coordinator that was killed leaves its run marked running in the SuperLink's database; sites would
    keep fetching its messages until Flower gives up on it. Stop it before the resumed job is submitted."""
    for run in processes.run_flwr(["list", "local"], flwr_home).get("runs") or []:
        if not str(run.get("status", "")).startswith("finished"):
            processes.run_flwr(["stop", str(run["run-id"]), "local"], flwr_home)
            typer.echo(f"stopped run {run['run-id']} of the interrupted job")


def write_app_bundle(folder: Path) -> Path:
    """The shim app folder `flwr run` bundles, stamped with the installed version the sites check it against."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    template = (APP_DIR / "pyproject.toml").read_text()
    (folder / "pyproject.toml").write_text(template.replace("@CMOE_VERSION@", installed_version()))
    return folder


def submit(workdir: Path, flwr_home: Path, configs: str, uri: str, experiment: str, resume: bool) -> str:
    app = write_app_bundle(workdir / "app")
    run_config = workdir / "run-config.toml"
    run_config.write_text(
        f"configs = {json.dumps(configs)}\nworkdir = {json.dumps(str(workdir))}\n"
        f"tracking-uri = {json.dumps(uri)}\nexperiment = {json.dumps(experiment)}\n"
        f"resume = {'true' if resume else 'false'}\n")
    reply = processes.run_flwr(["run", str(app), "local", "--run-config", str(run_config)], flwr_home)
    if not reply.get("success") or "run-id" not in reply:
        raise InputError("flwr run", f"the job was not accepted: {reply.get('error', reply)}")
    return str(reply["run-id"])


def follow(workdir: Path, flwr_home: Path, run_id: str, superlink, status_every: float = 0.0) -> str:
    """Print each round's progress line until the run finishes; returns Flower's final status.

    A round can take minutes (and the first waits for the sites): every ``status_every`` seconds without a
    round line, one line says what is awaited, so that an operator (or `make demo`) can tell waiting from hung.
    """
    printed = 0
    progress = workdir / "progress.jsonl"
    next_round = 1
    round_since = said_since = time.monotonic()
    while True:
        if progress.exists():
            lines = progress.read_text().splitlines()
            for line in lines[printed:]:
                row = json.loads(line)
                typer.echo(format_progress(row))
                next_round, round_since = row["round"] + 1, time.monotonic()
                said_since = round_since
            printed = len(lines)
        reply = processes.run_flwr(["list", "local", "--run-id", run_id], flwr_home)
        runs = reply.get("runs") or []
        status = str(runs[0].get("status", "")) if runs else ""
        now = time.monotonic()
        if status_every and now - said_since >= status_every and not status.startswith("finished"):
            typer.echo(f"waiting for round {next_round}: {now - round_since:.0f} s so far (run {status or 'unknown'})")
            said_since = now
        if status.startswith("finished"):
            # Flower's own accounting of the run (network traffic, compute time), kept beside the results.
            write_text_atomically(workdir / "flower-run.json", json.dumps(runs[0], indent=2))
            save_serverapp_log(workdir, flwr_home, run_id)
            if progress.exists():
                for line in progress.read_text().splitlines()[printed:]:
                    typer.echo(format_progress(json.loads(line)))
            return status
        if superlink.poll() is not None:
            return "superlink exited"
        time.sleep(POLL_SECONDS)


def save_serverapp_log(workdir: Path, flwr_home: Path, run_id: str) -> None:
    import subprocess

    result = subprocess.run([processes.flower_program("flwr"), "log", run_id, "local", "--show"],
                            capture_output=True, text=True, env=processes.flower_env(flwr_home), timeout=60)
    (workdir / "serverapp.log").write_text(result.stdout + result.stderr)


def _fmt(value: float | None) -> str:
    return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _cancers(metrics: dict) -> list[str]:
    return sorted(k.split("/", 1)[1] for k in metrics if k.startswith("cindex/") and k.count("/") == 1
                  and k not in ("cindex/all", "cindex/train"))


def _with_interval(metrics: dict, prefix: str, group: str) -> str:
    """``0.612 [0.541, 0.683]`` and a ``*`` when the held-out deaths are too few (see `print_results`)."""
    value, lower, upper = (metrics.get(f"{prefix}{part}/{group}") for part in ("", "_lower", "_upper"))
    interval = f" [{_fmt(lower)}, {_fmt(upper)}]" if lower is not None and upper is not None else ""
    return f"{_fmt(value)}{interval}{'*' if metrics.get(f'few_events/{group}') else ''}"


def format_progress(row: dict) -> str:
    metrics = row["metrics"]
    parts = [f"round {row['round']:>3}", f"{row['seconds']:6.1f}s", f"sites {len(row['sites_trained'])}",
             f"loss {_fmt(metrics.get('loss/train'))}", f"c-index {_with_interval(metrics, 'cindex', 'all')}"]
    if "validation_cindex" in metrics:
        parts.append(f"validation {_fmt(metrics['validation_cindex'])}")
    parts += [f"{c} {_fmt(metrics.get('cindex/' + c))}{'*' if metrics.get(f'few_events/{c}') else ''}"
              for c in _cancers(metrics)]
    if row["excluded"]:
        parts.append(f"excluded: {', '.join(row['excluded'])}")
    return "  ".join(parts)


def chosen_line(workdir: Path, chosen: dict) -> str:
    """One kept model: its file, round, held-out c-index [95% interval], validation c-index, how it was chosen."""
    lower, upper = chosen["heldout_interval"]
    validation = (f", validation c-index {_fmt(chosen['validation_cindex'])}"
                  if chosen.get("validation_cindex") is not None else "")
    return (f"{workdir / chosen['file']}: round {chosen['round']}, held-out c-index {_fmt(chosen['heldout_cindex'])} "
            f"[{_fmt(lower)}, {_fmt(upper)}]{validation}\n    {chosen['chosen']}")


def print_results(workdir: Path, uri: str, min_events: int, eval_fraction: float) -> None:
    results = json.loads((workdir / "results.json").read_text())
    last = results["rounds"][-1]["metrics"] if results["rounds"] else {}
    typer.echo(f"\nfinal round, the global model on every site's held-out patients ({eval_fraction:.0%} of each "
               "site's, never trained on): c-index [95% interval]")
    typer.echo(f"{'cancer':<10}{'site-stratified':>26}{'cross-site':>26}{'patients':>10}{'deaths':>8}")
    for cancer in [*_cancers(last), "all"]:
        patients, deaths = last.get(f"eval_patients/{cancer}"), last.get(f"eval_events/{cancer}")
        typer.echo(f"{cancer:<10}{_with_interval(last, 'cindex', cancer):>26}"
                   f"{_with_interval(last, 'cindex_cross', cancer):>26}"
                   f"{'-' if patients is None else int(patients):>10}{'-' if deaths is None else int(deaths):>8}")
    if any(last.get(f"few_events/{c}") for c in [*_cancers(last), "all"]):
        typer.echo(f"* fewer than {min_events} deaths among the held-out patients: the c-index is unreliable")
    typer.echo("")
    for which in ("best", "last"):
        if (chosen := results.get(which)) is not None:
            typer.echo(chosen_line(workdir, chosen))
    typer.echo(f"model: {workdir / 'model.pt'}")
    # MLflow 3's UI opens an experiment on GenAI pages unless the browser chose "Model training": the link says
    # so, and our app (server/mlflow_app.py) makes model training the default of a browser that never chose.
    run = (results.get("experiment_id"), results.get("run_id"))
    if uri.startswith("sqlite:///"):
        typer.echo(f"dashboard: mlflow ui --app-name cancermoe --backend-store-uri {uri} --port 5000   "
                   f"(then open {dashboard_url('http://127.0.0.1:5000', *run)})")
    else:
        typer.echo(f"dashboard: {dashboard_url(uri, *run) or uri}")


def main() -> None:
    run_app(cli)


if __name__ == "__main__":
    sys.exit(main())
