"""What leaves a site, and what the coordinator sends: the message contents, without Flower.

A site sends three kinds of reply, all aggregate (no per-patient value):

- `TimeHistogram` (round 0): counts of observed deaths per survival-time bin of a
  server grid, so the coordinator can place the survival time bins; with
  ``standardize_genomics``, also per cancer the number of training patients
  with genomics and the per-feature sum and sum of squares of their values
  (`cancermoe.genomics.GenomicMoments`), only for a cancer with at least
  `MIN_PATIENTS_FOR_MOMENTS` such patients at the site, so the coordinator can
  send back the pooled standardization.
- `TrainReport` (each round): model weights (an ArrayRecord, beside this), the
  number of patients trained on and of their deaths, the loss, the local
  training seconds and the whole message's seconds, Harrell pair counts of the
  training predictions, tokens routed per (modality, expert), real genomic
  tokens embedded per piece position (each cancer has positions of its own:
  the coordinator averages a position's rows over the sites that trained
  them), and the ACS head statistics (sums over patients).
- `EvalReport` (each round, inside the next round's training reply as its
  ``evaluation`` record when the train message asks for it with ``evaluate`` = 1,
  and for the last round in an evaluate reply of its own): per cancer, Harrell pair counts with the three
  sums over patients their standard error needs (`cancermoe.survival.PairCounts`),
  and a risk x time x event histogram on the server's grid (the coordinator
  derives the cross-site c-index and the Kaplan-Meier counts of high and low
  predicted risk from the summed histograms). With ``validation_fraction``,
  also per cancer the pair counts and sums of the global model on the site's
  validation patients (a share of its training patients), from which the
  coordinator chooses the best round.

Every metric key a reply may carry matches one of `ALLOWED_METRIC_KEYS`; the
privacy test records every message a site sends and checks exactly that.
Metric values are ints, floats or flat lists of them (Flower's MetricRecord).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from cancermoe.genomics import MIN_PATIENTS_FOR_MOMENTS, GenomicMoments
from cancermoe.survival import PairCounts

EVALUATE_FLAG = "evaluate"  # train message config: 1 = evaluate the weights it carries, then train from them
EVALUATION_RECORD = "evaluation"  # the MetricRecord of a training reply that holds that evaluation (an EvalReport)

ALLOWED_METRIC_KEYS = (
    r"num-examples",
    r"time-hist",
    r"train-loss",
    r"train-seconds",
    r"eval-seconds",
    r"work-seconds",
    r"train-events",
    r"train-pairs",
    r"expert-tokens",
    r"expert-tokens-shape",
    r"genomic-tokens",
    r"head-importance",
    r"head-similarity",
    r"head-samples",
    r"head-shape",
    r"pairs/[A-Za-z0-9_.-]+",
    r"pair-sums/[A-Za-z0-9_.-]+",
    r"hist/[A-Za-z0-9_.-]+",
    r"val-pairs/[A-Za-z0-9_.-]+",
    r"val-pair-sums/[A-Za-z0-9_.-]+",
    r"genomic-patients/[A-Za-z0-9_.-]+",
    r"genomic-sum/[A-Za-z0-9_.-]+",
    r"genomic-sum-squares/[A-Za-z0-9_.-]+",
)
ALLOWED_CONFIG_KEYS = ("site", "version")


def is_allowed_metric_key(key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in ALLOWED_METRIC_KEYS)


def _pairs(counts: PairCounts) -> list[int]:
    return [counts.concordant, counts.discordant, counts.tied_risk, counts.tied_time]


def _pair_sums(counts: PairCounts) -> list[float]:
    return [counts.sum_w2, counts.sum_wb, counts.sum_b2]


def _pair_counts(values: list[int] | np.ndarray, sums: list[float] | np.ndarray = (0.0, 0.0, 0.0)) -> PairCounts:
    c, d, tr, tt = (int(v) for v in values)
    w2, wb, b2 = (float(v) for v in sums)
    return PairCounts(c, d, tr, tt, w2, wb, b2)


def moments_to_metrics(moments: GenomicMoments) -> dict[str, int | list[float]]:
    """The genomic moments as metrics; `ValueError` for a cancer of fewer than `MIN_PATIENTS_FOR_MOMENTS`
    patients (their sums would come close to describing one patient, so they may not leave the site)."""
    small = sorted(c for c, n in moments.patients.items() if n < MIN_PATIENTS_FOR_MOMENTS)
    if small:
        raise ValueError(f"genomic moments of {', '.join(small)} rest on fewer than {MIN_PATIENTS_FOR_MOMENTS} "
                         "patients and may not leave the site")
    out: dict[str, int | list[float]] = {}
    for cancer, n in moments.patients.items():
        out[f"genomic-patients/{cancer}"] = int(n)
        out[f"genomic-sum/{cancer}"] = [float(v) for v in moments.total[cancer]]
        out[f"genomic-sum-squares/{cancer}"] = [float(v) for v in moments.total_squares[cancer]]
    return out


def moments_from_metrics(m: dict) -> GenomicMoments:
    moments = GenomicMoments()
    for key in m:
        if key.startswith("genomic-patients/"):
            cancer = key.split("/", 1)[1]
            total = np.asarray(m[f"genomic-sum/{cancer}"], dtype=np.float64)
            squares = np.asarray(m[f"genomic-sum-squares/{cancer}"], dtype=np.float64)
            if total.shape != squares.shape:
                raise ValueError(f"{cancer}: {total.size} sums but {squares.size} sums of squares")
            moments.patients[cancer] = int(m[key])
            moments.total[cancer] = total
            moments.total_squares[cancer] = squares
    return moments


@dataclass
class TimeHistogram:
    """Round 0: deaths per survival-time bin (the server's grid) and how many patients the site trains on;
    with standardized genomics, the moments of those patients' genomic values (large-enough cancers only)."""

    deaths: np.ndarray  # int64 [bins]
    patients: int
    genomics: GenomicMoments = field(default_factory=GenomicMoments)

    def to_metrics(self) -> dict[str, int | list[int] | list[float]]:
        return {"time-hist": [int(v) for v in self.deaths], "num-examples": int(self.patients),
                **moments_to_metrics(self.genomics)}

    @classmethod
    def from_metrics(cls, m: dict) -> TimeHistogram:
        return cls(np.asarray(m["time-hist"], dtype=np.int64), int(m["num-examples"]), moments_from_metrics(m))


@dataclass
class TrainReport:
    patients: int
    loss: float
    pairs: PairCounts
    expert_tokens: np.ndarray  # [modalities, experts]
    head_importance: np.ndarray  # [layers, heads] sums
    head_similarity: np.ndarray  # [layers, heads, heads] sums
    head_samples: int
    seconds: float = 0.0  # wall time of the local training
    work_seconds: float = 0.0  # wall time of the whole message at the site (evaluation, training, their setup)
    events: int = 0  # deaths among the patients trained on (a count, like patients)
    # [max_genomic_tokens]: real genomic tokens embedded per piece position this round; empty = not reported
    genomic_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_metrics(self) -> dict[str, int | float | list[int] | list[float]]:
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": int(self.patients),
            "train-loss": float(self.loss),
            "train-seconds": float(self.seconds),
            "work-seconds": float(self.work_seconds),
            "train-events": int(self.events),
            "train-pairs": _pairs(self.pairs),
            "expert-tokens": [float(v) for v in self.expert_tokens.ravel()],
            "expert-tokens-shape": [int(v) for v in self.expert_tokens.shape],
            "head-importance": [float(v) for v in self.head_importance.ravel()],
            "head-similarity": [float(v) for v in self.head_similarity.ravel()],
            "head-samples": int(self.head_samples),
            "head-shape": [int(v) for v in self.head_importance.shape],
        }
        if self.genomic_tokens.size:  # omitted when not counted (older sites send no such key either)
            metrics["genomic-tokens"] = [float(v) for v in self.genomic_tokens.ravel()]
        return metrics

    @classmethod
    def from_metrics(cls, m: dict) -> TrainReport:
        layers, heads = (int(v) for v in m["head-shape"])
        return cls(
            patients=int(m["num-examples"]),
            loss=float(m["train-loss"]),
            pairs=_pair_counts(m["train-pairs"]),
            expert_tokens=np.asarray(m["expert-tokens"], dtype=np.float64).reshape(
                [int(v) for v in m["expert-tokens-shape"]]),
            head_importance=np.asarray(m["head-importance"], dtype=np.float64).reshape(layers, heads),
            head_similarity=np.asarray(m["head-similarity"], dtype=np.float64).reshape(layers, heads, heads),
            head_samples=int(m["head-samples"]),
            seconds=float(m.get("train-seconds", 0.0)),
            work_seconds=float(m.get("work-seconds", 0.0)),
            events=int(m.get("train-events", 0)),
            genomic_tokens=np.asarray(m.get("genomic-tokens", []), dtype=np.float64),
        )


@dataclass
class CancerEval:
    pairs: PairCounts
    histogram: np.ndarray  # int64 [risk bins, time bins, 2 (censored, death)]


@dataclass
class EvalReport:
    """The global model on a site's held-out patients (``cancers``) and, with a validation share, on its
    validation patients (``validation``: per cancer pair counts, for choosing the round)."""

    patients: int
    cancers: dict[str, CancerEval] = field(default_factory=dict)
    validation: dict[str, PairCounts] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the evaluation at the site

    def to_metrics(self) -> dict[str, int | float | list[int] | list[float]]:
        out: dict[str, int | float | list[int] | list[float]] = {"num-examples": int(self.patients),
                                                                 "eval-seconds": float(self.seconds)}
        for cancer, ev in self.cancers.items():
            out[f"pairs/{cancer}"] = _pairs(ev.pairs)
            out[f"pair-sums/{cancer}"] = _pair_sums(ev.pairs)
            out[f"hist/{cancer}"] = [int(v) for v in ev.histogram.ravel()]
        for cancer, counts in self.validation.items():
            out[f"val-pairs/{cancer}"] = _pairs(counts)
            out[f"val-pair-sums/{cancer}"] = _pair_sums(counts)
        return out

    @classmethod
    def from_metrics(cls, m: dict, hist_shape: tuple[int, int, int]) -> EvalReport:
        cancers = {}
        for key in m:
            if not key.startswith("pairs/"):
                continue
            cancer = key.split("/", 1)[1]
            cancers[cancer] = CancerEval(
                pairs=_pair_counts(m[key], m[f"pair-sums/{cancer}"]),
                histogram=np.asarray(m[f"hist/{cancer}"], dtype=np.int64).reshape(hist_shape),
            )
        validation = {key.split("/", 1)[1]: _pair_counts(m[key], m[f"val-pair-sums/{key.split('/', 1)[1]}"])
                      for key in m if key.startswith("val-pairs/")}
        return cls(int(m["num-examples"]), cancers, validation, float(m.get("eval-seconds", 0.0)))
