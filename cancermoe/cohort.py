"""A cohort: the patients of one or more banks, pooled, with their survival arrays.

Training reads patients through a cohort so that a site's single bank, and
the centralized baseline over every site's bank, are the same code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cancermoe.bank import Bank, Patient, open_bank
from cancermoe.errors import InputError


@dataclass(frozen=True)
class PatientRef:
    """A patient and the bank it lives in."""

    bank: Bank
    patient: Patient

    @property
    def key(self) -> str:
        """Unique across banks: a case id may only repeat if it is the same patient at two sites."""
        return f"{self.bank.path.name}:{self.patient.case_id}"


class Cohort:
    """Patients from several banks, in a fixed order; `subset` keeps that order.

    Unlabelled patients (no survival data: time NaN, censorship `cancermoe.bank.UNLABELLED`) may be in a cohort
    that is only predicted; training and evaluation take `labelled_patients` of it.
    """

    def __init__(self, refs: Sequence[PatientRef]) -> None:
        self.refs = list(refs)
        self.survival_months = np.array([r.patient.survival_months for r in self.refs], dtype=np.float64)
        self.censorship = np.array([r.patient.censorship for r in self.refs], dtype=np.int8)
        self.cancers = np.array([r.patient.cancer for r in self.refs], dtype=object)
        self.labelled = np.array([r.patient.labelled for r in self.refs], dtype=bool)

    def __len__(self) -> int:
        return len(self.refs)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Cohort:
        return Cohort([self.refs[int(i)] for i in indices])

    def cancer_codes(self) -> list[str]:
        return sorted(set(self.cancers.tolist()))

    def banks(self) -> list[Bank]:
        seen: dict[int, Bank] = {}
        for ref in self.refs:
            seen.setdefault(id(ref.bank), ref.bank)
        return list(seen.values())


def labelled_patients(cohort: Cohort, use: str, note: Callable[[str], None] | None = None) -> Cohort:
    """The patients of ``cohort`` with survival data. Those without are skipped, and ``note`` is told how many,
    per bank, in one line each (``use`` says what they are skipped for, e.g. "training")."""
    if cohort.labelled.all():
        return cohort
    if note is not None:
        for bank in cohort.banks():
            skipped = sum(1 for r in cohort.refs if r.bank is bank and not r.patient.labelled)
            if skipped:
                note(f"{bank.path}: {skipped} patient(s) without survival data skipped for {use} "
                     "(they can be predicted with cmoe-predict)")
    return cohort.subset(np.flatnonzero(cohort.labelled))


def check_compatible(banks: Sequence[Bank]) -> None:
    """Banks pooled in one model must agree on feature dimension and each cancer's genomic features."""
    if not banks:
        return
    first = banks[0]
    names_by_cancer: dict[str, tuple[str, Bank]] = {}
    for bank in banks:
        if bank.feature_dim != first.feature_dim:
            raise InputError(bank.path, f"feature dimension {bank.feature_dim} differs from "
                                        f"{first.path.name}'s {first.feature_dim}")
        for cancer in bank.cancers():
            names = bank.genomic_feature_names(cancer)
            if not names:
                continue
            key = "\x1f".join(names)
            if cancer in names_by_cancer and names_by_cancer[cancer][0] != key:
                other = names_by_cancer[cancer][1]
                raise InputError(bank.path, f"genomic features of {cancer} differ from those in {other.path.name}")
            names_by_cancer.setdefault(cancer, (key, bank))


def open_cohort(paths: Sequence[str | os.PathLike[str]]) -> Cohort:
    """Open banks read-only and pool their patients (bank order, then patient order)."""
    banks = [open_bank(p) for p in paths]
    check_compatible(banks)
    return Cohort([PatientRef(bank, patient) for bank in banks for patient in bank.patients])
