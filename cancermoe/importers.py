"""Importers: what real users have (CLAM feature files, TCGA tables) -> site patch banks.

Two entry points, both used by ``cmoe-bank``:

- `import_clam`: the output folder of CLAM's ``extract_features_fp.py`` plus a
  TCGA table -> one bank with slides, survival and genomics.
- `import_tcga`: a TCGA table alone -> genomics-only banks, either one bank or
  one per tissue-source site (the natural federated split of TCGA).

Both check the output path before any slow work, validate the table fully
(`cancermoe.tables`) before writing, and write through `BankWriter`, so a
failure leaves no file behind. Each returns an `ImportReport`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cancermoe.bank import FEATURE_DTYPES, BadSlideError, BankWriter, check_hdf5_file
from cancermoe.errors import InputError
from cancermoe.progress import progress_bar
from cancermoe.tables import SurvivalTable, TablePatient, check_cancer_by, read_survival_table

CLAM_FEATURE_DIM = 1024  # ResNet50 (truncated) features of CLAM; also the dim of genomics-only banks
GRID_STEP_PX = 256  # CLAM's default patch size at level 0: the step of the made-up grid for .pt files
FLOAT16_MAX = float(np.finfo(np.float16).max)
REPORT_LIST_LIMIT = 10  # how many ids `ImportReport.describe` names before "... and N more"

# Where CLAM's feature files may be, in order of preference: .h5 files carry
# the patch coords, .pt files only the features.
_FEATURE_FILE_PLACES = (("h5_files", ".h5"), ("", ".h5"), ("pt_files", ".pt"), ("", ".pt"))


@dataclass
class ImportReport:
    """What one import wrote, and what it left out and why."""

    path: Path
    source: str
    table: str
    patients: int = 0
    events: int = 0
    unlabelled: int = 0  # patients without survival data: predicted, never trained on
    patients_with_genomics: int = 0
    slides: int = 0
    patches: int = 0
    missing_slide_files: list[str] = field(default_factory=list)
    skipped_slides: list[tuple[str, str]] = field(default_factory=list)  # (slide id, reason)
    dropped_patients: list[str] = field(default_factory=list)  # case ids with no slide and no genomics
    grid_layout: int = 0  # slides read from .pt files: no coords, patches laid on a square grid
    site: str | None = None
    sites: list[str] = field(default_factory=list)
    subtypes: dict[str, dict[str, int]] = field(default_factory=dict)  # {cancer: {subtype: patients}} written

    def describe(self) -> str:
        """A few lines for a person: what was written, then anything left out."""
        where = f" (site {self.site})" if self.site is not None else ""
        lines = [
            f"wrote {self.path}{where}: {self.patients} patients ({self.events} deaths observed, "
            f"{self.patients_with_genomics} with genomics), {self.slides} slides, {self.patches} patches "
            f"[{self.source}, from {self.table}]"
        ]
        if self.unlabelled:
            lines.append(f"  {self.unlabelled} patient(s) without survival data: they can be predicted, not trained on")
        if len(self.sites) > 1:
            lines.append(f"  small sites grouped: {', '.join(self.sites)}")
        if self.subtypes:
            lines.append(f"  cancers: {describe_subtypes(self.subtypes)}")
        if self.missing_slide_files:
            lines.append(f"  {len(self.missing_slide_files)} slide(s) of the table have no feature file: "
                         f"{_some(self.missing_slide_files)}")
        if self.skipped_slides:
            lines.append(f"  {len(self.skipped_slides)} bad slide(s) skipped:")
            lines += [f"    {slide_id}: {reason}" for slide_id, reason in self.skipped_slides[:REPORT_LIST_LIMIT]]
            if len(self.skipped_slides) > REPORT_LIST_LIMIT:
                lines.append(f"    ... and {len(self.skipped_slides) - REPORT_LIST_LIMIT} more")
        if self.dropped_patients:
            lines.append(f"  {len(self.dropped_patients)} patient(s) dropped (no slide and no genomics): "
                         f"{_some(self.dropped_patients)}")
        if self.grid_layout:
            lines.append(f"  {self.grid_layout} slide(s) came from .pt files without coords: patches laid on a "
                         f"square grid, {GRID_STEP_PX}-pixel step")
        return "\n".join(lines)


def describe_subtypes(subtypes: dict[str, dict[str, int]]) -> str:
    """``BRCA 6 (IDC 3, ILC 2, MDLC 1); KIRC 4 (CCRCC 4)``: patients per cancer, then per subtype.

    The parenthesis is left out when it says nothing more (no subtype, or only the cancer itself).
    """
    parts = []
    for cancer, within in sorted(subtypes.items()):
        part = f"{cancer} {sum(within.values())}"
        if set(within) - {"", cancer}:
            part += " (" + ", ".join(f"{subtype or 'none'} {n}" for subtype, n in sorted(within.items())) + ")"
        parts.append(part)
    return "; ".join(parts)


def _some(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:REPORT_LIST_LIMIT])
    return shown if len(ids) <= REPORT_LIST_LIMIT else f"{shown} ... and {len(ids) - REPORT_LIST_LIMIT} more"


# --------------------------------------------------------------------------- CLAM


def import_clam(
    out: str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    table: str | os.PathLike[str],
    *,
    force: bool = False,
    skip_bad_slides: bool = False,
    feature_dtype: str = "float16",
    cancer: str | None = None,
    cancer_by: str = "study",
    show_progress: bool = False,
) -> ImportReport:
    """Import CLAM feature files and a TCGA table into one bank at ``out``.

    ``features_dir`` is CLAM's output folder (``h5_files/<slide>.h5`` with
    ``features`` [N, D] and ``coords`` [N, 2]; or ``pt_files/<slide>.pt``, a
    tensor [N, D] without coords) or a folder holding such files directly.
    A slide's ``.h5`` is preferred over its ``.pt``. D is taken from the first
    readable file (in table order); a slide of another D is a bad slide.

    Slides are read one at a time (memory: one slide). A table slide without a
    file is reported, its patient kept; a patient left with no slide and no
    genomics is dropped and reported. A bad slide (unreadable, NaN/Inf, wrong
    D, coords not [N, 2], no patches) raises `InputError` naming its file,
    unless ``skip_bad_slides``, which leaves it out and lists it in the report.

    Each patient's cancer is its TCGA study, or with ``cancer_by="subtype"``
    its oncotree code (see `cancermoe.tables`); the code is kept as its subtype.
    """
    out = Path(out)
    check_cancer_by(cancer_by, cancer)
    check_target(out, force)
    if feature_dtype not in FEATURE_DTYPES:
        raise InputError(out, f"feature dtype {feature_dtype!r} not one of {FEATURE_DTYPES}")
    features_dir = Path(features_dir)
    files = find_feature_files(features_dir)
    survival = read_survival_table(table, cancer=cancer, cancer_by=cancer_by)

    listed = [slide_id for p in survival.patients for slide_id in p.slide_ids]
    present = [slide_id for slide_id in listed if slide_id in files]
    if not present:
        example = f" (e.g. {listed[0]}.h5)" if listed else ""
        raise InputError(features_dir, f"none of the {len(listed)} slides of {survival.name} has a feature file "
                                       f"here{example}")
    report = ImportReport(path=out, source="clam", table=survival.name,
                          missing_slide_files=[s for s in listed if s not in files])
    feature_dim = first_feature_dim(files[s] for s in present) or CLAM_FEATURE_DIM
    attrs: dict[str, Any] = dict(table=survival.name, features_dir=str(features_dir), cancer_by=cancer_by,
                                 patch_coords=_coords_origin(files[s] for s in present))
    if attrs["patch_coords"] != "clam":
        attrs["grid_step_px"] = GRID_STEP_PX

    advance, close = progress_bar(len(present), "importing slides", enabled=show_progress)
    try:
        with BankWriter(out, feature_dim=feature_dim, source="clam", feature_dtype=feature_dtype,
                        overwrite=force, attrs=attrs) as writer:
            _declare_genomics(writer, survival)
            for patient in survival.patients:
                kept = _add_patient_slides(writer, patient, files, skip_bad_slides, report, advance)
                _add_patient(writer, survival, patient, kept, report)
            if writer.n_patients == 0:
                raise InputError(survival.path, "no patient left to import (none has a usable slide or genomics)")
    finally:
        close()
    return report


def _add_patient_slides(writer: BankWriter, patient: TablePatient, files: dict[str, Path], skip_bad_slides: bool,
                        report: ImportReport, advance: Callable[[int], Any]) -> list[str]:
    """Add the patient's slides that have a file, one at a time; return the ids that made it in."""
    kept = []
    for slide_id in patient.slide_ids:
        if slide_id not in files:
            continue
        try:
            n_patches, on_grid = add_clam_slide(writer, slide_id, files[slide_id])
        except BadSlideError as exc:
            if not skip_bad_slides:
                raise
            report.skipped_slides.append((slide_id, exc.problem.removeprefix(f"slide {slide_id}: ")))
            continue
        finally:
            advance(1)
        kept.append(slide_id)
        report.slides += 1
        report.patches += n_patches
        report.grid_layout += on_grid
    return kept


def check_target(out: Path, force: bool) -> None:
    """Refuse an output path that exists (unless ``force``) or cannot be written: before any slow work."""
    if out.is_dir():
        raise InputError(out, "is a folder; give the path of the bank file to write (.h5)")
    if out.exists() and not force:
        raise InputError(out, "already exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise InputError(out, f"folder {out.parent} does not exist")


def find_feature_files(features_dir: Path) -> dict[str, Path]:
    """Slide id (file stem) -> feature file, preferring ``.h5`` (it has coords) over ``.pt``."""
    if not features_dir.exists():
        raise InputError(features_dir, "no such folder")
    if not features_dir.is_dir():
        raise InputError(features_dir, "is not a folder (give CLAM's output folder, with h5_files/ or pt_files/)")
    files: dict[str, Path] = {}
    for subfolder, suffix in _FEATURE_FILE_PLACES:
        folder = features_dir / subfolder
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix == suffix and path.is_file():
                files.setdefault(path.name[: -len(suffix)], path)
    if not files:
        raise InputError(features_dir, "no CLAM feature files (h5_files/<slide>.h5 or pt_files/<slide>.pt)")
    return files


def first_feature_dim(paths: Iterable[Path]) -> int | None:
    """Feature dim of the first file whose features read as a 2-D array (None: no such file).

    Unreadable files are passed over here: the import proper reports them.
    """
    for path in paths:
        try:
            if path.suffix == ".h5":
                with h5py.File(path, "r") as f:
                    shape = f["features"].shape
            else:
                shape = tuple(_load_pt(path).shape)
        except (BadSlideError, OSError, KeyError, AttributeError, TypeError):
            continue
        if len(shape) == 2 and shape[1] > 0:
            return int(shape[1])
    return None


def _coords_origin(paths: Iterable[Path]) -> str:
    """Bank attribute ``patch_coords``: "clam" (from .h5 files), "grid" (all .pt) or "clam+grid"."""
    kinds = {path.suffix for path in paths}
    return {frozenset({".h5"}): "clam", frozenset({".pt"}): "grid"}.get(frozenset(kinds), "clam+grid")


def add_clam_slide(writer: BankWriter, slide_id: str, path: Path) -> tuple[int, bool]:
    """Read one CLAM slide and add it to ``writer``; return (patches, whether coords were made up)."""
    if path.suffix == ".h5":
        features, coords = read_clam_h5(path, slide_id)
        on_grid = False
    else:
        features = _as_2d_float32(_load_pt(path), path, slide_id)
        coords = grid_coords(len(features))
        on_grid = True
    if writer.feature_dtype == "float16":
        # h5py would store values past the float16 range as Inf without a word.
        peak = float(np.abs(features).max()) if features.size else 0.0
        if math.isfinite(peak) and peak > FLOAT16_MAX:
            raise BadSlideError(path, f"slide {slide_id}: feature values up to {peak:.3g} overflow float16 "
                                      "(import with --dtype float32)")
    writer.add_slide(slide_id, features, coords, where=path)
    return len(features), on_grid


def read_clam_h5(path: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """``features`` (as float32) and ``coords`` (as int64) of a CLAM .h5 file; `BadSlideError` if unreadable."""
    check_hdf5_file(path, BadSlideError)
    try:
        with h5py.File(path, "r") as f:
            for name in ("features", "coords"):
                if not isinstance(f.get(name), h5py.Dataset):
                    raise BadSlideError(path, f"slide {slide_id}: no '{name}' dataset (not a CLAM feature file)")
            features = _as_2d_float32(f["features"][()], path, slide_id)
            coords = f["coords"][()]
    except OSError:
        raise BadSlideError(path, "HDF5 file cannot be read (truncated or corrupt)") from None
    return features, _as_pixel_coords(coords, path, slide_id)


def grid_coords(n_patches: int, step: int = GRID_STEP_PX) -> np.ndarray:
    """Made-up coords for patches without any: row-major on a square grid of ceil(sqrt(n)) columns."""
    columns = max(1, math.ceil(math.sqrt(n_patches)))
    index = np.arange(n_patches, dtype=np.int64)
    return np.stack([(index % columns) * step, (index // columns) * step], axis=1)


def _load_pt(path: Path) -> Any:
    import torch  # only .pt files need it

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises a dozen types for a bad file; all mean "unreadable"
        raise BadSlideError(path, f"cannot be read as a PyTorch tensor file ({type(exc).__name__})") from None
    if not isinstance(tensor, torch.Tensor):
        raise BadSlideError(path, f"holds a {type(tensor).__name__}, expected a tensor [patches, dim]")
    return tensor.detach().to(torch.float32).numpy()


def _as_2d_float32(values: Any, path: Path, slide_id: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadSlideError(path, f"slide {slide_id}: features are not numbers") from None
    if array.ndim != 2:
        raise BadSlideError(path, f"slide {slide_id}: features must be 2-D [patches, dim], got shape {array.shape}")
    return array


def _as_pixel_coords(coords: Any, path: Path, slide_id: str) -> np.ndarray:
    try:
        array = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadSlideError(path, f"slide {slide_id}: coords are not numbers") from None
    # The bank stores int32 pixels; CLAM writes integers, so anything else means a damaged file.
    if array.size and (not np.isfinite(array).all() or (array != np.round(array)).any()
                       or np.abs(array).max() >= 2**31):
        raise BadSlideError(path, f"slide {slide_id}: coords are not integer pixel positions")
    return array.astype(np.int64)


# --------------------------------------------------------------------------- TCGA tables


def import_tcga(
    out: str | os.PathLike[str],
    table: str | os.PathLike[str],
    *,
    sites_by: str | None = None,
    min_patients: int = 40,
    force: bool = False,
    cancer: str | None = None,
    cancer_by: str = "study",
) -> list[ImportReport]:
    """Genomics-only banks from a TCGA table: one bank at ``out``, or one per site with ``sites_by``.

    With ``sites_by`` (a table column, e.g. ``site``), ``out`` is a folder
    (created if needed) that gets ``<site>.h5`` per site. Sites with fewer
    than ``min_patients`` patients are pooled (see `group_sites`); a pooled
    bank is named by `site_group_name` and lists its members in the bank
    attribute ``sites``. A patient whose rows name different sites counts
    for the first one. Existing banks are refused (unless ``force``) before
    anything is written. ``cancer`` and ``cancer_by`` choose each patient's
    cancer as in `import_clam`.
    """
    out = Path(out)
    check_cancer_by(cancer_by, cancer)
    if sites_by is None:
        check_target(out, force)
        survival = _genomic_table(table, cancer, cancer_by)
        return [write_genomics_bank(out, survival, survival.patients, force=force,
                                    extra_attrs=dict(cancer_by=cancer_by))]

    if min_patients < 1:
        raise InputError(out, f"--min-patients must be at least 1, got {min_patients}")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder (with --sites-by, OUT is a folder for one bank per site)")
    survival = _genomic_table(table, cancer, cancer_by, site_column=sites_by)
    patients_by_site: dict[str, list[TablePatient]] = {}
    for patient in survival.patients:
        patients_by_site.setdefault(patient.site or "", []).append(patient)
    if len(survival.patients) < min_patients:
        raise InputError(survival.path, f"{len(survival.patients)} patients in all, fewer than --min-patients "
                                        f"{min_patients}: cannot make a single site bank that large")
    groups = group_sites({site: len(ps) for site, ps in patients_by_site.items()}, min_patients)
    targets = {site_group_name(g): out / f"{_file_safe(site_group_name(g))}.h5" for g in groups}
    if len(set(targets.values())) < len(targets):
        raise InputError(survival.path, f"site names in column {sites_by!r} collide once made file-safe")
    existing = [path for path in targets.values() if path.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more of the {len(targets)} site banks)" if len(existing) > 1 else ""
        raise InputError(existing[0], f"already exists{more}; use --force to replace")
    out.mkdir(parents=True, exist_ok=True)

    table_order = {p.case_id: i for i, p in enumerate(survival.patients)}
    reports = []
    for group in groups:
        name = site_group_name(group)
        members = [p for site in group for p in patients_by_site[site]]
        members.sort(key=lambda p: table_order[p.case_id])  # table order, whatever the grouping
        reports.append(write_genomics_bank(targets[name], survival, members, force=force, site=name, sites=group,
                                           extra_attrs=dict(site_column=sites_by, min_patients=min_patients,
                                                            cancer_by=cancer_by)))
    return reports


def group_sites(patients_per_site: dict[str, int], min_patients: int) -> list[list[str]]:
    """Sites, pooled so that every group has at least ``min_patients`` patients.

    Deterministic: a site that is large enough is a group of its own; the
    small ones, smallest first (ties by name), fill one pool after another,
    each closed as soon as it is large enough. What is left at the end joins
    the last pool or, when there is none, the smallest large site. Groups come
    back sorted by name (members sorted too). The caller makes sure the sites
    hold ``min_patients`` patients in all.
    """
    order = sorted(patients_per_site, key=lambda s: (patients_per_site[s], s))
    large = [[s] for s in order if patients_per_site[s] >= min_patients]
    pools: list[list[str]] = []
    pool: list[str] = []
    for site in (s for s in order if patients_per_site[s] < min_patients):
        pool.append(site)
        if sum(patients_per_site[s] for s in pool) >= min_patients:
            pools.append(pool)
            pool = []
    if pool:
        if pools:
            pools[-1].extend(pool)
        elif large:
            large[0].extend(pool)
        else:
            pools.append(pool)
    groups = [sorted(g) for g in large + pools]
    return sorted(groups, key=site_group_name)


def site_group_name(sites: Sequence[str]) -> str:
    """``A`` for one site, ``A+B+C`` for up to three, ``A+B+5more`` beyond (unique: groups do not overlap)."""
    members = sorted(sites)
    if len(members) <= 3:
        return "+".join(members)
    return f"{members[0]}+{members[1]}+{len(members) - 2}more"


def write_genomics_bank(
    out: Path,
    survival: SurvivalTable,
    patients: Sequence[TablePatient],
    *,
    force: bool,
    site: str | None = None,
    sites: Sequence[str] = (),
    extra_attrs: dict[str, Any] | None = None,
) -> ImportReport:
    """One bank of ``patients`` with genomics and no slides (their slide ids are not kept: no features)."""
    attrs: dict[str, Any] = dict(table=survival.name, **(extra_attrs or {}))
    if site is not None:
        attrs.update(site=site, sites=list(sites))
    report = ImportReport(path=out, source="tcga", table=survival.name, site=site, sites=list(sites))
    # feature_dim: no slides here, but a genomics-only site trains alongside CLAM sites, so it claims their D.
    with BankWriter(out, feature_dim=CLAM_FEATURE_DIM, source="tcga", overwrite=force, attrs=attrs) as writer:
        _declare_genomics(writer, survival)
        for patient in patients:
            _add_patient(writer, survival, patient, [], report)
        if writer.n_patients == 0:
            raise InputError(survival.path, "no patient has genomics: nothing to import")
    return report


def _genomic_table(table: str | os.PathLike[str], cancer: str | None, cancer_by: str,
                   site_column: str | None = None) -> SurvivalTable:
    survival = read_survival_table(table, cancer=cancer, site_column=site_column, cancer_by=cancer_by)
    if not survival.genomic_names:
        raise InputError(survival.path, "no genomic columns (_rnaseq, _cnv, _mut): nothing for a genomics-only bank")
    return survival


# --------------------------------------------------------------------------- shared steps


def _declare_genomics(writer: BankWriter, survival: SurvivalTable) -> None:
    if survival.genomic_names:
        for cancer in survival.cancers():
            writer.set_genomic_features(cancer, survival.genomic_names)


def _add_patient(writer: BankWriter, survival: SurvivalTable, patient: TablePatient, slide_ids: list[str],
                 report: ImportReport) -> None:
    """Add the patient with the slides that made it into the bank; drop one that has nothing left."""
    if not slide_ids and patient.genomics is None:
        report.dropped_patients.append(patient.case_id)
        return
    writer.add_patient(patient.case_id, patient.cancer, patient.survival_months, patient.censorship,
                       slide_ids=slide_ids, genomics=patient.genomics, where=survival.path, subtype=patient.subtype)
    within = report.subtypes.setdefault(patient.cancer, {})
    within[patient.subtype] = within.get(patient.subtype, 0) + 1
    report.patients += 1
    report.events += patient.event
    report.unlabelled += not patient.labelled
    report.patients_with_genomics += patient.genomics is not None


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)

