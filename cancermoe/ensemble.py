"""Seed ensembles: the same recipe trained from several seeds on the same patients, predictions averaged.

Why: one model of 20 epochs on ~300 patients lands far from where another seed's lands. On the published
TCGA-KIRC folds the held-out c-index of one fold moved between 0.50 and 0.67 with the training seed alone, and
between consecutive epochs of one run by as much (README, Quality). Averaging members removes much of that
spread; it costs ``ensemble_size`` trainings.

The ensemble is the equal mixture of its members: a patient's survival curve is the mean of the members' curves
(all members share the time bins: they train on the same patients), and the risk is derived from that curve as
for one model, ``-sum_t S(t)`` (`cancermoe.survival.risk_from_hazard_logits`), which is the mean of the
members' risks (`mean_risk`). The curve is carried as the hazard logits of the mean curve, so everything
downstream (c-index, risk groups, `cancermoe.predict.survival_per_bin`) treats an ensemble as one model.
Patch scores (heatmaps) are the first member's: members select different tokens, so their scores do not
average patch by patch.

A model file of an ensemble (`ensemble_state`) holds every member's model file (`final_model_state`) under
``members``, and at the top the ensemble's config, time bins, genomic standardization and layout (shared by the
members); the model file adds the risk-group thresholds of the ensemble's risks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cancermoe.cohort import Cohort
from cancermoe.config import CancerMoEConfig
from cancermoe.genomics import GenomicScaler
from cancermoe.train import Evaluation, PredictionDetails, SiteTrainer, evaluate_risks

MEMBERS_KEY = "members"
SURVIVAL_FLOOR = 1e-7  # keeps the hazard logits of an averaged curve finite where it reaches 0 or 1


def member_seeds(seed: int, size: int) -> list[int]:
    """The training seeds of an ensemble of ``size`` members whose config says ``seed``."""
    return [seed + k for k in range(size)]


def is_ensemble(state: dict[str, Any]) -> bool:
    """Whether a loaded model file holds an ensemble (`ensemble_state`) rather than one model."""
    return MEMBERS_KEY in state


def ensemble_state(config: dict[str, Any], members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A model file's contents for an ensemble (without the risk groups, which the caller adds)."""
    first = members[0]
    if any(member["edges"] != first["edges"] for member in members):
        raise ValueError("ensemble members must share their time bins (train them on the same patients)")
    return {"config": config, "edges": first["edges"], "genomic_scaler": first.get("genomic_scaler"),
            "genomic_layout": first.get("genomic_layout"), MEMBERS_KEY: list(members)}


def hazard_logits_of_survival(survival: np.ndarray) -> np.ndarray:
    """[P, n_bins] hazard logits whose survival curve, ``prod (1 - sigmoid(logit))``, is ``survival``."""
    survival = np.clip(np.asarray(survival, dtype=np.float64), SURVIVAL_FLOOR, 1.0)
    before = np.concatenate([np.ones((len(survival), 1)), survival[:, :-1]], axis=1)
    hazard = np.clip(1.0 - survival / before, SURVIVAL_FLOOR, 1.0 - SURVIVAL_FLOOR)
    return np.log(hazard) - np.log1p(-hazard)


def survival_of_hazard_logits(logits: np.ndarray) -> np.ndarray:
    """[P, n_bins] probability of being alive at the end of each time bin, ``S(t) = prod_{s <= t} (1 - h_s)`` with
    ``h = sigmoid(logit)`` (the model's discrete-time hazards; `cancermoe.survival.nll_survival_loss`), summed in
    log space: log(1 - sigmoid(x)) = -log(1 + e^x), stable for large logits."""
    return np.exp(np.cumsum(-np.logaddexp(0.0, np.asarray(logits, dtype=np.float64)), axis=-1))


def mean_risk(evaluations: Sequence[Evaluation | PredictionDetails]) -> np.ndarray:
    """[P] the ensemble's risk from its members' risks of the same patients: their mean, which is the risk of the
    mean survival curve (-sum_t of a mean is the mean of -sum_t)."""
    return np.mean([part.risk for part in evaluations], axis=0)


class EnsemblePredictor:
    """Predicts like a `SiteTrainer` (``predict``, ``evaluate``, ``predict_details``) by averaging its members."""

    def __init__(self, members: Sequence[SiteTrainer]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)

    @property
    def config(self) -> CancerMoEConfig:
        return self.members[0].config

    @property
    def genomic_scaler(self) -> GenomicScaler:
        return self.members[0].genomic_scaler  # shared: the members standardize with the same training patients

    def predict_details(self, cohort: Cohort, *, patches: bool = False) -> PredictionDetails:
        parts = [member.predict_details(cohort, patches=patches and k == 0) for k, member in enumerate(self.members)]
        survival = np.mean([survival_of_hazard_logits(part.hazard_logits) for part in parts], axis=0)
        return PredictionDetails(mean_risk(parts), hazard_logits_of_survival(survival), parts[0].patches)

    def predict(self, cohort: Cohort) -> np.ndarray:
        return self.predict_details(cohort).risk

    def evaluate(self, cohort: Cohort) -> Evaluation:
        return evaluate_risks(cohort, self.predict(cohort))
