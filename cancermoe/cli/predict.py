"""`cmoe-predict`: score the patients of a bank with a trained model, at the site; nothing leaves the machine.

MODEL is a model file (``model.pt``, ``best.pt``), a folder holding one (a `cmoe-server` workdir, a `cmoe-train`
--out), or an MLflow model URI (``models:/cancermoe/3``, ``runs:/<run id>/best_model``), which the glue module
``server.registry`` resolves to the model file inside it (imported only then: this package imports no MLflow).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import tempfile
from pathlib import Path

import typer

from cancermoe.cli.common import run_app
from cancermoe.cohort import open_cohort
from cancermoe.errors import InputError
from cancermoe.heatmaps import write_heatmaps
from cancermoe.predict import (
    km_by_risk_group,
    load_model_state,
    model_config,
    predict_cohort,
    resolve_model_file,
    slide_patches,
)
from cancermoe.reports import cindex_summary, write_km, write_predictions, write_summary
from cancermoe.survival import MIN_EVENTS_FOR_CINDEX
from cancermoe.train import resolve_device, seed_everything

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

MODEL_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # models:/..., runs:/..., s3://... (not C:\ or a path)
PREDICTIONS = "predictions.csv"


@app.command()
def main_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="Model file, workdir, or MLflow URI (models:/cancermoe/1)."),
    banks: list[Path] = typer.Argument(..., metavar="BANK.h5 [BANK2.h5 ...]", help="Banks of patients to predict."),
    out: Path = typer.Option(..., "--out", help="Folder for predictions.csv, KM curves, heatmaps, summary.json."),
    heatmaps: bool = typer.Option(False, "--heatmaps", help="Per slide: patch scores as CSV, GeoJSON, PNG."),
    patch_size: int = typer.Option(None, "--patch-size", min=1,
                                   help="Patch side at level 0 for the heatmaps (default: from the bank's coords)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                     help="MLflow tracking URI, for a models:/ or runs:/ MODEL."),
    force: bool = typer.Option(False, "--force", help="Replace the predictions already in --out."),
    as_json: bool = typer.Option(False, "--json", help="Last stdout line: one JSON object (the summary)."),
) -> None:
    """Predict risk, risk group and survival per time bin for every patient of the banks (labels optional)."""
    if (out / PREDICTIONS).exists() and not force:
        raise InputError(out, f"already holds {PREDICTIONS} (use --force to replace)")
    try:
        torch_device = resolve_device(device)
    except ValueError as exc:
        raise InputError("--device", str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="cmoe-model-") as download:
        model_file = _model_file(model, tracking_uri, Path(download))
        state = load_model_state(model_file)
    config = model_config(state, model_file)
    seed_everything(config.seed)
    cohort = open_cohort(banks)
    prediction = predict_cohort(state, cohort, device=torch_device, patches=heatmaps, where=model_file)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(prediction, out / PREDICTIONS)
    summary = {"model": model, "model_file": str(model_file) if not MODEL_URI.match(model) else model_file.name,
               "banks": [str(b) for b in banks], "patients": len(cohort), "labelled": int(prediction.labelled.sum()),
               "test_time_dps_passes": config.test_time_dps_passes,
               "risk_groups": prediction.risk_groups.to_dict() if prediction.risk_groups else None}
    evaluation = prediction.evaluation()
    if evaluation is not None:
        summary["cindex"] = cindex_summary(evaluation)
        curves = km_by_risk_group(prediction)
        if curves:
            write_km(curves, out / "km_by_risk_group.csv", out / "km_by_risk_group.png")
    if heatmaps:
        written = write_heatmaps(slide_patches(prediction, patch_size), out / "heatmaps")
        summary["heatmap_slides"] = len(written) // 3
    write_summary(summary, out / "summary.json")
    if not as_json:
        _print(summary, out)
    else:
        typer.echo(json.dumps(summary))


def _model_file(model: str, tracking_uri: str | None, download: Path) -> Path:
    """The model file MODEL names; an MLflow URI is resolved (and its model file downloaded) by `server.registry`."""
    if not MODEL_URI.match(model) or Path(model).exists():
        return resolve_model_file(model)
    try:
        registry = importlib.import_module("server.registry")  # glue outside this package: imports MLflow
    except ImportError as exc:
        raise InputError(model, f"an MLflow model URI needs the server package and MLflow ({exc})") from None
    return registry.model_file_from_uri(model, tracking_uri, download)


def _print(summary: dict, out: Path) -> None:
    typer.echo(f"predicted {summary['patients']} patients ({summary['labelled']} with survival data) -> "
               f"{out / PREDICTIONS}")
    groups = summary["risk_groups"]
    if groups:
        typer.echo(f"risk groups: {', '.join(f'{q:.0%}' for q in groups['quantiles'])} quantiles of "
                   f"{groups['source']}")
    else:
        typer.echo("risk groups: none stored with this model (saved before they were), column left empty")
    if "cindex" not in summary:
        return
    typer.echo(f"{'cancer':<10}{'c-index':>10}{'95% interval':>18}{'patients':>10}{'deaths':>8}")
    for cancer, row in summary["cindex"].items():
        few = "*" if row["deaths"] < MIN_EVENTS_FOR_CINDEX else ""
        interval = "-" if row["lower"] is None else f"[{row['lower']:.3f}, {row['upper']:.3f}]"
        typer.echo(f"{cancer:<10}{_fmt(row['cindex']) + few:>10}{interval:>18}{row['patients']:>10}"
                   f"{row['deaths']:>8}")
    if any(row["deaths"] < MIN_EVENTS_FOR_CINDEX for row in summary["cindex"].values()):
        typer.echo(f"* fewer than {MIN_EVENTS_FOR_CINDEX} deaths: unreliable")


def _fmt(value: float | None) -> str:
    return "undefined" if value is None or math.isnan(value) else f"{value:.4f}"


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
