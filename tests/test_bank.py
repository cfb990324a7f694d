"""The bank format: round trips, curve order, bounded reads, and refusals of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cancermoe.bank import (
    ROWS_PER_CHUNK,
    SCHEMA_VERSION,
    BadSlideError,
    BankWriter,
    chunks_touched,
    contiguous_runs,
    curve_order,
    morton_codes,
    open_bank,
    validate_bank,
)
from cancermoe.errors import InputError

DIM = 8


def grid(width: int, height: int, step: int = 256) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return (np.stack([xs.ravel(), ys.ravel()], axis=1) * step).astype(np.int32)


def write_small_bank(path: Path, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Two patients: one with a 20x15 slide and genomics, one genomics-free with two slides."""
    rng = rng or np.random.default_rng(0)
    slides = {
        "s1": (rng.normal(size=(300, DIM)).astype(np.float32), grid(20, 15)),
        "s2": (rng.normal(size=(50, DIM)).astype(np.float32), grid(10, 5)),
        "s3": (rng.normal(size=(7, DIM)).astype(np.float32), grid(7, 1)),
    }
    with BankWriter(path, feature_dim=DIM, source="test", attrs={"site": "A"}) as writer:
        for slide_id, (features, coords) in slides.items():
            writer.add_slide(slide_id, features, coords)
        writer.set_genomic_features("BLCA", ["g1", "g2", "g3"])
        writer.add_patient("case-1", "BLCA", 12.5, 0, ["s1"], genomics=np.array([1.0, 2.0, 3.0]), subtype="BLCA")
        writer.add_patient("case-2", "BLCA", 40.0, 1, ["s2", "s3"])  # no subtype: ""
    return {k: v[0] for k, v in slides.items()}


def make_version_1(path: Path) -> None:
    """Turn a bank into what a version-1 writer made: no /patients/subtype."""
    with h5py.File(path, "r+") as h5:
        del h5["patients/subtype"]
        h5.attrs["schema_version"] = 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cancermoe.cli.bank", *args], capture_output=True, text=True)


def inspect_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`cmoe-bank inspect` through `run_app` in this process (a subprocess costs seconds of imports)."""
    from cancermoe.cli.bank import app
    from cancermoe.cli.common import run_app

    with pytest.raises(SystemExit) as exit_:
        run_app(app, ["inspect", *args])
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def assert_one_line_error(result: subprocess.CompletedProcess, mentions: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and mentions in lines[0]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- format


def test_round_trip_patients_genomics_and_features(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    features = write_small_bank(path)
    with open_bank(path) as bank:
        validate_bank(bank)
        assert [p.case_id for p in bank.patients] == ["case-1", "case-2"]
        first, second = bank.patients
        assert first.event and not second.event
        assert first.slide_ids == ("s1",) and second.slide_ids == ("s2", "s3")
        assert (first.subtype, second.subtype) == ("BLCA", "")
        assert bank.subtypes() == {"BLCA": {"": 1, "BLCA": 1}}
        np.testing.assert_array_equal(bank.genomics(first), [1.0, 2.0, 3.0])
        assert bank.genomics(second) is None and not second.has_genomics
        assert bank.attrs["site"] == "A" and bank.schema_version == SCHEMA_VERSION
        rows = np.array([299, 0, 17, 17, 150])
        got = bank.read_features("s1", rows)
        want = features["s1"][bank.source_rows("s1")[rows]].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, want)


def test_rows_are_stored_in_curve_order_and_map_back(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    with open_bank(path) as bank:
        coords = bank.read_coords("s1")
        assert np.all(np.diff(morton_codes(coords).astype(np.float64)) > 0)
        assert sorted(bank.source_rows("s1")) == list(range(300))
        np.testing.assert_array_equal(coords, grid(20, 15)[bank.source_rows("s1")])


def test_curve_order_keeps_neighbourhoods_in_fewer_chunks() -> None:
    coords = grid(256, 256)
    order = curve_order(coords)
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    # a 16x16 block of patches: rows in original (row-major) order vs curve order
    block = np.flatnonzero((coords[:, 0] // 256 < 16) & (coords[:, 1] // 256 < 16))
    assert chunks_touched(position[block]) < chunks_touched(block)


def test_contiguous_runs() -> None:
    assert contiguous_runs(np.array([1, 2, 3, 7, 9, 10])) == [(1, 4), (7, 8), (9, 11)]
    assert contiguous_runs(np.array([], dtype=np.int64)) == []


def test_features_are_chunked_by_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    with h5py.File(path) as h5:
        assert h5["slides/s1/features"].chunks == (ROWS_PER_CHUNK, DIM)
        assert h5["slides/s1/features"].dtype == np.float16


def test_streamed_slide_equals_in_memory_slide(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(100, DIM)).astype(np.float32)
    coords = grid(10, 10)
    order = curve_order(coords)
    with BankWriter(tmp_path / "a.h5", feature_dim=DIM, source="test", feature_dtype="float32") as writer:
        writer.add_slide("mem", features, coords)
        blocks = (features[order][i:i + 16] for i in range(0, 100, 16))
        writer.add_slide_blocks("stream", coords[order], blocks, source_row=order)
        writer.add_patient("c", "X", 1.0, 0, ["mem", "stream"])
    with open_bank(tmp_path / "a.h5") as bank:
        rows = np.arange(100)
        np.testing.assert_array_equal(bank.read_features("mem", rows), bank.read_features("stream", rows))


# --------------------------------------------------------------------------- writer refusals


@pytest.mark.parametrize(
    ("features", "coords", "problem"),
    [
        (np.zeros((10, DIM + 1)), grid(10, 1), "feature dimension"),
        (np.zeros((0, DIM)), np.zeros((0, 2)), "empty slide"),
        (np.zeros((10, DIM)), grid(9, 1), "coords shape"),
        (np.full((10, DIM), np.nan), grid(10, 1), "NaN or Inf"),
        (np.full((10, DIM), np.inf), grid(10, 1), "NaN or Inf"),
    ],
)
@pytest.mark.bad_input
def test_bad_slides_are_refused_and_nothing_is_written(tmp_path: Path, features, coords, problem) -> None:
    path = tmp_path / "a.h5"
    with pytest.raises(BadSlideError, match=problem):
        with BankWriter(path, feature_dim=DIM, source="test") as writer:
            writer.add_slide("bad", features, coords, where=tmp_path / "bad.h5")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (dict(survival_months=-1.0, censorship=0), "negative or not a number"),
        (dict(survival_months=float("nan"), censorship=0), "negative or not a number"),
        (dict(survival_months=3.0, censorship=2), "not 0 or 1"),
    ],
)
@pytest.mark.bad_input
def test_bad_patients_are_refused(tmp_path: Path, kwargs, problem) -> None:
    with pytest.raises(InputError, match=problem):
        with BankWriter(tmp_path / "a.h5", feature_dim=DIM, source="test") as writer:
            writer.add_patient("c", "X", **kwargs)
    assert not (tmp_path / "a.h5").exists()


@pytest.mark.bad_input
def test_duplicate_case_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="appears twice"):
        with BankWriter(tmp_path / "a.h5", feature_dim=DIM, source="test") as writer:
            writer.add_patient("c", "X", 1.0, 0)
            writer.add_patient("c", "X", 1.0, 0)


@pytest.mark.bad_input
def test_existing_output_is_refused_and_kept_intact(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        BankWriter(path, feature_dim=DIM, source="test")
    assert path.read_bytes() == before


@pytest.mark.bad_input
def test_failed_overwrite_keeps_the_old_bank(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    before = path.read_bytes()
    with pytest.raises(BadSlideError):
        with BankWriter(path, feature_dim=DIM, source="test", overwrite=True) as writer:
            writer.add_slide("bad", np.full((4, DIM), np.nan), grid(4, 1))
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- reader refusals (through the CLI)


@pytest.mark.process
@pytest.mark.bad_input
def test_inspect_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("inspect", str(tmp_path / "nope.h5")), "no such file")


@pytest.mark.process
@pytest.mark.bad_input
def test_inspect_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("case_id,slide_id\n")
    assert_one_line_error(run_cli("inspect", str(path)), f"{path}: not an HDF5 file")


@pytest.mark.process
@pytest.mark.bad_input
def test_inspect_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = run_cli("inspect", str(path))
    assert_one_line_error(result, str(path))


@pytest.mark.process
@pytest.mark.bad_input
def test_inspect_hdf5_that_is_not_a_bank(tmp_path: Path) -> None:
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as h5:
        h5["features"] = np.zeros((3, 4))
    assert_one_line_error(run_cli("inspect", str(path)), "not a patch bank")


@pytest.mark.process
@pytest.mark.bad_input
def test_inspect_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION + 1
    assert_one_line_error(run_cli("inspect", str(path)), "newer than this cancermoe supports")


@pytest.mark.process
@pytest.mark.bad_input
def test_inspect_finds_nan_written_behind_our_back(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    with h5py.File(path, "r+") as h5:
        h5["slides/s2/features"][3, 1] = np.nan
    assert_one_line_error(run_cli("inspect", str(path)), "slide s2: features contain NaN or Inf")


def test_subtype_is_an_attribute_not_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Patients of one cancer with three subtypes share one genomics matrix."""
    path = tmp_path / "brca.h5"
    with BankWriter(path, feature_dim=DIM, source="test") as writer:
        writer.set_genomic_features("BRCA", ["g1", "g2"])
        for i, subtype in enumerate(["IDC", "ILC", "IDC", "MDLC"]):
            writer.add_patient(f"c{i}", "BRCA", 10.0 + i, i % 2, genomics=np.array([i, -i]), subtype=subtype)
    with open_bank(path) as bank:
        validate_bank(bank)
        assert bank.cancers() == ["BRCA"] and bank.genomics_matrix("BRCA").shape == (4, 2)
        assert [p.subtype for p in bank.patients] == ["IDC", "ILC", "IDC", "MDLC"]
        assert bank.subtypes() == {"BRCA": {"IDC": 2, "ILC": 1, "MDLC": 1}}
    code, printed, err = inspect_in_process(capsys, str(path))
    assert code == 0, err
    assert "BRCA      4 patients, 2 genomic features; subtypes IDC 2, ILC 1, MDLC 1" in printed


def test_version_1_bank_still_opens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bank written before subtypes were kept opens, validates and inspects; its subtypes are ""."""
    import json

    path = tmp_path / "old.h5"
    features = write_small_bank(path)
    make_version_1(path)
    with open_bank(path) as bank:
        validate_bank(bank)
        assert bank.schema_version == 1
        assert [p.subtype for p in bank.patients] == ["", ""] and bank.subtypes() == {"BLCA": {"": 2}}
        np.testing.assert_allclose(bank.read_features("s2", np.arange(50)), features["s2"][bank.source_rows("s2")],
                                   atol=2e-3)  # float16
    code, printed, err = inspect_in_process(capsys, str(path), "--json")
    assert code == 0, err
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["schema_version"] == 1 and summary["subtypes"] == {"BLCA": {"": 2}}
    code, printed, err = inspect_in_process(capsys, str(path))
    assert code == 0 and "schema 1" in printed and "subtypes" not in printed, err


@pytest.mark.bad_input
def test_current_schema_without_subtypes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.h5"
    write_small_bank(path)
    with h5py.File(path, "r+") as h5:
        del h5["patients/subtype"]
    code, _, err = inspect_in_process(capsys, str(path))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert f"schema {SCHEMA_VERSION} but /patients/subtype missing" in err


@pytest.mark.process
def test_inspect_json_summary(tmp_path: Path) -> None:
    import json

    path = tmp_path / "a.h5"
    write_small_bank(path)
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["patients"] == 2 and summary["slides"] == 3 and summary["patches"] == 357
    assert summary["cancers"] == {"BLCA": 2} and summary["events"] == 1
    assert summary["genomic_features"] == {"BLCA": 3} and summary["schema_version"] == SCHEMA_VERSION
    assert summary["subtypes"] == {"BLCA": {"": 1, "BLCA": 1}}
    assert "oracle_cindex" not in summary


@pytest.mark.bad_input
def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    features = np.full((4, DIM), 1e6, dtype=np.float32)
    with pytest.raises(BadSlideError, match="overflow float16"):
        with BankWriter(tmp_path / "a.h5", feature_dim=DIM, source="test") as writer:
            writer.add_slide("big", features, grid(4, 1))
    with BankWriter(tmp_path / "b.h5", feature_dim=DIM, source="test", feature_dtype="float32") as writer:
        writer.add_slide("big", features, grid(4, 1))
        writer.set_attrs("big", layout="grid")
        writer.set_attrs(note="late")
        writer.add_patient("c", "X", 1.0, 0, ["big"])
    with h5py.File(tmp_path / "b.h5") as h5:
        assert h5["slides/big"].attrs["layout"] == "grid" and h5.attrs["note"] == "late"
