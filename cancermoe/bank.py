"""The site patch bank: one HDF5 file per hospital, read a few rows at a time.

Layout (schema version 2)::

    /                         attrs: schema_version, feature_dim, feature_dtype,
                                     source, tool, created, plus free-form extras
                                     (site, seeds, ...)
    /slides/<slide_id>/features   [n, D] float16|float32, chunked by ROWS_PER_CHUNK rows
    /slides/<slide_id>/coords     [n, 2] int32, patch top-left in level-0 pixels
    /slides/<slide_id>/source_row [n] int64, row of this patch in the imported file
    /patients/case_id         [P] str
    /patients/cancer          [P] str   (TCGA study code, e.g. BRCA; the subtype when imported with
                                         --cancer-by subtype)
    /patients/subtype         [P] str   (the table's oncotree_code as written, e.g. IDC; "" when none)
    /patients/survival_months [P] float64
    /patients/censorship      [P] int8  (1 = censored, 0 = death observed, -1 = unlabelled)
    /patients/genomics_row    [P] int32 (row in /genomics/<cancer>/values, -1 = none)
    /patients/slide_offsets   [P+1] int64, CSR offsets into slide_ids
    /patients/slide_ids       [S] str
    /patients/oracle_risk     [P] float64, synthetic banks only
    /genomics/<cancer>/values [n, G] float32
    /genomics/<cancer>/names  [G] str

Schema history: version 2 added /patients/subtype. A version-1 bank still
opens; its patients read with subtype "".

Unlabelled patients (new patients to predict, whose outcome is not known yet)
have survival_months NaN and censorship -1 (`UNLABELLED`); training skips
them, prediction scores them. Older readers never see them: only banks of
unlabelled patients hold the value.

Slide rows are stored in Morton (Z-curve) order of their coords, so patches
that are neighbours on the slide are mostly neighbours on disk and a spatial
neighbourhood costs few chunk reads. ``source_row`` maps back to the order of
the imported file.

A bank is written once, by `BankWriter`, into a temporary file renamed into
place on success; a failed write leaves nothing behind. It is read by `Bank`,
which never loads a slide's features whole.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cancermoe import __version__
from cancermoe.errors import InputError
from cancermoe.files import replace_durably, temporary_path

SCHEMA_VERSION = 2  # 2: /patients/subtype. Older versions open too (see `Bank._load_patients`).
SUBTYPE_SINCE = 2  # the first schema version with /patients/subtype
ROWS_PER_CHUNK = 32
FEATURE_DTYPES = ("float16", "float32")
VALIDATION_BLOCK_ROWS = 1 << 16

UNLABELLED = -1  # censorship of a patient without survival data (survival_months NaN)

_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Patient:
    """One patient of a bank. ``censorship`` is 1 for censored, 0 for an observed death, `UNLABELLED` (-1, with
    ``survival_months`` NaN) when the outcome is not known."""

    index: int
    case_id: str
    cancer: str
    survival_months: float
    censorship: int
    slide_ids: tuple[str, ...]
    genomics_row: int
    subtype: str = ""  # the table's oncotree_code (IDC, ...); "" when none, or in a version-1 bank

    @property
    def event(self) -> bool:
        return self.censorship == 0

    @property
    def labelled(self) -> bool:
        return self.censorship != UNLABELLED

    @property
    def has_slides(self) -> bool:
        return len(self.slide_ids) > 0

    @property
    def has_genomics(self) -> bool:
        return self.genomics_row >= 0


class BadSlideError(InputError):
    """A slide that cannot go into a bank; importers may skip it and go on."""


# --------------------------------------------------------------------------- curve order


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert a zero bit between each of the low 32 bits of ``v`` (uint64)."""
    v = v & np.uint64(0xFFFFFFFF)
    for shift, mask in (
        (16, 0x0000FFFF0000FFFF),
        (8, 0x00FF00FF00FF00FF),
        (4, 0x0F0F0F0F0F0F0F0F),
        (2, 0x3333333333333333),
        (1, 0x5555555555555555),
    ):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def morton_codes(coords: np.ndarray) -> np.ndarray:
    """Z-curve code of each (x, y) row of ``coords`` (any integer pixel grid)."""
    c = np.asarray(coords, dtype=np.int64)
    c = (c - c.min(axis=0)).astype(np.uint64)
    return _spread_bits(c[:, 0]) | (_spread_bits(c[:, 1]) << np.uint64(1))


def curve_order(coords: np.ndarray) -> np.ndarray:
    """Permutation that puts patches in Z-curve order: new row i is old row ``order[i]``."""
    if len(coords) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argsort(morton_codes(coords), kind="stable").astype(np.int64)


def chunks_touched(rows: np.ndarray, rows_per_chunk: int = ROWS_PER_CHUNK) -> int:
    """How many row chunks a read of ``rows`` has to touch."""
    return int(np.unique(np.asarray(rows) // rows_per_chunk).size)


def contiguous_runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted unique rows into half-open [start, stop) runs of consecutive rows."""
    if sorted_rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [sorted_rows.size]))
    return [(int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


# --------------------------------------------------------------------------- writing


def check_slide(slide_id: str, features_shape: tuple[int, ...], coords_shape: tuple[int, ...],
                feature_dim: int, where: str | os.PathLike[str]) -> None:
    """Raise `BadSlideError` unless the shapes make a valid slide of ``feature_dim``."""
    if not slide_id or "/" in slide_id:
        raise BadSlideError(where, f"invalid slide id {slide_id!r} (empty or contains '/')")
    if len(features_shape) != 2:
        raise BadSlideError(where, f"slide {slide_id}: features must be 2-D [patches, dim], got shape {features_shape}")
    if features_shape[0] == 0:
        raise BadSlideError(where, f"slide {slide_id}: empty slide (0 patches)")
    if features_shape[1] != feature_dim:
        raise BadSlideError(
            where, f"slide {slide_id}: feature dimension {features_shape[1]}, expected {feature_dim}"
        )
    if coords_shape != (features_shape[0], 2):
        raise BadSlideError(
            where,
            f"slide {slide_id}: coords shape {coords_shape} does not match {features_shape[0]} patches "
            "(expected [patches, 2])",
        )


def check_survival(where: str | os.PathLike[str], case_id: str, survival_months: float, censorship: int) -> None:
    """A labelled patient's time is finite and non-negative with censorship 0 or 1; an unlabelled one has NaN and
    `UNLABELLED` (both, or it is a half-filled record)."""
    if censorship == UNLABELLED and np.isnan(survival_months):
        return
    if censorship == UNLABELLED:
        raise InputError(where, f"case {case_id}: survival time {survival_months} given for an unlabelled patient")
    if not np.isfinite(survival_months) or survival_months < 0:
        raise InputError(where, f"case {case_id}: survival time {survival_months} is negative or not a number")
    if censorship not in (0, 1):
        raise InputError(where, f"case {case_id}: censorship {censorship!r} is not 0 or 1")


def _check_finite(slide_id: str, block: np.ndarray, where: str | os.PathLike[str]) -> None:
    if not np.isfinite(block).all():
        raise BadSlideError(where, f"slide {slide_id}: features contain NaN or Inf")


class BankWriter:
    """Writes one bank atomically: into a hidden temporary file, renamed on `commit`.

    Use as a context manager: leaving the block normally commits, an exception
    aborts and removes the temporary file, so ``path`` is either untouched or
    a complete bank.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        feature_dim: int,
        source: str,
        feature_dtype: str = "float16",
        overwrite: bool = False,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        if feature_dtype not in FEATURE_DTYPES:
            raise InputError(self.path, f"feature dtype {feature_dtype!r} not one of {FEATURE_DTYPES}")
        if self.path.exists() and not overwrite:
            raise InputError(self.path, "already exists (use --force to replace it)")
        if not self.path.parent.is_dir():
            raise InputError(self.path, f"folder {self.path.parent} does not exist")
        self.feature_dim = int(feature_dim)
        self.feature_dtype = feature_dtype
        self._tmp = temporary_path(self.path)
        self._h5 = h5py.File(self._tmp, "w")
        self._h5.attrs.update(
            schema_version=SCHEMA_VERSION,
            feature_dim=self.feature_dim,
            feature_dtype=feature_dtype,
            source=source,
            tool=f"cancermoe {__version__}",
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        for key, value in (attrs or {}).items():
            self._h5.attrs[key] = value
        self._slides = self._h5.create_group("slides")
        self._patients: list[dict[str, Any]] = []
        self._case_ids: set[str] = set()
        self._genomic_names: dict[str, list[str]] = {}
        self._genomic_rows: dict[str, list[np.ndarray]] = {}
        self._closed = False

    # ---- slides

    def add_slide(self, slide_id: str, features: np.ndarray, coords: np.ndarray,
                  where: str | os.PathLike[str] | None = None) -> None:
        """Add a slide held in memory: validated, then stored in curve order."""
        where = where if where is not None else self.path
        features = np.asarray(features)
        coords = np.asarray(coords)
        check_slide(slide_id, features.shape, coords.shape, self.feature_dim, where)
        _check_finite(slide_id, features, where)
        order = curve_order(coords)
        self.add_slide_blocks(slide_id, coords[order], iter([features[order]]), source_row=order, where=where)

    def add_slide_blocks(
        self,
        slide_id: str,
        coords: np.ndarray,
        feature_blocks: Iterable[np.ndarray],
        *,
        source_row: np.ndarray | None = None,
        where: str | os.PathLike[str] | None = None,
    ) -> None:
        """Add a slide whose features arrive in blocks of rows, already in final row order.

        For slides too large to hold: ``coords`` (small) is given whole, the
        features stream in. The caller is responsible for the row order (see
        `curve_order`); ``source_row`` records it (default: identity).
        """
        where = where if where is not None else self.path
        n = len(coords)
        check_slide(slide_id, (n, self.feature_dim), np.shape(coords), self.feature_dim, where)
        if slide_id in self._slides:
            raise BadSlideError(where, f"slide {slide_id} appears twice")
        group = self._slides.create_group(slide_id)
        try:
            features = group.create_dataset(
                "features", shape=(n, self.feature_dim), dtype=self.feature_dtype,
                chunks=(min(ROWS_PER_CHUNK, n), self.feature_dim),
            )
            written = 0
            for block in feature_blocks:
                block = np.asarray(block)
                if block.ndim != 2 or block.shape[1] != self.feature_dim:
                    raise BadSlideError(where, f"slide {slide_id}: feature block of shape {block.shape}")
                if written + len(block) > n:
                    raise BadSlideError(where, f"slide {slide_id}: more feature rows than its {n} coords")
                _check_finite(slide_id, block, where)
                with np.errstate(over="ignore"):  # overflow is reported just below, as a bad slide
                    block = block.astype(self.feature_dtype, copy=False)
                if not np.isfinite(block).all():
                    raise BadSlideError(where, f"slide {slide_id}: features overflow {self.feature_dtype} "
                                               "(store them as float32)")
                features[written:written + len(block)] = block
                written += len(block)
            if written != n:
                raise BadSlideError(where, f"slide {slide_id}: {written} feature rows for {n} coords")
        except BaseException:
            del self._slides[slide_id]
            raise
        group.create_dataset("coords", data=np.asarray(coords, dtype=np.int32))
        rows = np.arange(n, dtype=np.int64) if source_row is None else np.asarray(source_row, dtype=np.int64)
        group.create_dataset("source_row", data=rows)

    def has_slide(self, slide_id: str) -> bool:
        return slide_id in self._slides

    def set_attrs(self, slide_id: str | None = None, **attrs: Any) -> None:
        """Set bank attributes (or one slide's, with ``slide_id``) at any time before `commit`."""
        target = self._h5 if slide_id is None else self._slides[slide_id]
        for key, value in attrs.items():
            target.attrs[key] = value

    # ---- patients and genomics

    def set_genomic_features(self, cancer: str, names: Sequence[str]) -> None:
        """Declare the genomic feature names of one cancer (before its patients)."""
        if cancer in self._genomic_names and list(names) != self._genomic_names[cancer]:
            raise InputError(self.path, f"genomic features of {cancer} declared twice, differently")
        self._genomic_names[cancer] = [str(n) for n in names]
        self._genomic_rows.setdefault(cancer, [])

    def add_patient(
        self,
        case_id: str,
        cancer: str,
        survival_months: float,
        censorship: int,
        slide_ids: Sequence[str] = (),
        genomics: np.ndarray | None = None,
        oracle_risk: float | None = None,
        where: str | os.PathLike[str] | None = None,
        subtype: str = "",
    ) -> None:
        """Add one patient; slides must already be added, genomics must match the cancer's names.

        ``cancer`` is the key the patient is grouped by (stratified c-index,
        genomics matrix); ``subtype`` is an attribute kept alongside it. A patient
        without survival data has ``survival_months`` NaN and ``censorship``
        `UNLABELLED`: one of the two without the other is refused.
        """
        where = where if where is not None else self.path
        if not case_id:
            raise InputError(where, "empty case id")
        if case_id in self._case_ids:
            raise InputError(where, f"case {case_id} appears twice")
        survival_months = float(survival_months)
        check_survival(where, case_id, survival_months, censorship)
        for slide_id in slide_ids:
            if slide_id not in self._slides:
                raise InputError(where, f"case {case_id}: slide {slide_id} was not added")
        genomics_row = -1
        if genomics is not None:
            genomics_row = self._add_genomics(case_id, cancer, genomics, where)
        self._case_ids.add(case_id)
        self._patients.append(
            dict(case_id=case_id, cancer=cancer, subtype=str(subtype), survival_months=survival_months,
                 censorship=int(censorship), slide_ids=list(slide_ids), genomics_row=genomics_row,
                 oracle_risk=oracle_risk)
        )

    def _add_genomics(self, case_id: str, cancer: str, genomics: np.ndarray,
                      where: str | os.PathLike[str]) -> int:
        if cancer not in self._genomic_names:
            raise InputError(where, f"case {case_id}: genomic features of {cancer} were not declared")
        vector = np.asarray(genomics, dtype=np.float32).reshape(-1)
        expected = len(self._genomic_names[cancer])
        if vector.size != expected:
            raise InputError(where, f"case {case_id}: {vector.size} genomic values, expected {expected}")
        if not np.isfinite(vector).all():
            raise InputError(where, f"case {case_id}: genomic values contain NaN or Inf")
        rows = self._genomic_rows[cancer]
        rows.append(vector)
        return len(rows) - 1

    @property
    def n_patients(self) -> int:
        return len(self._patients)

    # ---- finishing

    def commit(self) -> Path:
        """Write the patient table and move the finished bank into place."""
        if not self._patients:
            raise InputError(self.path, "no patients to write")
        self._write_patients()
        self._write_genomics()
        self._h5.close()
        self._closed = True
        replace_durably(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._h5.close()
            self._closed = True
        self._tmp.unlink(missing_ok=True)

    def _write_patients(self) -> None:
        group = self._h5.create_group("patients")
        rows = self._patients
        group.create_dataset("case_id", data=[p["case_id"] for p in rows], dtype=_STR)
        group.create_dataset("cancer", data=[p["cancer"] for p in rows], dtype=_STR)
        group.create_dataset("subtype", data=[p["subtype"] for p in rows], dtype=_STR)
        group.create_dataset("survival_months", data=[p["survival_months"] for p in rows], dtype=np.float64)
        group.create_dataset("censorship", data=[p["censorship"] for p in rows], dtype=np.int8)
        group.create_dataset("genomics_row", data=[p["genomics_row"] for p in rows], dtype=np.int32)
        offsets = np.cumsum([0] + [len(p["slide_ids"]) for p in rows]).astype(np.int64)
        group.create_dataset("slide_offsets", data=offsets)
        slide_ids = [s for p in rows for s in p["slide_ids"]]
        group.create_dataset("slide_ids", shape=(len(slide_ids),), data=slide_ids or None, dtype=_STR)
        risks = [p["oracle_risk"] for p in rows]
        if any(r is not None for r in risks):
            if any(r is None for r in risks):
                raise InputError(self.path, "oracle risk given for some patients only")
            group.create_dataset("oracle_risk", data=np.asarray(risks, dtype=np.float64))

    def _write_genomics(self) -> None:
        group = self._h5.create_group("genomics")
        for cancer, names in self._genomic_names.items():
            rows = self._genomic_rows[cancer]
            sub = group.create_group(cancer)
            values = np.stack(rows) if rows else np.zeros((0, len(names)), dtype=np.float32)
            sub.create_dataset("values", data=values.astype(np.float32))
            sub.create_dataset("names", data=names, dtype=_STR)

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


# --------------------------------------------------------------------------- reading


def check_hdf5_file(path: Path, error: type[InputError] = InputError) -> None:
    """Raise ``error`` (naming the file) unless ``path`` is a readable HDF5 file."""
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise error(path, f"cannot be read ({exc.strerror or exc})") from None
    if not is_hdf5:
        raise error(path, "not an HDF5 file")


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not a bank file")
    check_hdf5_file(path)
    try:
        # No chunk cache: DPS reads scattered rows, and caching a whole 32-row chunk
        # to return one row costs more than reading the row alone.
        return h5py.File(path, "r", rdcc_nbytes=0)
    except OSError:
        raise InputError(path, "HDF5 file cannot be opened (truncated or corrupt)") from None


class Bank:
    """A patch bank opened read-only.

    The patient table is loaded at open (it is small); slide features are read
    on demand, a few rows at a time, with `read_features`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._h5 = _open_h5(self.path)
        try:
            self._load_header()
            self._load_patients()
        except InputError:
            self._h5.close()
            raise
        except (KeyError, OSError, ValueError, TypeError) as exc:
            self._h5.close()
            raise InputError(self.path, f"not a valid patch bank ({exc})") from None

    def _load_header(self) -> None:
        attrs = self._h5.attrs
        if "schema_version" not in attrs:
            raise InputError(self.path, "not a patch bank (no schema_version attribute)")
        version = int(attrs["schema_version"])
        if version > SCHEMA_VERSION:
            raise InputError(
                self.path,
                f"bank schema version {version} is newer than this cancermoe supports ({SCHEMA_VERSION}); "
                "upgrade cancermoe",
            )
        self.schema_version = version
        self.feature_dim = int(attrs["feature_dim"])
        self.feature_dtype = str(attrs["feature_dtype"])
        self.source = str(attrs["source"])
        self.attrs: dict[str, Any] = {k: _plain(v) for k, v in attrs.items()}
        for name in ("slides", "patients", "genomics"):
            if name not in self._h5:
                raise InputError(self.path, f"not a valid patch bank (group /{name} missing)")

    def _load_patients(self) -> None:
        table = self._h5["patients"]
        case_ids = _strings(table["case_id"])
        cancers = _strings(table["cancer"])
        if self.schema_version >= SUBTYPE_SINCE:
            if "subtype" not in table:
                raise InputError(self.path, f"not a valid patch bank (schema {self.schema_version} but "
                                            "/patients/subtype missing)")
            subtypes = _strings(table["subtype"])
        else:
            subtypes = [""] * len(case_ids)  # written before subtypes were kept
        months = table["survival_months"][()]
        censorship = table["censorship"][()]
        genomics_row = table["genomics_row"][()]
        offsets = table["slide_offsets"][()]
        slide_ids = _strings(table["slide_ids"])
        n = len(case_ids)
        for name, column in (("cancer", cancers), ("subtype", subtypes), ("survival_months", months),
                             ("censorship", censorship), ("genomics_row", genomics_row)):
            if len(column) != n:
                raise InputError(self.path, f"patient table column {name} has {len(column)} rows, expected {n}")
        if len(offsets) != n + 1 or offsets[-1] != len(slide_ids):
            raise InputError(self.path, "patient table slide offsets do not match slide ids")
        self.patients: list[Patient] = [
            Patient(
                index=i,
                case_id=case_ids[i],
                cancer=cancers[i],
                survival_months=float(months[i]),
                censorship=int(censorship[i]),
                slide_ids=tuple(slide_ids[offsets[i]:offsets[i + 1]]),
                genomics_row=int(genomics_row[i]),
                subtype=subtypes[i],
            )
            for i in range(n)
        ]
        self.oracle_risk: np.ndarray | None = table["oracle_risk"][()] if "oracle_risk" in table else None

    # ---- patients

    def __len__(self) -> int:
        return len(self.patients)

    def cancers(self) -> list[str]:
        return sorted({p.cancer for p in self.patients})

    def subtypes(self) -> dict[str, dict[str, int]]:
        """Patients per subtype within each cancer: {cancer: {subtype: patients}}, both sorted ("" = none)."""
        counts: dict[str, dict[str, int]] = {}
        for p in self.patients:
            within = counts.setdefault(p.cancer, {})
            within[p.subtype] = within.get(p.subtype, 0) + 1
        return {c: dict(sorted(counts[c].items())) for c in sorted(counts)}

    def survival_months(self) -> np.ndarray:
        return np.array([p.survival_months for p in self.patients], dtype=np.float64)

    def censorship(self) -> np.ndarray:
        return np.array([p.censorship for p in self.patients], dtype=np.int8)

    # ---- slides

    def slide_ids(self) -> list[str]:
        return list(self._h5["slides"].keys())

    def n_patches(self, slide_id: str) -> int:
        return int(self._slide(slide_id)["features"].shape[0])

    def _slide(self, slide_id: str) -> h5py.Group:
        try:
            return self._h5["slides"][slide_id]
        except KeyError:
            raise InputError(self.path, f"no slide {slide_id!r} in this bank") from None

    def read_features(self, slide_id: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows ``rows`` of one slide's features as float32 [len(rows), D], in the order asked.

        Only the chunks holding those rows are read: the cost grows with the
        number of rows (and how scattered they are), not with the slide's size.
        """
        rows = np.asarray(rows, dtype=np.int64)
        dataset = self._slide(slide_id)["features"]
        if rows.size and (rows.min() < 0 or rows.max() >= dataset.shape[0]):
            raise IndexError(f"{slide_id}: rows outside [0, {dataset.shape[0]})")
        unique, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((unique.size, self.feature_dim), dtype=np.float32)
        at = 0
        for start, stop in contiguous_runs(unique):
            out[at:at + stop - start] = dataset[start:stop]
            at += stop - start
        return out[inverse]

    def read_coords(self, slide_id: str) -> np.ndarray:
        """All coords of one slide, int32 [n, 2] (8 bytes a patch: small even for 1M patches)."""
        return self._slide(slide_id)["coords"][()]

    def source_rows(self, slide_id: str) -> np.ndarray:
        return self._slide(slide_id)["source_row"][()]

    def iter_feature_blocks(self, slide_id: str, block_rows: int = VALIDATION_BLOCK_ROWS) -> Iterator[np.ndarray]:
        """A slide's features front to back in blocks, for whole-slide scans with bounded memory."""
        dataset = self._slide(slide_id)["features"]
        for start in range(0, dataset.shape[0], block_rows):
            yield dataset[start:start + block_rows]

    # ---- genomics

    def genomic_feature_names(self, cancer: str) -> list[str]:
        if cancer not in self._h5["genomics"]:
            return []
        return _strings(self._h5["genomics"][cancer]["names"])

    def genomics(self, patient: Patient) -> np.ndarray | None:
        """The patient's genomic vector (float32), or None when the patient has none."""
        if not patient.has_genomics:
            return None
        return self._h5["genomics"][patient.cancer]["values"][patient.genomics_row].astype(np.float32)

    def genomics_matrix(self, cancer: str) -> np.ndarray:
        if cancer not in self._h5["genomics"]:
            return np.zeros((0, 0), dtype=np.float32)
        return self._h5["genomics"][cancer]["values"][()]

    # ---- lifecycle

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bank(path: str | os.PathLike[str]) -> Bank:
    """Open a bank read-only; raises `InputError` (one line, naming the file) if it is not one."""
    return Bank(path)


def _strings(dataset: h5py.Dataset) -> list[str]:
    """A string dataset as str (h5py hands variable-length strings back as bytes)."""
    return [s.decode() if isinstance(s, bytes) else str(s) for s in dataset[()]]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# --------------------------------------------------------------------------- validation


def validate_bank(bank: Bank, progress: Any = None) -> None:
    """Check everything `Bank` does not check at open; raise `InputError` at the first problem.

    Scans every slide's features (in blocks: memory stays bounded) for NaN/Inf.
    ``progress`` is an optional callable taking the number of patches scanned.
    """
    where = bank.path
    seen_ids: set[str] = set()
    for p in bank.patients:
        if p.case_id in seen_ids:
            raise InputError(where, f"case {p.case_id} appears twice")
        seen_ids.add(p.case_id)
        check_survival(where, p.case_id, p.survival_months, p.censorship)
        if p.has_genomics:
            n_rows = bank.genomics_matrix(p.cancer).shape[0]
            if p.genomics_row >= n_rows:
                raise InputError(where, f"case {p.case_id}: genomics row {p.genomics_row} out of range")
    slides = set(bank.slide_ids())
    for p in bank.patients:
        for slide_id in p.slide_ids:
            if slide_id not in slides:
                raise InputError(where, f"case {p.case_id}: slide {slide_id} missing from /slides")
    for slide_id in sorted(slides):
        group = bank._slide(slide_id)
        features, coords = group["features"], group["coords"]
        try:
            check_slide(slide_id, features.shape, coords.shape, bank.feature_dim, where)
        except BadSlideError as exc:
            raise InputError(exc.where, exc.problem) from None
        for block in bank.iter_feature_blocks(slide_id):
            if not np.isfinite(block).all():
                raise InputError(where, f"slide {slide_id}: features contain NaN or Inf")
            if progress is not None:
                progress(len(block))
    for cancer in bank._h5["genomics"]:
        values = bank.genomics_matrix(cancer)
        if values.shape[1] != len(bank.genomic_feature_names(cancer)):
            raise InputError(where, f"genomics of {cancer}: {values.shape[1]} columns but "
                                    f"{len(bank.genomic_feature_names(cancer))} names")
        if not np.isfinite(values).all():
            raise InputError(where, f"genomics of {cancer} contain NaN or Inf")
