"""Using a trained model: load a model file, score a bank's patients, risk groups, survival curves, patch scores.

What `cmoe-predict` computes (its files are written by `cancermoe.reports` and `cancermoe.heatmaps`). A model
file is `cmoe-train`'s or `cmoe-server`'s ``model.pt`` / ``best.pt`` (`cancermoe.experiment.final_model_state`):
config, time bins, consolidation plan, weights, genomic standardization and, since this module exists, the
risk-group thresholds (`RiskGroups`) fixed when the model was saved:

- centralized: quantiles of the predicted risk of the training patients, per cancer (`risk_groups_from_risks`);
- federated: quantiles per cancer of the pooled risk histogram of the held-out patients, read from the counts
  the sites send anyway (no patient's risk leaves a site; see ``server.federated_eval``).

Prediction runs the model as evaluation does (`cancermoe.train.SiteTrainer.predict_details`), with the DPS
score caches in a scratch folder: a bank's patients were never scored by this model, so their first selection
is the same neutral one a site's held-out patients get, and ``test_time_dps_passes`` (from the model's config)
gives them the same test-time passes. Nothing is written next to the bank, and nothing leaves the machine.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cancermoe.bank import Bank
from cancermoe.cohort import Cohort
from cancermoe.config import CancerMoEConfig, config_with
from cancermoe.dps import Role
from cancermoe.ensemble import MEMBERS_KEY, survival_of_hazard_logits
from cancermoe.errors import InputError
from cancermoe.experiment import trainer_for_model
from cancermoe.km_figure import KMCurve, KMPanel
from cancermoe.risk_groups import RiskGroups
from cancermoe.train import Evaluation, PatchScores, evaluate_risks, load_checkpoint

MODEL_FILES = ("best.pt", "model.pt")  # in a workdir, in this order of preference (the server's best, else last)
MODEL_KEYS = ("config", "edges", "plan", "model")  # what a model file (an ensemble's: each member) must hold
DEFAULT_PATCH_SIZE_PX = 256  # CLAM's default patch at level 0, when neither the bank nor the coords tell


# --------------------------------------------------------------------------- survival


def survival_per_bin(hazard_logits: np.ndarray) -> np.ndarray:
    """[P, n_bins] probability of being alive at the end of each time bin (`survival_of_hazard_logits`)."""
    return survival_of_hazard_logits(hazard_logits)


def bin_labels(edges: Sequence[float]) -> list[str]:
    """``survival_<k>_<from>-<to>m`` per time bin: the column of S at the end of bin k, in months."""
    def months(value: float) -> str:
        return "inf" if math.isinf(value) else f"{value:.4g}"

    return [f"survival_{k}_{months(lo)}-{months(hi)}m" for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:],
                                                                                          strict=True))]


# --------------------------------------------------------------------------- model files


def resolve_model_file(path: str | os.PathLike[str]) -> Path:
    """The model file that ``path`` names: itself, or in a folder (a server workdir or a `cmoe-train` --out)
    ``best.pt``, else ``model.pt``. A folder of fold models is an error asking for one of them."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such model file or folder")
    if path.is_file():
        return path
    for name in MODEL_FILES:
        if (path / name).is_file():
            return path / name
    folds = sorted(path.glob("fold-*/model.pt"))
    if folds:
        raise InputError(path, f"holds {len(folds)} fold models, not one: give one of them, e.g. {folds[0]}")
    raise InputError(path, f"holds no model file ({' or '.join(MODEL_FILES)})")


def load_model_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A model file's contents, checked: a file that is not one is a one-line error naming it."""
    path = Path(path)
    try:
        state = load_checkpoint(path)
    except Exception as exc:  # torch.load raises many kinds (pickle, zip, EOF) for a file that is not a model
        raise InputError(path, f"not a CancerMoE model file ({type(exc).__name__})") from None
    models = state.get(MEMBERS_KEY, [state]) if isinstance(state, dict) else [None]
    if not isinstance(state, dict) or any(not isinstance(m, dict) or any(k not in m for k in MODEL_KEYS)
                                          for m in models):
        raise InputError(path, "not a CancerMoE model file (no config, time bins and weights)")
    return state


def model_config(state: dict[str, Any], where: str | os.PathLike[str]) -> CancerMoEConfig:
    return config_with(CancerMoEConfig(), state["config"], str(where))


def check_bank_fits(config: CancerMoEConfig, state: dict[str, Any], bank: Bank) -> None:
    """The bank's features and genomics must have the shapes the model was trained on."""
    has_slides = any(p.has_slides for p in bank.patients)
    if has_slides and bank.feature_dim != config.feature_dim:
        raise InputError(bank.path, f"feature dimension {bank.feature_dim}, but the model expects "
                                    f"{config.feature_dim}")
    trained_genes = {c: len(m) for c, m in (state.get("genomic_scaler") or {}).get("mean", {}).items()}
    trained_genes.update((state.get("genomic_layout") or {}).get("genes", {}))
    for cancer in bank.cancers():
        genes = len(bank.genomic_feature_names(cancer))
        if cancer in trained_genes and genes and genes != trained_genes[cancer]:
            raise InputError(bank.path, f"{genes} genomic features of {cancer}, but the model was trained on "
                                        f"{trained_genes[cancer]}")
        if math.ceil(genes / config.genomic_piece) > config.max_genomic_tokens:
            raise InputError(bank.path, f"{genes} genomic features of {cancer}: more than the model's "
                                        f"{config.max_genomic_tokens} genomic tokens hold")


# --------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    """Per patient of ``cohort`` (its order): risk, risk group, survival at the end of each time bin."""

    cohort: Cohort
    risk: np.ndarray  # [P], higher = earlier death
    survival: np.ndarray  # [P, n_bins]
    edges: np.ndarray  # [n_bins + 1] months
    risk_groups: RiskGroups | None
    patches: list[PatchScores | None] | None = None
    groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.groups:
            self.groups = [self.risk_groups.group(c, r) if self.risk_groups else ""
                           for c, r in zip(self.cohort.cancers, self.risk, strict=True)]

    @property
    def labelled(self) -> np.ndarray:
        return self.cohort.labelled

    def evaluation(self) -> Evaluation | None:
        """Pair counts per cancer over the labelled patients (pairs within a cancer, as everywhere); None when
        no patient is labelled."""
        at = np.flatnonzero(self.labelled)
        if at.size == 0:
            return None
        return evaluate_risks(self.cohort.subset(at), self.risk[at])


def predict_cohort(state: dict[str, Any], cohort: Cohort, *, device: torch.device | str = "cpu",
                   patches: bool = False, where: str | os.PathLike[str] = "model") -> Prediction:
    """Score every patient of ``cohort`` with the model of ``state`` (a loaded model file), as evaluation does;
    with ``patches`` also the tokens each patient's final pass looked at and their scores."""
    config = model_config(state, where)
    for bank in cohort.banks():
        check_bank_fits(config, state, bank)
    with tempfile.TemporaryDirectory(prefix="cmoe-predict-") as scratch:
        # No training patients: every bank is scored from scratch caches that start empty and are never saved.
        trainer = trainer_for_model(state, Cohort([]), Path(scratch), device=device, where=str(where))
        details = trainer.predict_details(cohort, patches=patches)
    return Prediction(cohort, details.risk, survival_per_bin(details.hazard_logits), np.asarray(state["edges"]),
                      RiskGroups.from_dict(state.get("risk_groups")), details.patches)


# --------------------------------------------------------------------------- Kaplan-Meier by risk group


@dataclass(frozen=True)
class KaplanMeier:
    """One cancer's product-limit curves per risk group (labelled patients only) and their log-rank test."""

    cancer: str
    groups: dict[str, KMCurve]  # group -> its curve, size, deaths and numbers at risk
    logrank_p: float

    @property
    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """group -> (event times in months, survival just after each)."""
        return {group: (curve.times, curve.survival) for group, curve in self.groups.items()}

    @property
    def patients(self) -> dict[str, int]:
        return {group: curve.n for group, curve in self.groups.items()}

    @property
    def deaths(self) -> dict[str, int]:
        return {group: curve.deaths for group, curve in self.groups.items()}

    def panel(self) -> KMPanel:
        return KMPanel(self.cancer, list(self.groups.values()), self.logrank_p)


def km_by_risk_group(prediction: Prediction) -> list[KaplanMeier]:
    """Per cancer, the Kaplan-Meier curve of each risk group of its labelled patients and the log-rank p-value
    across the groups (NaN with fewer than two groups)."""
    from sksurv.compare import compare_survival

    groups = np.asarray(prediction.groups, dtype=object)
    result = []
    for cancer in prediction.cohort.cancer_codes():
        at = (prediction.cohort.cancers == cancer) & prediction.labelled & (groups != "")
        if not at.any():
            continue
        event = prediction.cohort.censorship[at] == 0
        time = prediction.cohort.survival_months[at]
        labels = groups[at]
        curves = {}
        for name in (prediction.risk_groups.names if prediction.risk_groups else ()):
            members = labels == name
            if members.any():
                curves[name] = KMCurve.from_patients(name, time[members], event[members])
        p_value = math.nan
        if len(curves) > 1 and event.any():
            outcome = np.array(list(zip(event, time, strict=True)), dtype=[("event", bool), ("time", float)])
            _, p_value = compare_survival(outcome, labels)
        result.append(KaplanMeier(str(cancer), curves, float(p_value)))
    return result


# --------------------------------------------------------------------------- patch scores for heatmaps


ROLE_NAMES = {Role.KEY: "key", Role.NEIGHBOUR: "neighbour", Role.UNSEEN: "unseen", Role.WHOLE: "whole",
              Role.RANDOM: "random"}


@dataclass
class SlidePatches:
    """The patches of one slide that a prediction looked at: level-0 coords (top-left), score, DPS role."""

    slide_id: str
    case_id: str
    bank: Bank
    coords: np.ndarray  # int [n, 2]
    score: np.ndarray  # float [n]
    role: list[str]
    patch_size: int

    @property
    def is_key(self) -> np.ndarray:
        return np.array([r == "key" for r in self.role], dtype=bool)


def patch_size_px(bank: Bank, coords: np.ndarray) -> int:
    """The side of a patch at level 0: the bank's ``patch_size`` attribute, else the grid step of the slide's
    coords (the smallest gap between distinct x or y values), else CLAM's 256."""
    if "patch_size" in bank.attrs:
        return int(bank.attrs["patch_size"])
    steps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)] if len(coords) else []
    positive = np.concatenate(steps)[np.concatenate(steps) > 0] if steps else np.zeros(0)
    return int(positive.min()) if positive.size else DEFAULT_PATCH_SIZE_PX


def slide_patches(prediction: Prediction, patch_size: int | None = None) -> list[SlidePatches]:
    """Per slide of every patient with slides, the patches its final pass looked at (`predict_cohort` with
    ``patches``). ``patch_size`` overrides `patch_size_px`."""
    if prediction.patches is None:
        raise ValueError("slide_patches: the prediction was made without patches=True")
    result = []
    for ref, scored in zip(prediction.cohort.refs, prediction.patches, strict=True):
        if scored is None:
            continue
        for i, slide_id in enumerate(scored.slide_ids):
            at = scored.token_slide == i
            all_coords = ref.bank.read_coords(slide_id)
            result.append(SlidePatches(
                slide_id, scored.case_id, ref.bank, all_coords[scored.token_row[at]].astype(np.int64),
                scored.score[at].astype(np.float64), [ROLE_NAMES[Role(r)] for r in scored.token_role[at]],
                patch_size or patch_size_px(ref.bank, all_coords)))
    return result
