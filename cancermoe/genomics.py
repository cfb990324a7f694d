"""Standardizing genomic profiles with statistics of the training patients only.

Each cancer has its own gene list (`/genomics/<cancer>` in a bank), so every
statistic is per cancer and per feature. `GenomicMoments` are sums (patients,
sum, sum of squares) that add up across sites: a federation standardizes with
the pooled statistics of every site's training patients while only these sums
leave a site, and only for a cancer with at least `MIN_PATIENTS_FOR_MOMENTS`
training patients there (fewer would come close to describing one patient).
`GenomicScaler` applies ``(x - mean) / sd``; a feature that is constant among
the training patients keeps sd 1 (it maps to 0 for them).

`GenomicLayout` gives each cancer's genes token positions of their own: value j
of a BLCA profile is not the same gene as value j of a KIRC profile, so a model
that shares position j across cancers averages unrelated genes (on a synthetic
world of three cancers that alone kept CancerMoE at chance on an unseen site,
where one cancer alone learned). The layout is fixed by the training cancers
and their gene counts (in a federation: by the coordinator, from the summed
moments) and travels with the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from cancermoe.cohort import Cohort

MIN_PATIENTS_FOR_MOMENTS = 5  # a site sends no moments of a cancer it has fewer training patients of


@dataclass
class GenomicMoments:
    """Per cancer: patients with genomics, and the per-feature sum and sum of squares of their values (float64)."""

    patients: dict[str, int] = field(default_factory=dict)
    total: dict[str, np.ndarray] = field(default_factory=dict)
    total_squares: dict[str, np.ndarray] = field(default_factory=dict)

    def __add__(self, other: GenomicMoments) -> GenomicMoments:
        out = GenomicMoments(dict(self.patients), dict(self.total), dict(self.total_squares))
        for cancer, n in other.patients.items():
            if cancer in out.patients:
                if out.total[cancer].shape != other.total[cancer].shape:
                    raise ValueError(f"{cancer}: {out.total[cancer].size} vs {other.total[cancer].size} features")
                out.patients[cancer] += n
                out.total[cancer] = out.total[cancer] + other.total[cancer]
                out.total_squares[cancer] = out.total_squares[cancer] + other.total_squares[cancer]
            else:
                out.patients[cancer] = n
                out.total[cancer] = other.total[cancer]
                out.total_squares[cancer] = other.total_squares[cancer]
        return out

    def without_small_cancers(self, min_patients: int = MIN_PATIENTS_FOR_MOMENTS) -> GenomicMoments:
        """Only the cancers with at least ``min_patients`` patients: what a site may send."""
        keep = [c for c, n in self.patients.items() if n >= min_patients]
        return GenomicMoments({c: self.patients[c] for c in keep}, {c: self.total[c] for c in keep},
                              {c: self.total_squares[c] for c in keep})

    def scaler(self) -> GenomicScaler:
        mean, scale = {}, {}
        for cancer, n in self.patients.items():
            if n == 0:
                continue
            m = self.total[cancer] / n
            variance = np.maximum(self.total_squares[cancer] / n - m * m, 0.0)
            sd = np.sqrt(variance)
            mean[cancer] = m.astype(np.float32)
            scale[cancer] = np.where(sd > 1e-8, sd, 1.0).astype(np.float32)
        return GenomicScaler(mean, scale)


def genomic_moments(cohort: Cohort) -> GenomicMoments:
    """The moments of the genomic profiles of ``cohort``'s patients (those without genomics are skipped)."""
    by_cancer: dict[str, list[np.ndarray]] = {}
    for ref in cohort.refs:
        values = ref.bank.genomics(ref.patient)
        if values is not None:
            by_cancer.setdefault(ref.patient.cancer, []).append(np.asarray(values, dtype=np.float64))
    stacked = {cancer: np.stack(rows) for cancer, rows in by_cancer.items()}
    return GenomicMoments({c: len(x) for c, x in stacked.items()}, {c: x.sum(axis=0) for c, x in stacked.items()},
                          {c: (x * x).sum(axis=0) for c, x in stacked.items()})


@dataclass
class GenomicScaler:
    """Per-cancer standardization ``(x - mean) / scale``; a cancer it has no statistics of passes unchanged."""

    mean: dict[str, np.ndarray] = field(default_factory=dict)
    scale: dict[str, np.ndarray] = field(default_factory=dict)

    def apply(self, cancer: str, values: np.ndarray | None) -> np.ndarray | None:
        if values is None or cancer not in self.mean:
            return values
        return ((np.asarray(values, dtype=np.float32) - self.mean[cancer]) / self.scale[cancer]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": {c: v.tolist() for c, v in self.mean.items()},
                "scale": {c: v.tolist() for c, v in self.scale.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GenomicScaler:
        if not data:
            return cls()
        return cls({c: np.asarray(v, dtype=np.float32) for c, v in data["mean"].items()},
                   {c: np.asarray(v, dtype=np.float32) for c, v in data["scale"].items()})


@dataclass(frozen=True)
class GenomicLayout:
    """Where each cancer's genomic tokens sit in the model's piece-position table.

    ``genes``: per cancer, the length of its genomic vector. Cancers are laid out in code order, each
    over ``ceil(genes / piece)`` consecutive positions. An empty layout puts every cancer at position 0
    (the genes of all cancers share positions: ``genomics_by_cancer = false``).
    """

    genes: dict[str, int] = field(default_factory=dict)
    piece: int = 8

    @cached_property
    def _offsets(self) -> dict[str, int]:
        out, position = {}, 0
        for cancer in sorted(self.genes):
            out[cancer] = position
            position += math.ceil(self.genes[cancer] / self.piece)
        return out

    def offsets(self) -> dict[str, int]:
        """Each cancer's first position (computed once: `offset` is asked for every patient of every batch)."""
        return dict(self._offsets)

    @property
    def positions(self) -> int:
        """Piece positions the layout uses (all cancers together)."""
        return sum(math.ceil(n / self.piece) for n in self.genes.values())

    def offset(self, cancer: str) -> int | None:
        """First position of ``cancer``'s tokens; 0 for every cancer in an empty layout; None for a cancer the
        layout does not know (its genes have no trained positions, so its patients go without genomic tokens)."""
        if not self.genes:
            return 0
        return self._offsets.get(cancer)

    def check_fits(self, max_tokens: int) -> None:
        if self.positions > max_tokens:
            raise ValueError(f"the genomic profiles of {', '.join(sorted(self.genes))} need {self.positions} token "
                             f"positions; max_genomic_tokens is {max_tokens} (raise it with --set max_genomic_tokens=)")

    def to_dict(self) -> dict[str, Any]:
        return {"genes": dict(sorted(self.genes.items())), "piece": self.piece}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GenomicLayout:
        if not data:
            return cls()
        return cls({str(c): int(n) for c, n in data["genes"].items()}, int(data["piece"]))

    @classmethod
    def of_moments(cls, moments: GenomicMoments, piece: int) -> GenomicLayout:
        """The layout of the cancers ``moments`` has statistics of (a federation's pooled training patients)."""
        return cls({c: int(moments.total[c].size) for c, n in moments.patients.items() if n > 0}, piece)

    @classmethod
    def of_cohort(cls, cohort: Cohort, piece: int) -> GenomicLayout:
        """The layout of ``cohort``'s cancers that have genomic profiles."""
        genes: dict[str, int] = {}
        for ref in cohort.refs:
            if ref.patient.cancer not in genes:
                values = ref.bank.genomics(ref.patient)
                if values is not None:
                    genes[ref.patient.cancer] = int(np.asarray(values).size)
        return cls(genes, piece)
