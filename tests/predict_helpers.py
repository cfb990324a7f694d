"""Test support for prediction: copies of a bank, whole or some patients, with or without their survival data."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cancermoe.bank import UNLABELLED, BankWriter, open_bank


def copy_bank(source: Path, target: Path, *, case_ids: Iterable[str] | None = None,
              unlabelled: bool = False) -> Path:
    """``source``'s patients (those of ``case_ids``, in bank order) with their slides (same rows, same order) and
    genomics; ``unlabelled`` drops their survival data, as a bank of new patients has none."""
    keep = None if case_ids is None else set(case_ids)
    with open_bank(source) as bank:
        patients = [p for p in bank.patients if keep is None or p.case_id in keep]
        with BankWriter(target, feature_dim=bank.feature_dim, source="copy",
                        feature_dtype=bank.feature_dtype) as writer:
            for cancer in sorted({p.cancer for p in patients}):
                if bank.genomic_feature_names(cancer):
                    writer.set_genomic_features(cancer, bank.genomic_feature_names(cancer))
            for patient in patients:
                for slide_id in patient.slide_ids:
                    rows = np.arange(bank.n_patches(slide_id))
                    writer.add_slide(slide_id, bank.read_features(slide_id, rows), bank.read_coords(slide_id))
                months, censorship = ((np.nan, UNLABELLED) if unlabelled
                                      else (patient.survival_months, patient.censorship))
                writer.add_patient(patient.case_id, patient.cancer, months, censorship, slide_ids=patient.slide_ids,
                                   genomics=bank.genomics(patient), subtype=patient.subtype)
    return target
