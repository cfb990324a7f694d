"""`cmoe-simulate`: the federated job over many virtual sites on Flower's Ray simulation, on one machine or an
existing Ray cluster.

    cmoe-simulate A.h5 B.h5 C.h5 --rounds 5 --workdir runs/sim          # one virtual site per bank
    cmoe-simulate --sites 100 --alpha 0.5 --rounds 5 --workdir runs/sim  # one synthetic world split into 100 sites
    cmoe-simulate --sites 1000 ... --ray-address HOST:6379               # an existing Ray cluster

The coordinator is the ServerApp job `cmoe-server` submits and each site the ClientApp `cmoe-client` runs
(`simulate.engine`), so the model, the aggregation, the evaluation, the checkpoints and the MLflow tracking
(default ``sqlite:///<workdir>/mlflow.db``) are those of a real federation. The workdir holds the job's files
as `cmoe-server`'s does, plus ``banks/`` (a synthetic world's banks), ``sites/<site>/`` (each site's workdir)
and ``sites.json`` (who the sites are and their patients per cancer).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import typer

from cancermoe.cli.common import list_config_option, run_app
from cancermoe.config import CancerMoEConfig, load_config
from cancermoe.errors import InputError
from cancermoe.files import write_text_atomically
from server.cli import format_progress, prepare_workdir, print_results
from server.config import (
    AGGREGATIONS,
    configs_to_json,
    federated_model_config,
    federation_config,
    federation_listing,
    split_overrides,
)
from simulate import engine
from simulate.sites import VirtualSite, WorldSplit, bank_sites, describe, write_world_banks

SITES_FILE = "sites.json"
# A round waits for every virtual site: there is no hospital that may have gone away, only a queue of sites
# taking turns on the CPUs, so the default timeout is a day, not cmoe-server's 15 minutes (--set overrides it).
ROUND_TIMEOUT = 86_400.0

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def main_cmd(
    banks: list[Path] = typer.Argument(None, metavar="[BANK.h5]...", help="One virtual site per bank."),
    sites: int = typer.Option(None, "--sites", min=1, help="Split one synthetic world into this many sites."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Federated rounds."),
    workdir: Path = typer.Option(Path("cmoe-simulate"), "--workdir", help="Job files, banks, site folders."),
    min_sites: int = typer.Option(None, "--min-sites", min=1, help="Sites every round needs (default: all)."),
    config_file: Path = typer.Option(None, "--config", help="TOML file of model/training config keys."),
    overrides: list[str] = typer.Option(None, "--set", help="key=value for any model, training or federation key."),
    aggregation: str = typer.Option("load-aware", "--aggregation", help=" | ".join(AGGREGATIONS)),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow URI (default: sqlite in --workdir)."),
    experiment: str = typer.Option("cancermoe-fl", "--experiment", help="MLflow experiment name."),
    force: bool = typer.Option(False, "--force", help="Discard a job already in --workdir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the job in --workdir from its last round "
                                                        "(the same sites; --rounds may be raised)."),
    # the synthetic world (without banks)
    cancers: str = typer.Option("BRCA,KIRC,LUAD", "--cancers", help="The world's cancers, comma-separated."),
    alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet concentration of each site's cancer mix "
                                                     "(small: one cancer a site; large: the world's mix)."),
    patients: float = typer.Option(40.0, "--patients-per-site", help="Mean site size (log-normal)."),
    size_sd: float = typer.Option(0.5, "--size-sd", help="SD of a site's log size (0: equal sites)."),
    min_patients: int = typer.Option(12, "--min-patients", help="No site smaller than this."),
    split_seed: int = typer.Option(0, "--split-seed", help="Draws the sizes, the mixes and the patients."),
    world_seed: int = typer.Option(0, "--world-seed", help="The biology every site shares."),
    patches: int = typer.Option(50, "--patches", min=1, help="Typical patches per slide."),
    feature_dim: int = typer.Option(16, "--feature-dim", min=1, help="Patch feature dimension."),
    genomic_features: int = typer.Option(16, "--genomic-features", min=8),
    risk_sd: float = typer.Option(2.0, "--risk-sd", min=0.0, max=10.0, help="Signal strength (SD of log-hazard)."),
    # Ray
    ray_address: str = typer.Option(None, "--ray-address",
                                    help="Use this Ray cluster (HOST:PORT, auto, ray://HOST:10001); banks and "
                                         "--workdir must be at the same paths on its nodes."),
    cpus: float = typer.Option(None, "--cpus", help="CPUs of the local Ray instance (default: all cores)."),
    cpus_per_site: float = typer.Option(1.0, "--cpus-per-site", help="CPUs a virtual site's message asks for "
                                                                     "(0.5: two sites per CPU)."),
    gpus_per_site: float = typer.Option(0.0, "--gpus-per-site", min=0.0, help="GPUs a site asks for (a fraction)."),
    device: str = typer.Option("auto", "--device", help="The sites' torch device (auto: CUDA when Ray gives one)."),
    verbose: bool = typer.Option(False, "--verbose", help="Flower's own log too (every round's metrics, per site)."),
    _list_config: bool = list_config_option(federation_listing),
) -> None:
    """Simulate a federation of many sites with the real coordinator and site code on Ray."""
    started = time.monotonic()
    if not ray_installed():
        raise InputError("cmoe-simulate", "needs Flower's simulation engine (Ray): pip install "
                                          "'cancermoe-fl[simulation]'")
    workdir = workdir.resolve()
    resources = ray_resources(ray_address, cpus, cpus_per_site, gpus_per_site)
    if banks and sites is not None:
        raise InputError("--sites", "give banks (one site each) or --sites (a synthetic world), not both")
    if not banks and sites is None:
        raise InputError("cmoe-simulate", "no sites: give banks (one site each) or --sites N (a synthetic world)")
    split = None
    if sites is not None:
        split = WorldSplit(sites=sites, cancers=tuple(c.strip() for c in cancers.split(",") if c.strip()),
                           alpha=alpha, mean_patients=patients, size_sd=size_sd, min_patients=min_patients,
                           seed=split_seed, world_seed=world_seed, patches=patches, feature_dim=feature_dim,
                           genomic_features=genomic_features, risk_sd=risk_sd)
        split.specs("--sites")  # every value checked before anything is written
        n_sites = sites
    else:
        n_sites = len(banks)
    if min_sites is not None and min_sites > n_sites:
        raise InputError("--min-sites", f"{min_sites} is more than the {n_sites} sites simulated")
    flags = {"rounds": rounds, "min_sites": min_sites or n_sites, "aggregation": aggregation,
             "round_timeout": ROUND_TIMEOUT}
    if split is None:  # the given banks and the configs are checked before anything is written
        virtual = bank_sites(banks, workdir)
        model, federation = configs(config_file, overrides or [], bank_feature_dim(virtual), flags)
    else:
        model, federation = configs(config_file, overrides or [], split.feature_dim, flags)
    if resume and force:
        raise InputError("--resume", "contradicts --force: continue the job or discard it, not both")
    prepare_workdir(workdir, resume=resume, force=force)
    if resume:
        check_same_sites(workdir, virtual if split is None else None, split)
    if force:
        shutil.rmtree(workdir / "sites", ignore_errors=True)  # the old job's DPS caches and audit logs
    if split is not None:
        virtual = write_world_banks(split, workdir / "banks", workdir)
    table = describe(virtual)
    write_text_atomically(workdir / SITES_FILE, json.dumps(
        {"world_split": split.__dict__ if split else None, "sites": table}, indent=2, default=list))
    write_text_atomically(workdir / "effective-config.json",
                          json.dumps({"model": model.to_dict(), "federation": federation.to_dict()}, indent=2))
    typer.echo(summary_line(table, resources))
    uri = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    run_config = {"configs": configs_to_json(model, federation), "workdir": str(workdir), "tracking-uri": uri,
                  "experiment": experiment, "resume": resume}
    for site in virtual:
        site.workdir.mkdir(parents=True, exist_ok=True)
    if not verbose:  # Flower logs every round's whole metric record: hundreds of lines a round with many sites
        logging.getLogger("flwr").setLevel(logging.WARNING)
    stop = threading.Event()
    arrived: list[tuple[dict, float]] = []
    done = rounds_done(workdir) if resume else 0
    printer = threading.Thread(target=print_progress, args=(workdir / "progress.jsonl", stop, arrived, done),
                               daemon=True)
    printer.start()
    try:
        engine.run(virtual, run_config, resources, device)
    except Exception as exc:  # the ServerApp's failure, re-raised by Flower in this thread
        failure = workdir / "failure.txt"
        why = failure.read_text().strip() if failure.exists() else f"{type(exc).__name__}: {exc}"
        typer.echo(f"error: the simulated federation failed: {why}", err=True)
        raise typer.Exit(1) from None
    finally:
        stop.set()
        printer.join()
    typer.echo(timing_line(started, time.monotonic(), arrived, n_sites))
    print_results(workdir, uri, federation.min_eval_events, federation.eval_fraction)


def check_same_sites(workdir: Path, virtual: list[VirtualSite] | None, split: WorldSplit | None) -> None:
    """A resumed job must have the sites it started with (their DPS caches and held-out splits are in its
    workdir, its time bins and genomic layout came from their round-0 replies)."""
    path = workdir / SITES_FILE
    if not path.exists():
        raise InputError(workdir, f"has no {SITES_FILE}: not a cmoe-simulate job")
    before = json.loads(path.read_text())
    if split is not None:
        same = before["world_split"] == json.loads(json.dumps(split.__dict__))
    else:
        same = [row["bank"] for row in before["sites"]] == [str(site.bank) for site in virtual or []]
    if not same:
        raise InputError("--resume", f"the job in {workdir} ran on other sites (see {path}); give the same banks "
                                     "or world split")


def rounds_done(workdir: Path) -> int:
    """The last round the job in ``workdir`` committed (its checkpoint's)."""
    import torch

    return int(torch.load(workdir / "checkpoint.pt", weights_only=False)["round"])


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def ray_resources(address: str | None, cpus: float | None, cpus_per_site: float,
                  gpus_per_site: float) -> engine.RayResources:
    if not cpus_per_site > 0:
        raise InputError("--cpus-per-site", f"{cpus_per_site} must be > 0")
    if address:
        if cpus is not None:
            raise InputError("--cpus", "sizes a local Ray instance; the cluster at --ray-address has its own")
        check_ray_address(address)
        return engine.RayResources(cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site, address=address)
    if cpus is not None and not cpus > 0:
        raise InputError("--cpus", f"{cpus} must be > 0")
    if cpus_per_site > (cpus or 0) and cpus is not None:
        raise InputError("--cpus-per-site", f"{cpus_per_site} is more than the {cpus} CPUs of --cpus: no site "
                                            "could run")
    return engine.RayResources(cpus=cpus, cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT cluster address must answer before Ray is asked to join it (ray.init would wait a minute and
    print pages); ``auto`` and ``ray://`` addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError("--ray-address", f"{address!r} is not HOST:PORT (or auto, or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise InputError("--ray-address", f"cannot reach a Ray cluster at {address} ({why.lower()})") from None


def bank_feature_dim(sites: list[VirtualSite]) -> int:
    from cancermoe.bank import open_bank

    dims = {}
    for site in sites:
        with open_bank(site.bank) as bank:
            dims.setdefault(bank.feature_dim, site.bank)
    if len(dims) > 1:
        (d1, b1), (d2, b2) = list(dims.items())[:2]
        raise InputError(b2, f"has feature dimension {d2}, {b1} has {d1}: every site's bank must have the same")
    return next(iter(dims))


def configs(config_file: Path | None, overrides: list[str], feature_dim: int, flags: dict):
    """As `server.config.resolve_configs`, with the banks' feature dimension as the model's default."""
    federation_values, model_items = split_overrides(overrides)
    model = federated_model_config(load_config(str(config_file) if config_file else None, model_items,
                                               base=CancerMoEConfig(feature_dim=feature_dim)))
    if model.feature_dim != feature_dim:
        raise InputError("--set", f"feature_dim={model.feature_dim} does not match the banks' {feature_dim}")
    return model, federation_config({**flags, **federation_values})


def summary_line(table: list[dict], resources: engine.RayResources) -> str:
    sizes = [sum(row["patients"].values()) for row in table]
    cancers = sorted({c for row in table for c in row["patients"]})
    where = (f"Ray cluster {resources.address}" if resources.address
             else f"local Ray, {resources.backend_config()['init_args']['num_cpus']} CPUs")
    return (f"{len(table)} virtual sites, {sum(sizes)} patients ({', '.join(cancers)}), per site min "
            f"{min(sizes)} / median {statistics.median(sizes):g} / max {max(sizes)}; {where}, "
            f"{resources.cpus_per_site:g} CPU per site")


def print_progress(path: Path, stop: threading.Event, arrived: list[tuple[dict, float]], done: int = 0,
                   every: float = 0.5) -> None:
    """Each round's line (`server.cli.format_progress`) as the ServerApp appends it to progress.jsonl; ``arrived``
    gets each row of a round after ``done`` (the rounds a resumed job had already run) with the monotonic time it
    was seen (for `timing_line`)."""
    printed = 0
    while True:
        finished = stop.wait(every)
        # only whole lines: the ServerApp may be half-way through appending one
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        for line in lines[printed:]:
            row = json.loads(line)
            if row["round"] > done:
                arrived.append((row, time.monotonic()))
            typer.echo(format_progress(row))
        printed = len(lines)
        if finished:
            return


def timing_line(started: float, ended: float, arrived: list[tuple[dict, float]], n_sites: int) -> str:
    """Where the wall time went: before round 1 (banks written, Ray and its workers started, round 0), the rounds
    (from round 1's start, its line's arrival less its own seconds, to the last round's line: training,
    evaluation, aggregation, checkpoints and MLflow of every round) per site-round, and after (final models,
    MLflow artifacts and registry, Ray shut down)."""
    wall = ended - started
    if not arrived:
        return f"{n_sites} sites: {wall:.1f} s, no round completed"
    first_row, first_seen = arrived[0]
    rounds_start = first_seen - float(first_row["seconds"])
    rounds = arrived[-1][1] - rounds_start
    n_rounds = len(arrived)
    return (f"{n_sites} sites x {n_rounds} rounds: {wall:.1f} s wall = {rounds_start - started:.1f} s before round 1 "
            f"(banks, Ray, round 0) + {rounds:.1f} s of rounds + {ended - arrived[-1][1]:.1f} s after; "
            f"{rounds / (n_sites * n_rounds):.3f} s per site-round")


def main() -> None:
    run_app(cli)


if __name__ == "__main__":
    sys.exit(main())
