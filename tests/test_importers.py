"""CLAM and TCGA importers, on real HDF5 / .pt / CSV files in tmp_path, and through the `cmoe-bank` CLI.

Most CLI checks run the real Typer app in-process (`run_app`, exactly what the
console script runs); one goes through a subprocess to pin the entry point's exit code and
stderr (a subprocess costs 2 s or more of imports, so only one).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from cancermoe.bank import BadSlideError, open_bank
from cancermoe.cli.bank import app
from cancermoe.cli.common import run_app
from cancermoe.errors import InputError
from cancermoe.importers import GRID_STEP_PX, group_sites, import_clam, import_tcga, site_group_name
from tests.conftest import TCGA_DIR

TCGA = TCGA_DIR
DIM = 16  # small stand-in for CLAM's 1024
GENOMIC = ["AAK1_rnaseq", "TP53_mut", "MYC_cnv", "EGFR_cnv"]
# case id -> (months, censorship, slide ids); P2 has two slides, P4's slide never gets a file
PATIENTS = {
    "TCGA-AA-0001": (12.0, 0, ["S1"]),
    "TCGA-AA-0002": (40.5, 1, ["S2a", "S2b"]),
    "TCGA-AA-0003": (7.25, 0, ["S3"]),
    "TCGA-AA-0004": (3.0, 1, ["S4"]),
}
PATCHES = {"S1": 50, "S2a": 37, "S2b": 64, "S3": 20}


# --------------------------------------------------------------------------- builders


def table_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for case_id, (months, censorship, slides) in PATIENTS.items():
        genomics = rng.normal(size=len(GENOMIC)).round(5)
        for slide in slides:
            rows.append({"Unnamed: 0": len(rows), "case_id": case_id, "slide_id": f"{slide}.svs", "age": 61,
                         "site": "XF", "survival_months": months, "censorship": censorship, "is_female": 1,
                         "oncotree_code": "BLCA", "train": 1.0, **dict(zip(GENOMIC, genomics, strict=True))})
    return pd.DataFrame(rows)


def write_table(tmp_path: Path, frame: pd.DataFrame | None = None, name: str = "tcga_blca_small.csv") -> Path:
    path = tmp_path / name
    (table_frame() if frame is None else frame).to_csv(path, index=False)
    return path


def clam_features(slide: str, n: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, dim] and CLAM-like coords: distinct positions on a 256-pixel grid, in scan order shuffled."""
    rng = np.random.default_rng(sum(map(ord, slide)))
    features = rng.normal(size=(n, dim)).astype(np.float32)
    cells = rng.permutation(max(n, 1) * 2)[:n]
    coords = np.stack([cells % 13, cells // 13], axis=1).astype(np.int32) * 256 + 1000
    return features, coords


def write_h5(path: Path, features: np.ndarray, coords: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=coords)
    return path


def clam_dir(tmp_path: Path, kind: str = "h5") -> Path:
    """CLAM output folder for S1, S2a, S2b, S3 (not S4): h5_files/*.h5 or pt_files/*.pt."""
    root = tmp_path / "clam"
    for slide, n in PATCHES.items():
        features, coords = clam_features(slide, n)
        if kind == "h5":
            write_h5(root / "h5_files" / f"{slide}.h5", features, coords)
        else:
            (root / "pt_files").mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(features), root / "pt_files" / f"{slide}.pt")
    return root


def in_original_order(bank, slide: str) -> tuple[np.ndarray, np.ndarray]:
    """A bank slide's features and coords put back in the order of the imported file."""
    n = bank.n_patches(slide)
    back = np.argsort(bank.source_rows(slide))
    return bank.read_features(slide, np.arange(n))[back], bank.read_coords(slide)[back]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------- import_clam


def test_clam_h5_import_round_trip(tmp_path):
    features_dir, table = clam_dir(tmp_path), write_table(tmp_path)
    out = tmp_path / "site.h5"
    report = import_clam(out, features_dir, table, feature_dtype="float32")
    assert (report.patients, report.slides, report.patches) == (4, 4, sum(PATCHES.values()))
    assert report.missing_slide_files == ["S4"] and report.dropped_patients == [] and report.grid_layout == 0
    frame = table_frame()
    with open_bank(out) as bank:
        assert bank.source == "clam" and bank.feature_dim == DIM and bank.attrs["table"] == table.name
        assert bank.attrs["patch_coords"] == "clam"
        by_case = {p.case_id: p for p in bank.patients}
        assert by_case["TCGA-AA-0002"].slide_ids == ("S2a", "S2b")
        assert by_case["TCGA-AA-0004"].slide_ids == () and by_case["TCGA-AA-0004"].has_genomics
        assert by_case["TCGA-AA-0002"].survival_months == 40.5 and by_case["TCGA-AA-0002"].censorship == 1
        assert bank.genomic_feature_names("BLCA") == GENOMIC
        first_row = frame[frame.case_id == "TCGA-AA-0003"].iloc[0]
        np.testing.assert_allclose(bank.genomics(by_case["TCGA-AA-0003"]), first_row[GENOMIC].to_numpy(float),
                                   rtol=1e-6)
        for slide, n in PATCHES.items():
            features, coords = clam_features(slide, n)
            stored_features, stored_coords = in_original_order(bank, slide)
            np.testing.assert_array_equal(stored_features, features)
            np.testing.assert_array_equal(stored_coords, coords)
    assert "S4" in report.describe() and "4 patients" in report.describe()


@pytest.mark.bad_input
def test_clam_float16_default_and_overflow(tmp_path):
    features_dir, table = clam_dir(tmp_path), write_table(tmp_path)
    import_clam(tmp_path / "half.h5", features_dir, table)
    with open_bank(tmp_path / "half.h5") as bank:
        assert bank.feature_dtype == "float16"
        stored, _ = in_original_order(bank, "S1")
        np.testing.assert_allclose(stored, clam_features("S1", PATCHES["S1"])[0], atol=2e-3)
    features, coords = clam_features("S3", PATCHES["S3"])
    features[0, 0] = 1e6  # finite in float32, Inf in float16
    bad = write_h5(features_dir / "h5_files" / "S3.h5", features, coords)
    with pytest.raises(BadSlideError, match="overflow float16") as caught:
        import_clam(tmp_path / "half2.h5", features_dir, table)
    assert caught.value.where == str(bad) and not (tmp_path / "half2.h5").exists()
    assert import_clam(tmp_path / "full.h5", features_dir, table, feature_dtype="float32").slides == 4


def test_clam_pt_files_laid_on_grid(tmp_path):
    report = import_clam(tmp_path / "pt.h5", clam_dir(tmp_path, "pt"), write_table(tmp_path), feature_dtype="float32")
    assert report.grid_layout == 4 and "square grid" in report.describe()
    with open_bank(tmp_path / "pt.h5") as bank:
        assert bank.attrs["patch_coords"] == "grid" and bank.attrs["grid_step_px"] == GRID_STEP_PX
        for slide, n in PATCHES.items():
            stored, coords = in_original_order(bank, slide)
            np.testing.assert_array_equal(stored, clam_features(slide, n)[0])
            columns = math.ceil(math.sqrt(n))
            np.testing.assert_array_equal(coords[:, 0], (np.arange(n) % columns) * GRID_STEP_PX)
            np.testing.assert_array_equal(coords[:, 1], (np.arange(n) // columns) * GRID_STEP_PX)


def test_clam_prefers_h5_and_accepts_flat_folder(tmp_path):
    root = clam_dir(tmp_path, "pt")
    features, coords = clam_features("S1", PATCHES["S1"])
    write_h5(root / "h5_files" / "S1.h5", features, coords)  # S1 has both: .h5 wins
    report = import_clam(tmp_path / "mixed.h5", root, write_table(tmp_path), feature_dtype="float32")
    assert report.grid_layout == 3
    with open_bank(tmp_path / "mixed.h5") as bank:
        assert bank.attrs["patch_coords"] == "clam+grid"
        np.testing.assert_array_equal(in_original_order(bank, "S1")[1], coords)
    # features_dir pointing straight at the .h5 files
    flat = clam_dir(tmp_path / "other") / "h5_files"
    assert import_clam(tmp_path / "flat.h5", flat, write_table(tmp_path)).slides == 4


def test_clam_drops_patient_with_nothing_left(tmp_path):
    frame = table_frame()
    frame.loc[frame.case_id == "TCGA-AA-0004", GENOMIC] = np.nan  # no genomics, and S4 has no file
    report = import_clam(tmp_path / "b.h5", clam_dir(tmp_path), write_table(tmp_path, frame))
    assert report.dropped_patients == ["TCGA-AA-0004"] and report.patients == 3
    with open_bank(tmp_path / "b.h5") as bank:
        assert [p.case_id for p in bank.patients] == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]


@pytest.mark.bad_input
def test_clam_no_matching_files_refused(tmp_path):
    frame = table_frame()
    frame["slide_id"] = frame["slide_id"].str.replace("S", "Z")
    with pytest.raises(InputError, match="none of the 5 slides") as caught:
        import_clam(tmp_path / "n.h5", clam_dir(tmp_path), write_table(tmp_path, frame))
    assert caught.value.where == str(tmp_path / "clam")


def break_slide(features_dir: Path, kind: str, slide: str = "S3") -> Path:
    """Replace one slide's .h5 file with a bad one; return its path."""
    path = features_dir / "h5_files" / f"{slide}.h5"
    features, coords = clam_features(slide, PATCHES[slide])
    if kind == "NaN":
        features[3, 2] = np.nan
    elif kind == "Inf":
        features[0, 0] = -np.inf
    elif kind == "wrong dim":
        features, coords = clam_features(slide, PATCHES[slide], dim=DIM * 2)
    elif kind == "coords mismatch":
        coords = coords[:-1]
    elif kind == "empty":
        features, coords = features[:0], coords[:0]
    elif kind == "not HDF5":
        path.write_text("this is not an HDF5 file\n")
        return path
    elif kind == "truncated":
        data = write_h5(path, features, coords).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    elif kind == "no coords":
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=features)
        return path
    return write_h5(path, features, coords)


BAD_SLIDES = {
    "NaN": "NaN or Inf", "Inf": "NaN or Inf", "wrong dim": f"dimension {2 * DIM}, expected {DIM}",
    "coords mismatch": "coords shape", "empty": "empty slide", "not HDF5": "not an HDF5 file",
    "truncated": "truncated or corrupt", "no coords": "no 'coords' dataset",
}


@pytest.mark.parametrize("kind", BAD_SLIDES)
@pytest.mark.bad_input
def test_clam_bad_slide_refused_or_skipped(tmp_path, kind):
    features_dir, table = clam_dir(tmp_path), write_table(tmp_path)
    bad = break_slide(features_dir, kind)
    out = tmp_path / "bank.h5"
    with pytest.raises(InputError, match=BAD_SLIDES[kind]) as caught:
        import_clam(out, features_dir, table)
    assert caught.value.where == str(bad)
    assert not out.exists() and leftovers(tmp_path) == []

    report = import_clam(out, features_dir, table, skip_bad_slides=True)
    assert [s for s, _ in report.skipped_slides] == ["S3"] and BAD_SLIDES[kind] in report.skipped_slides[0][1]
    assert report.slides == 3 and report.patients == 4  # S3's patient keeps its genomics
    assert "bad slide(s) skipped" in report.describe()
    with open_bank(out) as bank:
        assert sorted(bank.slide_ids()) == ["S1", "S2a", "S2b"]


@pytest.mark.bad_input
def test_clam_bad_pt_file(tmp_path):
    features_dir, table = clam_dir(tmp_path, "pt"), write_table(tmp_path)
    bad = features_dir / "pt_files" / "S2b.pt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(InputError, match="cannot be read as a PyTorch tensor file") as caught:
        import_clam(tmp_path / "p.h5", features_dir, table)
    assert caught.value.where == str(bad)
    torch.save({"features": torch.zeros(3, DIM)}, bad)
    with pytest.raises(InputError, match="holds a dict"):
        import_clam(tmp_path / "p.h5", features_dir, table)


def test_clam_feature_dim_from_first_file(tmp_path):
    features_dir, table = clam_dir(tmp_path), write_table(tmp_path)
    break_slide(features_dir, "wrong dim", slide="S1")  # the table's first slide sets the dim for all
    report = import_clam(tmp_path / "d.h5", features_dir, table, skip_bad_slides=True)
    assert [s for s, _ in report.skipped_slides] == ["S2a", "S2b", "S3"]
    with open_bank(tmp_path / "d.h5") as bank:
        assert bank.feature_dim == 2 * DIM


@pytest.mark.bad_input
def test_clam_existing_output_refused_before_reading_anything(tmp_path):
    out = tmp_path / "bank.h5"
    out.write_bytes(b"precious")
    # Neither the features folder nor the table exist: the output check must come first.
    with pytest.raises(InputError, match="already exists") as caught:
        import_clam(out, tmp_path / "nowhere", tmp_path / "no.csv")
    assert caught.value.where == str(out) and out.read_bytes() == b"precious"
    import_clam(out, clam_dir(tmp_path), write_table(tmp_path), force=True)
    with open_bank(out) as bank:
        assert len(bank.patients) == 4


# --------------------------------------------------------------------------- import_tcga


def sites_frame() -> pd.DataFrame:
    """60 patients over sites A (25), B (18), C (9), D (5), E (3); one row each."""
    rng = np.random.default_rng(3)
    sizes = {"A": 25, "B": 18, "C": 9, "D": 5, "E": 3}
    rows = []
    for site, n in sizes.items():
        for i in range(n):
            rows.append({"case_id": f"TCGA-{site}{i:03d}", "slide_id": f"TCGA-{site}{i:03d}-DX1.svs", "site": site,
                         "survival_months": float(rng.uniform(1, 100)), "censorship": int(rng.integers(0, 2)),
                         "oncotree_code": "BLCA", **dict(zip(GENOMIC, rng.normal(size=len(GENOMIC)), strict=True))})
    return pd.DataFrame(rows)


def test_tcga_single_bank(tmp_path):
    table = write_table(tmp_path)
    [report] = import_tcga(tmp_path / "g.h5", table)
    assert (report.patients, report.slides, report.patches) == (4, 0, 0)
    with open_bank(tmp_path / "g.h5") as bank:
        assert bank.source == "tcga" and bank.attrs["table"] == table.name and bank.slide_ids() == []
        assert all(p.has_genomics and not p.has_slides for p in bank.patients)
        np.testing.assert_allclose(bank.genomics_matrix("BLCA"),
                                   table_frame().drop_duplicates("case_id")[GENOMIC].to_numpy(float), rtol=1e-6)


def test_tcga_one_bank_per_site(tmp_path):
    table = write_table(tmp_path, sites_frame(), name="tcga_blca_sites.csv")
    reports = import_tcga(tmp_path / "sites", table, sites_by="site", min_patients=10)
    # A and B alone; E(3)+D(5)+C(9) pooled smallest first
    assert {r.site: r.patients for r in reports} == {"A": 25, "B": 18, "C+D+E": 17}
    with open_bank(tmp_path / "sites" / "C+D+E.h5") as bank:
        assert bank.attrs["site"] == "C+D+E" and bank.attrs["sites"] == ["C", "D", "E"]
        assert {p.case_id[5] for p in bank.patients} == {"C", "D", "E"}
    with open_bank(tmp_path / "sites" / "A.h5") as bank:
        assert bank.attrs["sites"] == ["A"] and len(bank.patients) == 25


@pytest.mark.bad_input
def test_tcga_existing_site_bank_refused_before_writing(tmp_path):
    table = write_table(tmp_path, sites_frame(), name="tcga_blca_sites.csv")
    folder = tmp_path / "sites"
    folder.mkdir()
    (folder / "B.h5").write_bytes(b"old")
    with pytest.raises(InputError, match="already exists") as caught:
        import_tcga(folder, table, sites_by="site", min_patients=10)
    assert caught.value.where == str(folder / "B.h5")
    assert sorted(p.name for p in folder.iterdir()) == ["B.h5"] and (folder / "B.h5").read_bytes() == b"old"
    assert len(import_tcga(folder, table, sites_by="site", min_patients=10, force=True)) == 3


@pytest.mark.bad_input
def test_tcga_too_few_patients_and_bad_targets(tmp_path):
    table = write_table(tmp_path, sites_frame(), name="tcga_blca_sites.csv")
    with pytest.raises(InputError, match="60 patients in all, fewer than --min-patients 61"):
        import_tcga(tmp_path / "s", table, sites_by="site", min_patients=61)
    with pytest.raises(InputError, match="is not a folder"):
        import_tcga(table, table, sites_by="site")
    with pytest.raises(InputError, match="missing required column.*hospital"):
        import_tcga(tmp_path / "s", table, sites_by="hospital")
    assert not (tmp_path / "s").exists()


def test_group_sites_rules():
    counts = {"A": 50, "B": 45, "C": 5, "D": 10, "E": 30, "F": 3}
    assert group_sites(counts, 40) == [["A"], ["B"], ["C", "D", "E", "F"]]
    # the remainder after the last full pool joins that pool
    assert group_sites({"a": 1, "b": 2, "c": 2, "d": 1}, 3) == [["a", "b", "c", "d"]]
    # no pool fills up: the remainder joins the smallest large site
    assert group_sites({"A": 50, "B": 45, "C": 5}, 40) == [["A"], ["B", "C"]]
    # the answer does not depend on the order of the input
    assert group_sites(dict(reversed(list(counts.items()))), 40) == group_sites(counts, 40)
    counts = {f"s{i:02d}": i for i in range(1, 30)}
    groups = group_sites(counts, 40)
    assert sorted(s for g in groups for s in g) == sorted(counts)
    assert all(sum(counts[s] for s in g) >= 40 for g in groups)
    assert site_group_name(["B", "A"]) == "A+B" and site_group_name(list("EDCBA")) == "A+B+3more"


# --------------------------------------------------------------------------- through the CLI


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `cmoe-bank` in-process: the same `run_app` the console script calls."""
    with pytest.raises(SystemExit) as exit_:
        run_app(app, [str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, names: Path) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(names) in err and "Traceback" not in err


def _table_case(tmp_path: Path, case: str) -> Path:
    frame = table_frame()
    if case == "missing table":
        return tmp_path / "absent.csv"
    if case == "table not CSV":
        return write_h5(tmp_path / "table.csv", np.zeros((2, 2)), np.zeros((2, 2)))
    if case == "column missing":
        frame = frame.drop(columns=["censorship"])
    elif case == "duplicate case, other survival":
        frame.loc[2, "survival_months"] = 99.0
    elif case == "negative survival":
        frame.loc[0, "survival_months"] = -2.0
    elif case == "NaN survival":
        frame.loc[0, "survival_months"] = np.nan
    elif case == "censorship not 0/1":
        frame.loc[0, "censorship"] = 3
    return write_table(tmp_path, frame)


TABLE_CASES = ["missing table", "table not CSV", "column missing", "duplicate case, other survival",
               "negative survival", "NaN survival", "censorship not 0/1"]


@pytest.mark.parametrize("case", TABLE_CASES)
@pytest.mark.parametrize("command", ["import-clam", "import-tcga"])
@pytest.mark.bad_input
def test_cli_bad_table(tmp_path, capsys, case, command):
    table = _table_case(tmp_path, case)
    out = tmp_path / "bank.h5"
    extra = ["--features-dir", clam_dir(tmp_path)] if command == "import-clam" else []
    code, _, err = cli(capsys, command, out, "--table", table, *extra)
    assert_one_line_error(code, err, table)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", BAD_SLIDES)
@pytest.mark.bad_input
def test_cli_bad_slide(tmp_path, capsys, kind):
    features_dir, table = clam_dir(tmp_path), write_table(tmp_path)
    bad = break_slide(features_dir, kind)
    out = tmp_path / "bank.h5"
    code, _, err = cli(capsys, "import-clam", out, "--features-dir", features_dir, "--table", table)
    assert_one_line_error(code, err, bad)
    assert not out.exists() and leftovers(tmp_path) == []
    code, printed, _ = cli(capsys, "import-clam", out, "--features-dir", features_dir, "--table", table,
                           "--skip-bad-slides")
    assert code == 0 and "S3: " in printed and out.exists()


@pytest.mark.bad_input
def test_cli_output_exists_left_byte_identical(tmp_path, capsys):
    features_dir, table = clam_dir(tmp_path), write_table(tmp_path)
    out = tmp_path / "bank.h5"
    import_clam(out, features_dir, table)
    before = out.read_bytes()
    for command, extra in (("import-clam", ["--features-dir", features_dir]), ("import-tcga", [])):
        code, _, err = cli(capsys, command, out, "--table", table, *extra)
        assert_one_line_error(code, err, out)
        assert "already exists" in err and out.read_bytes() == before
    code, _, _ = cli(capsys, "import-tcga", out, "--table", table, "--force")
    assert code == 0 and out.read_bytes() != before


def run_cmoe_bank(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cancermoe.cli.bank", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.process
@pytest.mark.bad_input
def test_console_entry_point_errors(tmp_path):
    features_dir, table = clam_dir(tmp_path), write_table(tmp_path)
    bad = break_slide(features_dir, "NaN")
    out = tmp_path / "bank.h5"
    result = run_cmoe_bank("import-clam", out, "--features-dir", features_dir, "--table", table)
    assert_one_line_error(result.returncode, result.stderr, bad)
    assert not out.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the cancer of a patient is its study


BREAST_CODES = {"TCGA-AA-0001": "IDC", "TCGA-AA-0002": "ILC", "TCGA-AA-0003": "MDLC", "TCGA-AA-0004": "IDC"}


def breast_table(tmp_path: Path, codes: dict[str, str] | None = None, name: str = "breast_cohort.csv") -> Path:
    """The test table as a breast cohort: three OncoTree subtypes, a file name that names no study."""
    frame = table_frame()
    frame["oncotree_code"] = frame["case_id"].map(codes or BREAST_CODES)
    return write_table(tmp_path, frame, name=name)


def test_breast_subtypes_import_as_one_cancer(tmp_path, capsys):
    table = breast_table(tmp_path)
    [report] = import_tcga(tmp_path / "g.h5", table)
    assert report.subtypes == {"BRCA": {"IDC": 2, "ILC": 1, "MDLC": 1}}
    assert "cancers: BRCA 4 (IDC 2, ILC 1, MDLC 1)" in report.describe()
    with open_bank(tmp_path / "g.h5") as bank:
        assert bank.cancers() == ["BRCA"] and bank.attrs["cancer_by"] == "study"
        assert {p.case_id: p.subtype for p in bank.patients} == BREAST_CODES
        assert bank.genomics_matrix("BRCA").shape == (4, len(GENOMIC))  # one matrix for the study
    report = import_clam(tmp_path / "c.h5", clam_dir(tmp_path), table)
    with open_bank(tmp_path / "c.h5") as bank:
        assert bank.cancers() == ["BRCA"] and bank.subtypes() == {"BRCA": {"IDC": 2, "ILC": 1, "MDLC": 1}}
    code, printed, _ = cli(capsys, "inspect", tmp_path / "g.h5")
    assert code == 0 and "cancer    by study" in printed
    assert "BRCA      4 patients, 4 genomic features; subtypes IDC 2, ILC 1, MDLC 1" in printed


@pytest.mark.parametrize("command", ["import-tcga", "import-clam"])
def test_cli_cancer_by_subtype_makes_three_cancers(tmp_path, capsys, command):
    table, out = breast_table(tmp_path), tmp_path / "sub.h5"
    extra = ["--features-dir", clam_dir(tmp_path)] if command == "import-clam" else []
    code, printed, err = cli(capsys, command, out, "--table", table, "--cancer-by", "subtype", *extra)
    assert code == 0, err
    assert "cancers: IDC 2; ILC 1; MDLC 1" in printed
    with open_bank(out) as bank:
        assert bank.cancers() == ["IDC", "ILC", "MDLC"] and bank.attrs["cancer_by"] == "subtype"
        assert {p.case_id: (p.cancer, p.subtype) for p in bank.patients} == {
            case: (code, code) for case, code in BREAST_CODES.items()}
        assert {c: bank.genomics_matrix(c).shape[0] for c in bank.cancers()} == {"IDC": 2, "ILC": 1, "MDLC": 1}
    code, printed, _ = cli(capsys, "inspect", "--json", out)
    summary = json.loads(printed)
    assert summary["cancers"] == {"IDC": 2, "ILC": 1, "MDLC": 1} and summary["cancer_by"] == "subtype"
    assert summary["subtypes"] == {"IDC": {"IDC": 2}, "ILC": {"ILC": 1}, "MDLC": {"MDLC": 1}}


def test_sites_keep_the_study_and_subtypes(tmp_path):
    frame = sites_frame()
    frame["oncotree_code"] = np.where(np.arange(len(frame)) % 3 == 0, "USC", "UEC")  # an endometrial cohort
    table = write_table(tmp_path, frame, name="endometrial.csv")
    reports = import_tcga(tmp_path / "sites", table, sites_by="site", min_patients=10)
    for report in reports:
        with open_bank(report.path) as bank:
            assert bank.cancers() == ["UCEC"] and set(bank.subtypes()["UCEC"]) <= {"UEC", "USC"}
            assert bank.attrs["cancer_by"] == "study"
    assert sum(r.subtypes["UCEC"].get("USC", 0) for r in reports) == 20


@pytest.mark.parametrize("command, extra", [
    ("import-tcga", []), ("import-tcga", ["--sites-by", "site", "--min-patients", "1"]), ("import-clam", None),
])
@pytest.mark.bad_input
def test_cli_unmappable_codes_one_line_nothing_written(tmp_path, capsys, command, extra):
    table = breast_table(tmp_path, {**BREAST_CODES, "TCGA-AA-0002": "XYZ", "TCGA-AA-0004": "ABC"})
    out = tmp_path / ("sites" if extra else "bank.h5")
    if extra is None:
        extra = ["--features-dir", clam_dir(tmp_path)]
    code, _, err = cli(capsys, command, out, "--table", table, *extra)
    assert_one_line_error(code, err, table)
    assert "oncotree_code ABC (1 row), XYZ (2 rows) not mapped to a TCGA study" in err
    assert "--cancer STUDY" in err and "--cancer-by subtype" in err
    assert not out.exists() and leftovers(tmp_path) == []
    # The way out the message names works.
    code, printed, _ = cli(capsys, command, out, "--table", table, "--cancer", "BRCA", *extra)
    assert code == 0 and "cancers: BRCA 4 (ABC 1, IDC 1, MDLC 1, XYZ 1)" in printed


@pytest.mark.bad_input
def test_cli_bad_cancer_by(tmp_path, capsys):
    table, out = breast_table(tmp_path), tmp_path / "bank.h5"
    code, _, err = cli(capsys, "import-tcga", out, "--table", table, "--cancer-by", "organ")
    assert code == 2 and err == "error: --cancer-by: must be one of study, subtype, got 'organ'\n"
    code, _, err = cli(capsys, "import-clam", out, "--table", table, "--features-dir", tmp_path / "nowhere",
                       "--cancer", "BRCA", "--cancer-by", "subtype")
    assert code == 2 and err.startswith("error: --cancer-by: ") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("study, patients", [("blca", 373), ("kirc", 345)])
def test_real_cohort_genomics_only(tmp_path, capsys, study, patients):
    table = TCGA / f"tcga_{study}_all_clean.csv.zip"
    if not table.exists():
        pytest.skip("real TCGA tables not present")
    out = tmp_path / f"{study}.h5"
    assert cli(capsys, "import-tcga", out, "--table", table)[0] == 0
    code, printed, _ = cli(capsys, "inspect", "--json", out)
    assert code == 0
    summary = json.loads(printed)
    assert summary["patients"] == patients and summary["patients_with_genomics"] == patients
    assert summary["cancers"] == {study.upper(): patients} and summary["source"] == "tcga"
    subtype = {"blca": "BLCA", "kirc": "CCRCC"}[study]
    assert summary["subtypes"] == {study.upper(): {subtype: patients}} and summary["cancer_by"] == "study"


def test_real_blca_sites(tmp_path, capsys):
    table = TCGA / "tcga_blca_all_clean.csv.zip"
    if not table.exists():
        pytest.skip("real TCGA tables not present")
    folder = tmp_path / "sites"
    code, printed, _ = cli(capsys, "import-tcga", folder, "--table", table, "--sites-by", "site",
                           "--min-patients", "40")
    assert code == 0
    banks = sorted(folder.glob("*.h5"))
    assert len(banks) >= 3 and printed.count("wrote ") == len(banks)
    counts, members = [], []
    for path in banks:
        with open_bank(path) as bank:
            counts.append(len(bank.patients))
            members += bank.attrs["sites"]
            assert path.name == f"{bank.attrs['site']}.h5"
    assert sum(counts) == 373 and min(counts) >= 40
    frame = pd.read_csv(table, usecols=["site"], dtype=str)
    assert sorted(members) == sorted(frame["site"].unique())  # every site in exactly one bank
