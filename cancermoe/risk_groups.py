"""Risk groups: per-cancer thresholds on predicted risk, fixed when a model is saved and stored with it.

A model file carries ``risk_groups`` (`RiskGroups.to_dict`): per cancer the `RISK_GROUP_QUANTILES` of a reference
set of predicted risks, and in words whose risks they are. `cmoe-train` takes its training patients' risks
(`risk_groups_from_risks`); the federated server takes the pooled risk histogram of the sites' held-out patients
(the per-patient risks never leave a site). `cmoe-predict` then puts each patient into a group by those thresholds,
so a patient's group does not depend on who else is predicted with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Tertiles: three groups, as balanced as the reference risks allow.
RISK_GROUP_QUANTILES = (1 / 3, 2 / 3)
GROUP_NAMES = {2: ("low", "high"), 3: ("low", "intermediate", "high")}


def group_names(n_groups: int) -> tuple[str, ...]:
    return GROUP_NAMES.get(n_groups, tuple(f"group {k + 1}" for k in range(n_groups)))


@dataclass(frozen=True)
class RiskGroups:
    """Per cancer, increasing risk thresholds cutting patients into groups: group k holds the risks in
    ``[thresholds[k - 1], thresholds[k])`` (high risk is ``risk >= last threshold``, as the server's KM split).

    ``source`` says, in words, whose risks the thresholds are quantiles of (stored with the model).
    """

    thresholds: dict[str, list[float]]
    quantiles: tuple[float, ...] = RISK_GROUP_QUANTILES
    source: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return group_names(len(self.quantiles) + 1)

    def group(self, cancer: str, risk: float) -> str:
        """The group's name, or "" for a cancer the model has no thresholds for."""
        if cancer not in self.thresholds:
            return ""
        return self.names[int(np.searchsorted(self.thresholds[cancer], risk, side="right"))]

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": {c: [float(t) for t in v] for c, v in self.thresholds.items()},
                "quantiles": list(self.quantiles), "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RiskGroups | None:
        if not data:
            return None
        return cls({c: [float(t) for t in v] for c, v in data["thresholds"].items()},
                   tuple(float(q) for q in data["quantiles"]), str(data.get("source", "")))


def risk_groups_from_risks(risk: np.ndarray, cancers: np.ndarray, source: str,
                           quantiles: Sequence[float] = RISK_GROUP_QUANTILES) -> RiskGroups:
    """Thresholds at the ``quantiles`` of ``risk`` per cancer (a cancer of fewer patients than groups gets none)."""
    risk, cancers = np.asarray(risk, dtype=np.float64), np.asarray(cancers, dtype=object)
    thresholds = {}
    for cancer in sorted(set(cancers.tolist())):
        values = risk[cancers == cancer]
        if values.size > len(quantiles):
            thresholds[str(cancer)] = np.quantile(values, quantiles).tolist()
    return RiskGroups(thresholds, tuple(quantiles), source)


