"""`cmoe-bank`: build, import and inspect site patch banks."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cancermoe.bank import open_bank, validate_bank
from cancermoe.cli.common import run_app
from cancermoe.progress import progress_bar

CANCER_HELP = ("TCGA study of every row, e.g. BRCA (default: from a tcga_<study>_ file name, else each row's "
               "oncotree_code mapped to its study).")
CANCER_BY_HELP = ("study | subtype: what a patient's cancer is (the key of the stratified c-index, the per-cancer "
                  "metrics and the genomics matrix). subtype makes each oncotree_code (IDC, ILC, ...) a cancer of "
                  "its own; either way the code is kept as the patient's subtype.")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build, import and inspect site patch banks (HDF5, one file per hospital).",
)


@app.command("import-clam")
def import_clam_cmd(
    out: Path = typer.Argument(..., help="Bank file to write (.h5)."),
    features_dir: Path = typer.Option(..., "--features-dir", help="CLAM output folder (h5_files/ or pt_files/)."),
    table: Path = typer.Option(..., "--table", help="TCGA table (.csv or .csv.zip), MCAT/PORPOISE layout."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    skip_bad_slides: bool = typer.Option(False, "--skip-bad-slides", help="Skip slides with bad features, list them."),
    feature_dtype: str = typer.Option("float16", "--dtype", help="Stored feature type: float16 or float32."),
    cancer: str = typer.Option(None, "--cancer", help=CANCER_HELP),
    cancer_by: str = typer.Option("study", "--cancer-by", help=CANCER_BY_HELP),
) -> None:
    """Import CLAM feature files and a TCGA table into one bank."""
    from cancermoe.importers import import_clam

    report = import_clam(out, features_dir, table, force=force, skip_bad_slides=skip_bad_slides,
                         feature_dtype=feature_dtype, cancer=cancer, cancer_by=cancer_by, show_progress=True)
    typer.echo(report.describe())


@app.command("import-tcga")
def import_tcga_cmd(
    out: Path = typer.Argument(..., help="Bank file to write; with --sites-by, a folder for one bank per site."),
    table: Path = typer.Option(..., "--table", help="TCGA table (.csv or .csv.zip), MCAT/PORPOISE layout."),
    sites_by: str = typer.Option(None, "--sites-by", help="Table column that names each patient's site."),
    min_patients: int = typer.Option(40, "--min-patients", help="With --sites-by: group small sites up to this."),
    force: bool = typer.Option(False, "--force", help="Replace existing banks."),
    cancer: str = typer.Option(None, "--cancer", help=CANCER_HELP),
    cancer_by: str = typer.Option("study", "--cancer-by", help=CANCER_BY_HELP),
) -> None:
    """Genomics-only banks from a TCGA table (optionally one per tissue-source site)."""
    from cancermoe.importers import import_tcga

    for report in import_tcga(out, table, sites_by=sites_by, min_patients=min_patients, force=force, cancer=cancer,
                              cancer_by=cancer_by):
        typer.echo(report.describe())


@app.command("synth")
def synth_cmd(
    out: Path = typer.Argument(..., help="Bank file to write (.h5)."),
    site: str = typer.Option("A", "--site", help="Site name stored in the bank."),
    patients: int = typer.Option(200, "--patients", min=2),
    cancers: str = typer.Option("BRCA,LUAD", "--cancers", help="Comma-separated cancer codes."),
    patches: int = typer.Option(5000, "--patches", min=1, help="Typical patches per slide."),
    seed: int = typer.Option(1, "--seed", help="Draws this site's patients."),
    world_seed: int = typer.Option(0, "--world-seed", help="Fixes the shared biology across sites."),
    feature_dim: int = typer.Option(1024, "--feature-dim", min=1),
    event_rate: float = typer.Option(0.5, "--event-rate", min=0.0, max=1.0),
    signal_fraction: float = typer.Option(0.01, "--signal-fraction", min=0.0, max=1.0),
    genomic_features: int = typer.Option(64, "--genomic-features", min=8),
    risk_sd: float = typer.Option(1.0, "--risk-sd", min=0.0, max=10.0,
                                  help="SD of the true log-hazard within a cancer (signal strength)."),
    feature_dtype: str = typer.Option("float16", "--dtype"),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """A synthetic cohort with a planted prognostic signal and a known oracle risk."""
    from cancermoe.synthetic import SynthSpec, synthesize_bank

    spec = SynthSpec(
        site=site, patients=patients, cancers=tuple(c.strip() for c in cancers.split(",") if c.strip()),
        patches=patches, seed=seed, world_seed=world_seed, feature_dim=feature_dim, event_rate=event_rate,
        signal_fraction=signal_fraction, genomic_features=genomic_features, feature_dtype=feature_dtype,
        risk_sd=risk_sd,
    )
    path = synthesize_bank(out, spec, force=force, show_progress=True)
    typer.echo(f"wrote {path}")


@app.command("inspect")
def inspect_cmd(
    bank_path: Path = typer.Argument(..., metavar="BANK.h5"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Validate a bank fully (every feature row) and summarize it."""
    from cancermoe.summary import summarize_bank  # scikit-survival: imported only when needed

    with open_bank(bank_path) as bank:
        total = sum(bank.n_patches(s) for s in bank.slide_ids())
        advance, close = progress_bar(total, "validating", enabled=not as_json)
        try:
            validate_bank(bank, progress=advance)
        finally:
            close()
        summary = summarize_bank(bank)
        summary["subtypes"] = bank.subtypes()
        if "cancer_by" in bank.attrs:
            summary["cancer_by"] = bank.attrs["cancer_by"]
    if as_json:
        typer.echo(json.dumps(summary))
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    typer.echo(f"{summary['path']}: valid patch bank (schema {summary['schema_version']}, {summary['source']})")
    typer.echo(f"  patients  {summary['patients']}  ({summary['patients_with_slides']} with slides, "
               f"{summary['patients_with_genomics']} with genomics)")
    typer.echo(f"  events    {summary['events']}")
    if summary["unlabelled"]:
        typer.echo(f"  unlabelled {summary['unlabelled']}  (no survival data: predicted, not trained on)")
    typer.echo(f"  slides    {summary['slides']}  patches {summary['patches']}  "
               f"features {summary['feature_dim']} x {summary['feature_dtype']}")
    if "cancer_by" in summary:
        typer.echo(f"  cancer    by {summary['cancer_by']}")
    for cancer, n in summary["cancers"].items():
        line = f"  {cancer:<8}  {n} patients, {summary['genomic_features'].get(cancer, 0)} genomic features"
        subtypes = summary["subtypes"].get(cancer, {})
        if set(subtypes) - {"", cancer}:  # nothing to add when the only subtype is the cancer itself
            line += "; subtypes " + ", ".join(f"{s or '(none)'} {k}" for s, k in subtypes.items())
        typer.echo(line)
    if "oracle_cindex" in summary:
        typer.echo(f"  oracle c-index  {summary['oracle_cindex']}")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
