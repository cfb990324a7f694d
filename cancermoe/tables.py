"""TCGA survival tables in the MCAT/PORPOISE layout: read, validate, group rows per patient.

The layout (see ``data/tcga/README.md``) has one row per diagnostic slide, so a
patient with two slides has two rows that repeat the patient's survival and
genomics. Conventions:

- ``survival_months``: follow-up time in months, >= 0.
- ``censorship``: 1 = censored (alive at last follow-up), 0 = death observed.
- unlabelled patients (new patients to predict): both cells empty, or a table
  without both columns. Their `TablePatient.censorship` is
  `cancermoe.bank.UNLABELLED` and their time NaN; one cell of the two filled
  and the other empty is refused.
- metadata columns are `METADATA_COLUMNS`; every other column is a genomic
  feature, in table order. This is the MCAT convention (its loader drops the
  metadata and keeps the rest); in the TCGA tables those columns are named by
  their suffix (``_rnaseq``, ``_cnv``, ``_mut``), but a numeric column without
  such a suffix is kept as a genomic feature too. A non-numeric one is refused.
- missing genomics: a row whose genomic cells are *all* empty is a patient
  without genomics (allowed: the patient may still have slides). A row with
  *some* empty cells is refused: imputing would invent data silently, and the
  real TCGA tables have no gaps.
- cancer: the TCGA study (BLCA, KIRC, BRCA, ...), not the OncoTree code in
  ``oncotree_code``, which names a subtype (the KIRC table says CCRCC; a
  breast table holds IDC, ILC, MDLC, ... for the one study BRCA). The study
  keys the stratified c-index, the per-cancer metrics and the genomics matrix;
  the raw code is kept as `TablePatient.subtype`. The study comes from the
  ``cancer`` argument (``--cancer``), else the file name (``tcga_<study>_...``),
  else each row's code through `study_of_oncotree_code`; a code that maps to no
  study is an error naming it. ``cancer_by="subtype"`` (``--cancer-by
  subtype``) makes the upper-cased code the key instead, on purpose.
- slide ids lose their whole-slide-image extension (``.svs``, ...), so they
  match the CLAM feature file stems.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cancermoe.bank import UNLABELLED
from cancermoe.errors import InputError

METADATA_COLUMNS = (
    "Unnamed: 0", "case_id", "slide_id", "age", "site", "survival_months", "censorship", "is_female",
    "oncotree_code", "train",
    # MCAT adds these two to its in-memory table; a table saved from there may carry them.
    "label", "disc_label",
)
REQUIRED_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship")
SURVIVAL_COLUMNS = ("survival_months", "censorship")  # both absent: a table of unlabelled patients
CANCER_COLUMN = "oncotree_code"
GENOMIC_SUFFIXES = ("_rnaseq", "_cnv", "_mut")
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tiff", ".tif", ".mrxs", ".scn")

CANCER_KEYS = ("study", "subtype")  # what `TablePatient.cancer` is: the TCGA study (default) or the OncoTree code

# TCGA studies: the 33 of the PanCancer Atlas, and the pooled cohorts that the
# MCAT/PORPOISE tables are named by (tcga_coadread_..., tcga_gbmlgg_...). An
# oncotree_code that is one of these is taken as that study.
TCGA_STUDIES = frozenset({
    "ACC", "BLCA", "BRCA", "CESC", "CHOL", "COAD", "DLBC", "ESCA", "GBM", "HNSC", "KICH", "KIRC", "KIRP",
    "LAML", "LGG", "LIHC", "LUAD", "LUSC", "MESO", "OV", "PAAD", "PCPG", "PRAD", "READ", "SARC", "SKCM",
    "STAD", "TGCT", "THCA", "THYM", "UCEC", "UCS", "UVM",
    "COADREAD", "GBMLGG",
})

# OncoTree codes of the subtypes the TCGA studies hold -> the study. Checked
# against the OncoTree tree (code and parent); mostly the children of the
# study's own OncoTree node. Only unambiguous codes: MACR (mucinous, colon or
# rectum) and GEJ (gastro-oesophageal junction: STAD or ESCA) are left out on
# purpose, as is UCS (an OncoTree child of UCEC, but a TCGA study of its own).
# A table holding a code not here needs --cancer (or a tcga_<study>_ file name).
ONCOTREE_TO_TCGA = {
    # BRCA: the children of OncoTree BRCA (invasive breast carcinoma), and metaplastic breast cancer
    **dict.fromkeys(("IDC", "ILC", "MDLC", "IMMC", "BRCNOS", "BRCANOS", "CSNOS", "SPC", "ACBC", "BRSRCC", "MBC"),
                    "BRCA"),
    # UCEC: the children of OncoTree UCEC (endometrial carcinoma) but UCS
    **dict.fromkeys(("UEC", "USC", "UMEC", "UCCC", "UDDC", "UPDC", "UMC", "UNEC", "UUC", "UASC", "UMNC"), "UCEC"),
    # kidney
    "CCRCC": "KIRC", "SCCRCC": "KIRC", "PRCC": "KIRP", "CHRCC": "KICH",
    # brain: GB is the newer OncoTree code of GBM; ASTR, ODG and (older OncoTree) OAST are the TCGA LGG types
    "GB": "GBM", "ASTR": "LGG", "ODG": "LGG", "OAST": "LGG",
    # liver and bile ducts
    "HCC": "LIHC", "FLC": "LIHC", "HCCIHCH": "LIHC", "IHCH": "CHOL", "EHCH": "CHOL", "PHCH": "CHOL",
    # head and neck squamous cell carcinoma by site
    **dict.fromkeys(("OCSC", "OPHSC", "LXSC", "HPHSC"), "HNSC"),
    # stomach adenocarcinoma by type
    **dict.fromkeys(("DSTAD", "ISTAD", "MSTAD", "PSTAD", "TSTAD", "SSRCC"), "STAD"),
    "ESCC": "ESCA",
    "MLUAD": "LUAD",
    "THPA": "THCA",
    "SOC": "OV", "HGSOC": "OV",
    "ECAD": "CESC", "CEAD": "CESC", "CEAS": "CESC",
    **dict.fromkeys(("PLMESO", "PLEMESO", "PLBMESO", "PLSMESO"), "MESO"),
    "UM": "UVM",
    "PHC": "PCPG", "PGNG": "PCPG",
    "AML": "LAML",
    "DLBCLNOS": "DLBC",
    **dict.fromkeys(("SEM", "NSGCT", "MGCT", "EMBCA", "TT", "TYST", "TCCA"), "TGCT"),
    **dict.fromkeys(("DDLS", "LMS", "ULMS", "MFS", "MFH", "SYNS", "MPNST"), "SARC"),
}
MAX_CODES_NAMED = 10  # how many unmappable codes an error names before "... and N more"

_STUDY_IN_FILE_NAME = re.compile(r"^tcga_([a-z0-9]+)_", re.IGNORECASE)
_CANCER_CODE = re.compile(r"[A-Z0-9_-]+")


@dataclass(frozen=True, eq=False)  # eq=False: a numpy field makes field-wise == ambiguous
class TablePatient:
    """One patient of a table: its rows merged. ``genomics`` is None when the patient has none."""

    case_id: str
    cancer: str
    survival_months: float
    censorship: int
    slide_ids: tuple[str, ...]
    genomics: np.ndarray | None
    site: str | None = None
    subtype: str = ""  # the row's oncotree_code as written ("" when the table has none)

    @property
    def event(self) -> bool:
        return self.censorship == 0

    @property
    def labelled(self) -> bool:
        return self.censorship != UNLABELLED


@dataclass(frozen=True, eq=False)
class SurvivalTable:
    """A validated table: patients in order of first appearance, genomic feature names in column order."""

    path: Path
    patients: list[TablePatient]
    genomic_names: list[str]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def n_slides(self) -> int:
        return sum(len(p.slide_ids) for p in self.patients)

    def cancers(self) -> list[str]:
        return sorted({p.cancer for p in self.patients})


def check_cancer_by(cancer_by: str, cancer: str | None = None) -> None:
    """Refuse a ``cancer_by`` other than study/subtype, or one that contradicts a fixed ``cancer``."""
    if cancer_by not in CANCER_KEYS:
        raise InputError("--cancer-by", f"must be one of {', '.join(CANCER_KEYS)}, got {cancer_by!r}")
    if cancer_by == "subtype" and cancer is not None:
        raise InputError("--cancer-by", "subtype keys each patient by its oncotree_code; it cannot be combined "
                                        "with --cancer, which gives every patient the same cancer")


def read_survival_table(
    path: str | os.PathLike[str],
    *,
    cancer: str | None = None,
    site_column: str | None = None,
    cancer_by: str = "study",
) -> SurvivalTable:
    """Read and validate a TCGA table (.csv, or a zip holding one CSV); raise `InputError` on any problem.

    ``cancer`` sets the cancer (study) of every row. ``site_column`` names the
    column whose value (of the patient's first row) becomes `TablePatient.site`;
    that column is never a genomic feature. ``cancer_by="subtype"`` keys each
    patient by its upper-cased oncotree_code instead of its study (see the
    module notes). Either way the raw code is kept as `TablePatient.subtype`.
    """
    check_cancer_by(cancer_by, cancer)
    path = Path(path)
    frame = _read_csv(path, string_columns=("case_id", "slide_id", "site", CANCER_COLUMN, site_column))
    unlabelled_table = not any(c in frame.columns for c in SURVIVAL_COLUMNS)
    missing = [c for c in REQUIRED_COLUMNS
               if c not in frame.columns and not (unlabelled_table and c in SURVIVAL_COLUMNS)]
    if cancer is not None:
        file_cancer: str | None = cancer.strip().upper()
    else:
        file_cancer = study_from_file_name(path) if cancer_by == "study" else None
    if file_cancer is None and CANCER_COLUMN not in frame.columns:
        missing.append(CANCER_COLUMN)
    if site_column is not None and site_column not in frame.columns:
        missing.append(site_column)
    if missing:
        raise InputError(path, f"missing required column(s): {', '.join(missing)}")
    if frame.empty:
        raise InputError(path, "table has no rows")

    genomic_names = [str(c) for c in frame.columns if c not in METADATA_COLUMNS and c != site_column]
    genomics = _genomic_matrix(path, frame, genomic_names)
    if unlabelled_table:
        months, censorship = np.full(len(frame), np.nan), np.full(len(frame), np.nan)
    else:
        months = _numeric_column(path, frame, "survival_months").copy()
        censorship = _numeric_column(path, frame, "censorship").copy()
    subtypes = [_text(v) for v in frame[CANCER_COLUMN]] if CANCER_COLUMN in frame.columns else [""] * len(frame)
    cancers = _row_cancers(path, subtypes, file_cancer, cancer_by)

    patients: dict[str, dict] = {}
    for row in range(len(frame)):
        line = row + 2  # the header is line 1 (exact unless the file has blank lines or multi-line cells)
        case_id = _text(frame["case_id"].iat[row])
        if not case_id:
            raise InputError(path, f"line {line}: empty case_id")
        unlabelled = bool(np.isnan(months[row]) and np.isnan(censorship[row]))
        if unlabelled:
            months[row], censorship[row] = np.nan, UNLABELLED
        else:
            _check_survival(path, case_id, line, months[row], censorship[row])
        slide_id = strip_slide_extension(_text(frame["slide_id"].iat[row]))
        site = _text(frame[site_column].iat[row]) if site_column else None
        if site_column and not site:
            raise InputError(path, f"case {case_id} (line {line}): empty {site_column}")
        vector = _row_genomics(path, genomic_names, genomics[row], case_id, line)
        seen = patients.get(case_id)
        if seen is None:
            patients[case_id] = dict(
                case_id=case_id, cancer=cancers[row], survival_months=float(months[row]),
                censorship=int(censorship[row]), slide_ids=[slide_id] if slide_id else [], genomics=vector,
                site=site,  # a patient whose rows name different sites keeps the first one
                subtype=subtypes[row],
            )
            continue
        _check_same_patient(path, seen, line, float(months[row]), int(censorship[row]), cancers[row],
                            subtypes[row], vector)
        if slide_id and slide_id not in seen["slide_ids"]:
            seen["slide_ids"].append(slide_id)

    _check_slides_unique(path, patients.values())
    return SurvivalTable(
        path=path,
        patients=[TablePatient(**{**p, "slide_ids": tuple(p["slide_ids"])}) for p in patients.values()],
        genomic_names=genomic_names,
    )


def study_from_file_name(path: str | os.PathLike[str]) -> str | None:
    """The TCGA study of a table named ``tcga_<study>_...`` (``BLCA`` for tcga_blca_all_clean.csv.zip)."""
    match = _STUDY_IN_FILE_NAME.match(Path(path).name)
    return match.group(1).upper() if match else None


def study_of_oncotree_code(oncotree_code: str) -> str | None:
    """The TCGA study of an OncoTree code (CCRCC -> KIRC, IDC -> BRCA, BLCA -> BLCA); None when unknown."""
    code = oncotree_code.strip().upper()
    if code in TCGA_STUDIES:
        return code
    return ONCOTREE_TO_TCGA.get(code)


def strip_slide_extension(slide_id: str) -> str:
    """``TCGA-...-DX1.<uuid>.svs`` -> ``TCGA-...-DX1.<uuid>``: the stem CLAM names its feature files by.

    Only known image extensions are removed: TCGA slide ids contain dots of their own.
    """
    lower = slide_id.lower()
    for ext in SLIDE_EXTENSIONS:
        if lower.endswith(ext):
            return slide_id[: -len(ext)]
    return slide_id


# --------------------------------------------------------------------------- steps


def _read_csv(path: Path, string_columns: tuple[str | None, ...]) -> pd.DataFrame:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not a table")
    # Decide on the content, not the name: a zipped table may be called .csv.zip, .zip or even .csv.
    try:
        compression = "zip" if zipfile.is_zipfile(path) else None
        with open(path, "rb") as f:
            starts_like_zip = f.read(4) == b"PK\x03\x04"
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    if starts_like_zip and compression is None:
        raise InputError(path, "damaged zip archive (truncated?)")
    dtype = {c: str for c in string_columns if c}
    try:
        return pd.read_csv(path, compression=compression, dtype=dtype, low_memory=False)
    except pd.errors.EmptyDataError:
        raise InputError(path, "empty file, not a CSV table") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a CSV table (binary content, not UTF-8 text)") from None
    # ParserError is a ValueError; pandas also raises ValueError for a zip
    # holding several files, and zipfile/OSError for a damaged zip.
    except (ValueError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"not a readable CSV table ({reason})") from None


def _genomic_matrix(path: Path, frame: pd.DataFrame, names: list[str]) -> np.ndarray:
    for name in names:
        if not pd.api.types.is_numeric_dtype(frame[name]):
            bad = frame[name][pd.to_numeric(frame[name], errors="coerce").isna() & frame[name].notna()]
            example = f" (e.g. {bad.iat[0]!r} on line {bad.index[0] + 2})" if len(bad) else ""
            raise InputError(path, f"column {name!r} is not numeric{example}; every non-metadata column is a "
                                   "genomic feature and must hold numbers")
    return frame[names].to_numpy(dtype=np.float64) if names else np.zeros((len(frame), 0))


def _numeric_column(path: Path, frame: pd.DataFrame, name: str) -> np.ndarray:
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
    unparsable = np.flatnonzero(np.isnan(values) & frame[name].notna().to_numpy())
    if unparsable.size:
        row = int(unparsable[0])
        raise InputError(path, f"line {row + 2}: {name} {frame[name].iat[row]!r} is not a number")
    return values


def _row_cancers(path: Path, codes: list[str], fixed: str | None, cancer_by: str) -> list[str]:
    """Each row's cancer key; ``codes`` are the rows' oncotree codes as written."""
    # The key names an HDF5 group in the bank (/genomics/<cancer>): keep it a plain word.
    if fixed is not None:
        if not _CANCER_CODE.fullmatch(fixed):
            raise InputError(path, f"cancer code {fixed!r} is not a plain code like BLCA")
        return [fixed] * len(codes)
    for row, code in enumerate(codes):
        if not code:
            fix = ("--cancer-by subtype needs a code on every row" if cancer_by == "subtype"
                   else "give the study of the table with --cancer STUDY")
            raise InputError(path, f"line {row + 2}: empty {CANCER_COLUMN}; {fix}")
    if cancer_by == "subtype":
        keys = [code.upper() for code in codes]
        for row, key in enumerate(keys):
            if not _CANCER_CODE.fullmatch(key):
                raise InputError(path, f"line {row + 2}: {CANCER_COLUMN} {codes[row]!r} is not a plain code "
                                       "like IDC")
        return keys
    studies = [study_of_oncotree_code(code) for code in codes]
    unknown: dict[str, int] = {}
    for code, study in zip(codes, studies, strict=True):
        if study is None:
            unknown[code] = unknown.get(code, 0) + 1
    if unknown:
        named = ", ".join(f"{code} ({n} row{'s' if n > 1 else ''})"
                          for code, n in sorted(unknown.items())[:MAX_CODES_NAMED])
        more = f" ... and {len(unknown) - MAX_CODES_NAMED} more" if len(unknown) > MAX_CODES_NAMED else ""
        raise InputError(path, f"{CANCER_COLUMN} {named}{more} not mapped to a TCGA study; give the table's "
                               "study with --cancer STUDY (e.g. --cancer BRCA), or key patients by subtype "
                               "with --cancer-by subtype")
    return studies  # type: ignore[return-value]  # no None left


def _check_survival(path: Path, case_id: str, line: int, months: float, censorship: float) -> None:
    if not np.isfinite(months):
        raise InputError(path, f"case {case_id} (line {line}): survival_months is missing")
    if months < 0:
        raise InputError(path, f"case {case_id} (line {line}): survival_months {months:g} is negative")
    if censorship not in (0.0, 1.0):  # NaN fails this too
        shown = "missing" if np.isnan(censorship) else f"{censorship:g}"
        raise InputError(path, f"case {case_id} (line {line}): censorship {shown} is not 0 or 1 "
                               "(1 = censored, 0 = death observed)")


def _row_genomics(path: Path, names: list[str], values: np.ndarray, case_id: str, line: int) -> np.ndarray | None:
    if not names:
        return None
    missing = np.isnan(values)
    if missing.all():
        return None
    if missing.any():
        column = names[int(np.flatnonzero(missing)[0])]
        raise InputError(path, f"case {case_id} (line {line}): {int(missing.sum())} empty genomic value(s), "
                               f"first in column {column!r}; fill or drop them (no imputation here)")
    if not np.isfinite(values).all():
        column = names[int(np.flatnonzero(~np.isfinite(values))[0])]
        raise InputError(path, f"case {case_id} (line {line}): infinite genomic value in column {column!r}")
    return values.astype(np.float32)


def _check_same_patient(path: Path, seen: dict, line: int, months: float, censorship: int, cancer: str,
                        subtype: str, genomics: np.ndarray | None) -> None:
    """A patient's later rows must repeat what its first row says."""
    case_id = seen["case_id"]
    for field, first, now in (("survival_months", _comparable(seen["survival_months"]), _comparable(months)),
                              ("censorship", seen["censorship"], censorship),
                              ("cancer", seen["cancer"], cancer),
                              (CANCER_COLUMN, seen["subtype"], subtype)):
        if first != now:
            raise InputError(path, f"case {case_id} appears twice with different {field} "
                                   f"({first} and {now}, line {line})")
    same_genomics = (seen["genomics"] is None and genomics is None) or (
        seen["genomics"] is not None and genomics is not None and np.array_equal(seen["genomics"], genomics))
    if not same_genomics:
        raise InputError(path, f"case {case_id} appears twice with different genomics (line {line})")


def _comparable(months: float) -> float | None:
    """NaN (unlabelled) as None, so two rows of the same unlabelled patient compare equal."""
    return None if np.isnan(months) else months


def _check_slides_unique(path: Path, patients) -> None:
    owner: dict[str, str] = {}
    for p in patients:
        for slide_id in p["slide_ids"]:
            if slide_id in owner:
                raise InputError(path, f"slide {slide_id} belongs to two cases ({owner[slide_id]} and {p['case_id']})")
            owner[slide_id] = p["case_id"]


def _text(value: object) -> str:
    """A cell as stripped text; an empty cell (NaN) is ''."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    return str(value).strip()
