"""Reading and validating TCGA tables (MCAT/PORPOISE layout): real CSV and zip files in tmp_path."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cancermoe.errors import InputError
from cancermoe.tables import (
    ONCOTREE_TO_TCGA,
    TCGA_STUDIES,
    read_survival_table,
    strip_slide_extension,
    study_from_file_name,
    study_of_oncotree_code,
)
from tests.conftest import TCGA_DIR

TCGA = TCGA_DIR
GENOMIC = ["AAK1_rnaseq", "TP53_mut", "MYC_cnv"]


def table_rows() -> list[dict]:
    """Three patients, the second with two slides (two rows repeating its survival and genomics)."""
    rng = np.random.default_rng(0)
    genomics = rng.normal(size=(3, len(GENOMIC))).round(4)
    patients = [("TCGA-AA-0001", 10.5, 0, "2F", genomics[0]), ("TCGA-AA-0002", 30.0, 1, "XF", genomics[1]),
                ("TCGA-AA-0003", 0.0, 0, "2F", genomics[2])]
    slides = {"TCGA-AA-0001": ["TCGA-AA-0001-DX1.abc.svs"],
              "TCGA-AA-0002": ["TCGA-AA-0002-DX1.def.svs", "TCGA-AA-0002-DX2.ghi.svs"],
              "TCGA-AA-0003": ["TCGA-AA-0003-DX1.jkl.svs"]}
    rows = []
    for case_id, months, censored, site, values in patients:
        for slide in slides[case_id]:
            rows.append({"Unnamed: 0": len(rows), "case_id": case_id, "slide_id": slide, "age": 60, "site": site,
                         "survival_months": months, "censorship": censored, "is_female": 0,
                         "oncotree_code": "BLCA", "train": 1.0, **dict(zip(GENOMIC, values, strict=True))})
    return rows


def write_table(path: Path, rows: list[dict] | None = None, drop: tuple[str, ...] = ()) -> Path:
    frame = pd.DataFrame(rows if rows is not None else table_rows()).drop(columns=list(drop))
    frame.to_csv(path, index=False)
    return path


def write_zip(path: Path, csv_text: str) -> Path:
    """Like the real tables: one member, itself named ``*.csv.zip``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"./{path.name}", csv_text)
    return path


def test_rows_grouped_per_patient(tmp_path):
    rows = table_rows()
    table = read_survival_table(write_table(tmp_path / "tcga_blca_small.csv", rows))
    assert [p.case_id for p in table.patients] == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]
    assert table.genomic_names == GENOMIC
    second = table.patients[1]
    assert second.slide_ids == ("TCGA-AA-0002-DX1.def", "TCGA-AA-0002-DX2.ghi")
    assert second.survival_months == 30.0 and second.censorship == 1 and not second.event
    np.testing.assert_allclose(second.genomics, [rows[1][g] for g in GENOMIC], rtol=1e-6)
    assert second.genomics.dtype == np.float32
    assert table.n_slides == 4
    assert table.cancers() == ["BLCA"]
    assert second.site is None  # only filled when asked for


def test_zip_table_reads_like_csv(tmp_path):
    csv_path = write_table(tmp_path / "tcga_blca_small.csv")
    zipped = write_zip(tmp_path / "tcga_blca_small.csv.zip", csv_path.read_text())
    a, b = read_survival_table(csv_path), read_survival_table(zipped)
    assert [p.case_id for p in a.patients] == [p.case_id for p in b.patients]
    for pa, pb in zip(a.patients, b.patients, strict=True):
        np.testing.assert_array_equal(pa.genomics, pb.genomics)
        assert pa.slide_ids == pb.slide_ids


@pytest.mark.bad_input
def test_cancer_code_from_file_name_override_or_oncotree(tmp_path):
    rows = table_rows()
    for row in rows:
        row["oncotree_code"] = "CCRCC"
    assert read_survival_table(write_table(tmp_path / "tcga_kirc_x.csv", rows)).cancers() == ["KIRC"]
    other = write_table(tmp_path / "cohort.csv", rows)
    assert read_survival_table(other).cancers() == ["KIRC"]  # OncoTree CCRCC -> TCGA KIRC
    overridden = read_survival_table(other, cancer="kirp")
    assert overridden.cancers() == ["KIRP"]
    assert {p.subtype for p in overridden.patients} == {"CCRCC"}  # the code is kept whatever the key
    # With the study in the file name, the oncotree_code column is not needed.
    no_codes = read_survival_table(write_table(tmp_path / "tcga_blca_y.csv", drop=("oncotree_code",)))
    assert no_codes.cancers() == ["BLCA"] and {p.subtype for p in no_codes.patients} == {""}
    with pytest.raises(InputError, match="oncotree_code"):
        read_survival_table(write_table(tmp_path / "cohort2.csv", drop=("oncotree_code",)))


def test_helpers():
    assert study_from_file_name("tcga_blca_all_clean.csv.zip") == "BLCA"
    assert study_from_file_name("blca.csv") is None
    assert study_of_oncotree_code("ccrcc") == "KIRC" and study_of_oncotree_code("LUAD") == "LUAD"
    assert study_of_oncotree_code(" IDC ") == "BRCA" and study_of_oncotree_code("USC") == "UCEC"
    assert study_of_oncotree_code("UCS") == "UCS"  # a TCGA study of its own, not UCEC
    assert study_of_oncotree_code("MACR") is None  # colon or rectum: left to --cancer
    assert study_of_oncotree_code("NOT_A_CODE") is None
    assert strip_slide_extension("TCGA-2F-A9KO-01Z-00-DX1.195576CF.svs") == "TCGA-2F-A9KO-01Z-00-DX1.195576CF"
    assert strip_slide_extension("TCGA-2F-A9KO-01Z-00-DX1.195576CF") == "TCGA-2F-A9KO-01Z-00-DX1.195576CF"


def test_oncotree_mapping_is_well_formed():
    """Every mapped code leads to a TCGA study, and no study code is remapped to another study."""
    assert set(ONCOTREE_TO_TCGA.values()) <= TCGA_STUDIES
    assert not set(ONCOTREE_TO_TCGA) & TCGA_STUDIES
    assert all(code == code.upper() and code.isalnum() for code in ONCOTREE_TO_TCGA)


def with_codes(codes: dict[str, str]) -> list[dict]:
    """`table_rows` with each patient's oncotree_code set (by case id); all rows of a patient share it."""
    rows = table_rows()
    for row in rows:
        row["oncotree_code"] = codes[row["case_id"]]
    return rows


BREAST = {"TCGA-AA-0001": "IDC", "TCGA-AA-0002": "ILC", "TCGA-AA-0003": "MDLC"}


def test_subtypes_of_one_study_are_one_cancer(tmp_path):
    """A breast table not named tcga_brca_*: three OncoTree codes, one cancer BRCA, the codes kept."""
    path = write_table(tmp_path / "breast_cohort.csv", with_codes(BREAST))
    table = read_survival_table(path)
    assert table.cancers() == ["BRCA"]
    assert {p.case_id: p.subtype for p in table.patients} == BREAST


def test_cancer_by_subtype_makes_each_code_a_cancer(tmp_path):
    codes = {**BREAST, "TCGA-AA-0003": "mdlc"}  # the key is upper-cased, the subtype kept as written
    path = write_table(tmp_path / "breast_cohort.csv", with_codes(codes))
    table = read_survival_table(path, cancer_by="subtype")
    assert table.cancers() == ["IDC", "ILC", "MDLC"]
    assert [p.subtype for p in table.patients] == ["IDC", "ILC", "mdlc"]
    # The file name names a study, but keying by subtype was asked for: the codes win.
    named = write_table(tmp_path / "tcga_brca_x.csv", with_codes(BREAST))
    assert read_survival_table(named, cancer_by="subtype").cancers() == ["IDC", "ILC", "MDLC"]
    assert read_survival_table(named).cancers() == ["BRCA"]


def test_pan_cancer_table_keys_each_row_by_its_study(tmp_path):
    path = write_table(tmp_path / "pan.csv",
                       with_codes({"TCGA-AA-0001": "IDC", "TCGA-AA-0002": "CCRCC", "TCGA-AA-0003": "BLCA"}))
    table = read_survival_table(path)
    assert [p.cancer for p in table.patients] == ["BRCA", "KIRC", "BLCA"]
    assert [p.subtype for p in table.patients] == ["IDC", "CCRCC", "BLCA"]


@pytest.mark.bad_input
def test_unmappable_codes_named_in_one_line(tmp_path):
    path = write_table(tmp_path / "cohort.csv",
                       with_codes({"TCGA-AA-0001": "IDC", "TCGA-AA-0002": "FOO", "TCGA-AA-0003": "MACR"}))
    with pytest.raises(InputError) as caught:
        read_survival_table(path)
    error = caught.value
    assert error.where == str(path) and "\n" not in str(error)
    assert "FOO (2 rows), MACR (1 row) not mapped to a TCGA study" in error.problem
    assert "--cancer STUDY" in error.problem and "--cancer-by subtype" in error.problem
    # Both ways out work.
    assert read_survival_table(path, cancer="BRCA").cancers() == ["BRCA"]
    assert read_survival_table(path, cancer_by="subtype").cancers() == ["FOO", "IDC", "MACR"]


@pytest.mark.bad_input
def test_unmappable_codes_list_is_bounded(tmp_path):
    rows = []
    for i in range(14):
        row = table_rows()[0]
        row.update(case_id=f"TCGA-ZZ-{i:04d}", slide_id=f"TCGA-ZZ-{i:04d}-DX1.svs", oncotree_code=f"X{i:02d}")
        rows.append(row)
    with pytest.raises(InputError, match=r"X09 \(1 row\) \.\.\. and 4 more not mapped"):
        read_survival_table(write_table(tmp_path / "many.csv", rows))


@pytest.mark.bad_input
def test_cancer_key_refusals(tmp_path):
    path = write_table(tmp_path / "breast.csv", with_codes(BREAST))
    with pytest.raises(InputError, match="must be one of study, subtype, got 'tissue'") as caught:
        read_survival_table(path, cancer_by="tissue")
    assert caught.value.where == "--cancer-by"
    with pytest.raises(InputError, match="cannot be combined with --cancer"):
        read_survival_table(path, cancer="BRCA", cancer_by="subtype")
    rows = with_codes(BREAST)
    rows[0]["oncotree_code"] = np.nan
    with pytest.raises(InputError, match="line 2: empty oncotree_code; give the study of the table with --cancer"):
        read_survival_table(write_table(tmp_path / "empty_code.csv", rows))
    with pytest.raises(InputError, match="line 2: empty oncotree_code; --cancer-by subtype needs a code on every"):
        read_survival_table(tmp_path / "empty_code.csv", cancer_by="subtype")
    assert read_survival_table(tmp_path / "empty_code.csv", cancer="BRCA").patients[0].subtype == ""
    rows = with_codes(BREAST)
    rows[0]["oncotree_code"] = "I/DC"  # a key names an HDF5 group: no slash
    with pytest.raises(InputError, match="oncotree_code 'I/DC' is not a plain code"):
        read_survival_table(write_table(tmp_path / "slash.csv", rows), cancer_by="subtype")
    rows = with_codes(BREAST)
    rows[2]["oncotree_code"] = "IDC"  # the second row of patient 2, which the first row calls ILC
    with pytest.raises(InputError, match="TCGA-AA-0002 appears twice with different oncotree_code"):
        read_survival_table(write_table(tmp_path / "two_codes.csv", rows))


@pytest.mark.bad_input
def test_site_column_first_row_wins(tmp_path):
    rows = table_rows()
    rows[2]["site"] = "ZZ"  # second row of patient 2 names another site
    table = read_survival_table(write_table(tmp_path / "tcga_blca_s.csv", rows), site_column="site")
    assert [p.site for p in table.patients] == ["2F", "XF", "2F"]
    with pytest.raises(InputError, match="hospital"):
        read_survival_table(tmp_path / "tcga_blca_s.csv", site_column="hospital")
    rows[0]["site"] = np.nan
    with pytest.raises(InputError, match="case TCGA-AA-0001 .*empty site"):
        read_survival_table(write_table(tmp_path / "tcga_blca_t.csv", rows), site_column="site")


@pytest.mark.bad_input
def test_extra_numeric_column_is_genomic_text_column_refused(tmp_path):
    rows = table_rows()
    for row in rows:
        row["purity"] = 0.5
    assert read_survival_table(write_table(tmp_path / "tcga_blca_a.csv", rows)).genomic_names == GENOMIC + ["purity"]
    for row in rows:
        row["purity"] = "high"
    with pytest.raises(InputError, match="'purity' is not numeric"):
        read_survival_table(write_table(tmp_path / "tcga_blca_b.csv", rows))


@pytest.mark.bad_input
def test_missing_genomics_whole_row_means_none_partial_refused(tmp_path):
    rows = table_rows()
    for g in GENOMIC:
        rows[0][g] = np.nan
    table = read_survival_table(write_table(tmp_path / "tcga_blca_a.csv", rows))
    assert table.patients[0].genomics is None and table.patients[1].genomics is not None
    rows = table_rows()
    rows[0]["TP53_mut"] = np.nan
    with pytest.raises(InputError, match="TP53_mut"):
        read_survival_table(write_table(tmp_path / "tcga_blca_b.csv", rows))


def _broken(rows: list[dict], change: str) -> list[dict]:
    if change == "conflicting survival":
        rows[2]["survival_months"] = 31.0
    elif change == "conflicting censorship":
        rows[2]["censorship"] = 0
    elif change == "conflicting genomics":
        rows[2]["MYC_cnv"] += 1.0
    elif change == "negative survival":
        rows[0]["survival_months"] = -1.0
    elif change == "NaN survival":
        rows[0]["survival_months"] = np.nan
    elif change == "text survival":
        rows[0]["survival_months"] = "soon"
    elif change == "censorship 2":
        rows[0]["censorship"] = 2
    elif change == "censorship NaN":
        rows[3]["censorship"] = np.nan
    elif change == "slide in two cases":
        rows[3]["slide_id"] = rows[0]["slide_id"]
    elif change == "empty case id":
        rows[0]["case_id"] = np.nan
    return rows


@pytest.mark.parametrize("change, message", [
    ("conflicting survival", "TCGA-AA-0002 appears twice with different survival_months"),
    ("conflicting censorship", "TCGA-AA-0002 appears twice with different censorship"),
    ("conflicting genomics", "TCGA-AA-0002 appears twice with different genomics"),
    ("negative survival", "TCGA-AA-0001 .*survival_months -1 is negative"),
    ("NaN survival", "TCGA-AA-0001 .*survival_months is missing"),
    ("text survival", "survival_months 'soon' is not a number"),
    ("censorship 2", "TCGA-AA-0001 .*censorship 2 is not 0 or 1"),
    ("censorship NaN", "TCGA-AA-0003 .*censorship missing is not 0 or 1"),
    ("slide in two cases", "belongs to two cases"),
    ("empty case id", "line 2: empty case_id"),
])
@pytest.mark.bad_input
def test_bad_rows_refused_naming_file_and_case(tmp_path, change, message):
    path = write_table(tmp_path / "tcga_blca_bad.csv", _broken(table_rows(), change))
    with pytest.raises(InputError, match=message) as caught:
        read_survival_table(path)
    assert caught.value.where == str(path)
    assert "\n" not in str(caught.value)


@pytest.mark.bad_input
def test_missing_required_columns_named(tmp_path):
    path = write_table(tmp_path / "tcga_blca_c.csv", drop=("slide_id", "censorship"))
    with pytest.raises(InputError, match="missing required column.*slide_id, censorship"):
        read_survival_table(path)
    # Without both survival columns the table is one of unlabelled patients (tests/test_predict.py); with one of
    # them, the other is missing.
    path = write_table(tmp_path / "tcga_blca_d.csv", drop=("survival_months",))
    with pytest.raises(InputError, match="missing required column.*survival_months"):
        read_survival_table(path)


@pytest.mark.bad_input
def test_unreadable_tables(tmp_path):
    not_csv = tmp_path / "table.csv"
    not_csv.write_bytes(bytes(range(128, 256)) * 10)
    two = tmp_path / "two.csv.zip"
    with zipfile.ZipFile(two, "w") as archive:
        archive.writestr("a.csv", "a\n1\n")
        archive.writestr("b.csv", "a\n1\n")
    truncated = tmp_path / "cut.csv.zip"
    full = write_zip(tmp_path / "full.csv.zip", write_table(tmp_path / "full.csv").read_text())
    truncated.write_bytes(full.read_bytes()[:200])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases = [(tmp_path / "missing.csv", "no such file"), (tmp_path, "is a folder"), (not_csv, "not a CSV table"),
             (two, "Multiple files"), (truncated, "damaged zip"), (empty, "empty file")]
    for path, message in cases:
        with pytest.raises(InputError, match=message) as caught:
            read_survival_table(path)
        assert caught.value.where == str(path)


@pytest.mark.parametrize("study, patients, slides, genomic, cancer, subtype", [
    ("blca", 373, 437, 1554 + 256 + 371, "BLCA", "BLCA"),
    ("kirc", 345, 350, 1556 + 937 + 10, "KIRC", "CCRCC"),  # its oncotree_code says CCRCC
])
def test_real_tables(tmp_path, study, patients, slides, genomic, cancer, subtype):
    path = TCGA / f"tcga_{study}_all_clean.csv.zip"
    if not path.exists():
        pytest.skip("real TCGA tables not present")
    table = read_survival_table(path, site_column="site")
    assert (len(table.patients), table.n_slides, len(table.genomic_names)) == (patients, slides, genomic)
    assert table.cancers() == [cancer]
    assert {p.subtype for p in table.patients} == {subtype}
    # The same table under another name: the study comes from the codes, and is the same.
    renamed = tmp_path / f"{study}.csv.zip"
    renamed.write_bytes(path.read_bytes())
    assert read_survival_table(renamed).cancers() == [cancer]
    assert all(p.genomics is not None and p.site for p in table.patients)
    assert all(not s.endswith(".svs") for p in table.patients for s in p.slide_ids)
