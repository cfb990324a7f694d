"""The files `cmoe-predict` writes about patients (each atomically): predictions, KM curves by risk group.

- ``predictions.csv``: one row per patient: bank, case id, cancer, subtype, whether labelled (and its survival
  when it is), risk (higher = earlier death), risk group, and the survival probability at the end of every
  time bin of the model (`cancermoe.predict.bin_labels`);
- ``km_by_risk_group.csv`` / ``.png`` (labelled patients only): per cancer and risk group the Kaplan-Meier
  curve as its steps (event time in months, survival just after it; a first row at 0 months, survival 1), the
  group's patients and deaths, and the log-rank p-value across the cancer's groups;
- ``summary.json``: the model, how its risk groups were fixed, the c-index per cancer with interval, patients
  and deaths.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cancermoe.files import atomic_path, write_text_atomically
from cancermoe.km_figure import write_km_figure
from cancermoe.predict import KaplanMeier, Prediction, bin_labels
from cancermoe.train import Evaluation


def prediction_table(prediction: Prediction) -> pd.DataFrame:
    refs = prediction.cohort.refs
    labelled = prediction.labelled
    table = pd.DataFrame({
        "bank": [r.bank.path.name for r in refs],
        "case_id": [r.patient.case_id for r in refs],
        "cancer": [r.patient.cancer for r in refs],
        "subtype": [r.patient.subtype for r in refs],
        "labelled": labelled,
        "survival_months": np.where(labelled, prediction.cohort.survival_months, np.nan),
        "censorship": pd.array([int(c) if ok else None for c, ok in zip(prediction.cohort.censorship, labelled,
                                                                          strict=True)], dtype="Int64"),
        "risk": prediction.risk,
        "risk_group": prediction.groups,
    })
    for k, name in enumerate(bin_labels(prediction.edges)):
        table[name] = prediction.survival[:, k]
    return table


def write_predictions(prediction: Prediction, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        prediction_table(prediction).to_csv(tmp, index=False)
    return Path(path)


def km_table(curves: list[KaplanMeier]) -> pd.DataFrame:
    rows = []
    for km in curves:
        for group, (times, survival) in km.curves.items():
            rows.append({"cancer": km.cancer, "risk_group": group, "time_months": 0.0, "survival": 1.0,
                         "patients": km.patients[group], "deaths": km.deaths[group], "logrank_p": km.logrank_p})
            rows += [{"cancer": km.cancer, "risk_group": group, "time_months": float(t), "survival": float(s),
                      "patients": km.patients[group], "deaths": km.deaths[group], "logrank_p": km.logrank_p}
                     for t, s in zip(times, survival, strict=True)]
    return pd.DataFrame(rows, columns=["cancer", "risk_group", "time_months", "survival", "patients", "deaths",
                                       "logrank_p"])


def write_km(curves: list[KaplanMeier], csv_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
    """The curves as CSV and as one panel per cancer (`cancermoe.km_figure`: groups labelled "predicted ... risk"
    with their size, log-rank p in the title, numbers at risk under the curves)."""
    with atomic_path(csv_path) as tmp:
        km_table(curves).to_csv(tmp, index=False)
    write_km_figure([km.panel() for km in curves], png_path)


def cindex_summary(evaluation: Evaluation) -> dict[str, Any]:
    """Per cancer and over all (pairs within a cancer, summed): c-index, 95% interval, patients, deaths."""
    def entry(counts: Any, patients: int, deaths: int) -> dict[str, Any]:
        lower, upper = counts.interval()
        return {"cindex": _finite(counts.cindex), "lower": _finite(lower), "upper": _finite(upper),
                "patients": patients, "deaths": deaths}

    summary = {c: entry(counts, evaluation.patients[c], evaluation.deaths[c])
               for c, counts in evaluation.per_cancer.items()}
    summary["all"] = entry(evaluation.counts, sum(evaluation.patients.values()), sum(evaluation.deaths.values()))
    return summary


def write_summary(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    return write_text_atomically(path, json.dumps(summary, indent=2))


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
