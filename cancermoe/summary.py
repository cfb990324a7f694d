"""A bank's summary, as `cmoe-bank inspect` shows it."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from cancermoe.bank import Bank
from cancermoe.survival import harrell_cindex


def summarize_bank(bank: Bank) -> dict[str, Any]:
    """Counts a user checks after an import: patients, slides, patches, cancers, events, genomics."""
    cancers = Counter(p.cancer for p in bank.patients)
    slide_ids = bank.slide_ids()
    summary: dict[str, Any] = {
        "path": str(bank.path),
        "schema_version": bank.schema_version,
        "source": bank.source,
        "feature_dim": bank.feature_dim,
        "feature_dtype": bank.feature_dtype,
        "patients": len(bank.patients),
        "slides": len(slide_ids),
        "patches": sum(bank.n_patches(s) for s in slide_ids),
        "cancers": dict(sorted(cancers.items())),
        "events": sum(p.event for p in bank.patients),
        "unlabelled": sum(not p.labelled for p in bank.patients),
        "patients_with_slides": sum(p.has_slides for p in bank.patients),
        "patients_with_genomics": sum(p.has_genomics for p in bank.patients),
        "genomic_features": {c: len(bank.genomic_feature_names(c)) for c in sorted(cancers)},
    }
    for key in ("site", "tool", "created"):
        if key in bank.attrs:
            summary[key] = bank.attrs[key]
    if bank.oracle_risk is not None and summary["unlabelled"] == 0:
        cindex = harrell_cindex(bank.oracle_risk, bank.survival_months(), bank.censorship())
        summary["oracle_cindex"] = None if math.isnan(cindex) else round(cindex, 4)
    return summary
