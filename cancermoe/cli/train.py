"""`cmoe-train`: train CancerMoE on one or more banks pooled (the centralized baseline).

Under ``torchrun --nproc-per-node K -m cancermoe.cli.train ...`` each process
trains on its shard of the patients with DistributedDataParallel (NCCL on
GPUs, gloo on CPU); only rank 0 writes checkpoints and prints.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

import typer

from cancermoe.cli.common import list_config_option, run_app
from cancermoe.cohort import Cohort, labelled_patients, open_cohort
from cancermoe.config import CancerMoEConfig, config_listing, describe_keys, load_config
from cancermoe.errors import InputError
from cancermoe.experiment import (
    ABLATIONS,
    ExperimentResult,
    HeldOut,
    ablated,
    fits_per_training_set,
    prepare_out_dir,
    run_experiment,
)
from cancermoe.files import write_text_atomically
from cancermoe.genomics import GenomicLayout
from cancermoe.progress import progress_bar
from cancermoe.survival import MIN_EVENTS_FOR_CINDEX, PairCounts
from cancermoe.train import EpochReport, resolve_device, seed_everything

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main_cmd(
    banks: list[Path] = typer.Argument(..., metavar="BANK.h5 [BANK2.h5 ...]", help="Training banks (pooled)."),
    out: Path = typer.Option(..., "--out", help="Folder for checkpoints, score caches and the final model."),
    eval_banks: list[Path] = typer.Option(None, "--eval", help="Evaluate on these banks (repeatable)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Training epochs (default from config: 20)."),
    tokens: int = typer.Option(None, "--tokens", min=1, help="N: WSI tokens per patient (default 3072)."),
    folds: int = typer.Option(None, "--folds", help="K-fold cross-validation by patient."),
    splits: Path = typer.Option(None, "--splits", help="Folder of splits_<k>.csv (train, val case ids): those folds."),
    holdout: float = typer.Option(0.2, "--holdout", min=0.01, max=0.9,
                                  help="Held-out fraction when neither --eval nor --folds is given."),
    config_file: Path = typer.Option(None, "--config", help="TOML file setting config keys."),
    overrides: list[str] = typer.Option(None, "--set", help="key=value config override (repeatable)."),
    ablate: str = typer.Option(None, "--ablate", help=f"Ablation: {' | '.join(ABLATIONS)}."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    seed: int = typer.Option(None, "--seed", help="Random seed (default from config: 0)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Discard a run already in --out and start over."),
    as_json: bool = typer.Option(False, "--json", help="Last stdout line: one JSON object of results."),
    tracking_uri: str = typer.Option(None, "--tracking-uri",
                                     help="Also log the run (config, c-index per cancer, model) to this MLflow store."),
    experiment: str = typer.Option("cancermoe-fl", "--experiment", help="MLflow experiment (with --tracking-uri)."),
    _list_config: bool = list_config_option(lambda: config_listing(describe_keys(CancerMoEConfig))),
) -> None:
    """Train on the given banks pooled; report the c-index per cancer."""
    flags = [f"{k}={v}" for k, v in (("epochs", epochs), ("tokens", tokens), ("seed", seed)) if v is not None]
    config = ablated(load_config(config_file, [*(overrides or []), *flags]), ablate)
    rank, world = _distributed_setup(device)
    try:
        torch_device = resolve_device(_local_device(device, rank, world))
    except ValueError as exc:
        raise InputError("--device", str(exc)) from None
    seed_everything(config.seed)
    if rank == 0:
        prepare_out_dir(out, resume=resume, force=force)
    show = rank == 0 and not as_json

    def note(message: str) -> None:
        if rank == 0:
            typer.echo(f"note: {message}", err=True)

    cohort = labelled_patients(open_cohort(banks), "training", note)
    eval_cohort = labelled_patients(open_cohort(eval_banks), "evaluation", note) if eval_banks else None
    _check_genomic_layout(config, cohort, banks)

    runs = len(list(splits.glob("splits_*.csv"))) if splits else folds if folds and eval_cohort is None else 1
    advance, close = progress_bar(runs * config.epochs * fits_per_training_set(config), "epochs", enabled=show)

    def on_epoch(report: EpochReport) -> None:
        advance(1)
        if show:
            typer.echo(f"epoch {report.epoch:>3}  loss {report.loss:.4f}  "
                       f"train c-index {_fmt(report.train_cindex)}  "
                       + ("" if math.isnan(report.validation_cindex) else
                          f"validation c-index {_fmt(report.validation_cindex)}  ")
                       + f"{report.seconds:.1f}s"
                       + ("  (DPS scores adopted)" if report.adopted_scores else ""), err=True)

    def on_batch(patients: int, loss: float) -> None:
        advance(0, description=f"epochs  (batch loss {loss:.3f})")

    try:
        result = run_experiment(config, cohort, out, device=torch_device, eval_cohort=eval_cohort, folds=folds,
                                holdout=holdout, splits=splits, resume=resume, shard=(rank, world), on_epoch=on_epoch,
                                on_batch=on_batch)
    finally:
        close()
    if rank == 0:
        _print_table(result, config.epochs, str(torch_device))
        write_text_atomically(out / "results.json", json.dumps(result.to_json(), indent=2))
        if tracking_uri:
            _log_to_mlflow(tracking_uri, experiment, result.to_json(), out, config.to_dict(), show)
        if as_json:
            typer.echo(json.dumps(result.to_json()))


def _log_to_mlflow(tracking_uri: str, experiment: str, results: dict, out: Path, params: dict, show: bool) -> None:
    """Through the glue module `server.registry` (imported by name: this package imports no MLflow). A store that
    cannot be reached costs a warning: the run's results are in --out either way."""
    try:
        registry = importlib.import_module("server.registry")
        run_id = registry.log_centralized_run(tracking_uri, experiment, results, out, params)
    except Exception as exc:  # an unreachable or refusing store: the training itself succeeded
        typer.echo(f"warning: {tracking_uri}: run not logged to MLflow ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''})", err=True)
        return
    if show:
        typer.echo(f"logged to MLflow: {tracking_uri}, experiment {experiment}, run {run_id}", err=True)


def _distributed_setup(device: str) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    use_cuda = device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world


def _local_device(device: str, rank: int, world: int) -> str:
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return device


def _fmt(value: float) -> str:
    return "undefined" if value is None or math.isnan(value) else f"{value:.3f}"


def _check_genomic_layout(config: CancerMoEConfig, cohort: Cohort, banks: list[Path]) -> None:
    """The training cancers' genomic tokens must fit the model's position table: a one-line error before training."""
    if not (config.use_genomics and config.genomics_by_cancer):
        return
    try:
        GenomicLayout.of_cohort(cohort, config.genomic_piece).check_fits(config.max_genomic_tokens)
    except ValueError as exc:
        raise InputError(", ".join(map(str, banks)), str(exc)) from None


def _print_table(result: ExperimentResult, epochs: int, device: str) -> None:
    typer.echo(f"CancerMoE, {result.protocol}, {epochs} epochs, {result.params} parameters, {device}, "
               f"{result.seconds:.0f}s")
    typer.echo(f"{'cancer':<10}{'c-index':>10}{'95% interval':>18}{'patients':>10}{'deaths':>8}")
    for cancer, value in result.eval_cindex_per_cancer.items():
        held = result.eval_per_cancer.get(cancer, HeldOut())
        typer.echo(f"{cancer:<10}{_fmt(value) + ('*' if held.few_events else ''):>10}"
                   f"{_interval(held.counts):>18}{held.patients:>10}{held.deaths:>8}")
    spread = "" if math.isnan(result.eval_cindex_sd) else f" +- {result.eval_cindex_sd:.3f} (sd over folds)"
    patients = sum(h.patients for h in result.eval_per_cancer.values())
    deaths = sum(h.deaths for h in result.eval_per_cancer.values())
    typer.echo(f"{'all':<10}{_fmt(result.eval_cindex):>10}{_interval(result.eval_counts):>18}{patients:>10}"
               f"{deaths:>8}{spread}   (train {_fmt(result.train_cindex)})")
    if any(h.few_events for h in result.eval_per_cancer.values()):
        typer.echo(f"* fewer than {MIN_EVENTS_FOR_CINDEX} deaths among the evaluation patients: unreliable")


def _interval(counts: PairCounts) -> str:
    lower, upper = counts.interval()
    return "-" if math.isnan(lower) else f"[{lower:.3f}, {upper:.3f}]"


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
