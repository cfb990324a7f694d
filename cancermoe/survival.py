"""Survival analysis pieces: Harrell's c-index with its pair counts.

Conventions: times are in months; ``censorship`` is 1 for a censored patient
(alive at last follow-up) and 0 for an observed death, as in the TCGA tables;
a higher risk means an earlier expected death.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sksurv.metrics import concordance_index_censored


@dataclass(frozen=True)
class PairCounts:
    """Harrell's pair counts. They add up across sites: sum them, then take `cindex`.

    ``tied_time`` pairs (two deaths at the same time) count toward nothing in
    Harrell's c-index; they are kept because scikit-survival reports them.
    """

    concordant: int = 0
    discordant: int = 0
    tied_risk: int = 0
    tied_time: int = 0

    @property
    def comparable(self) -> int:
        return self.concordant + self.discordant + self.tied_risk

    @property
    def cindex(self) -> float:
        """(concordant + tied_risk / 2) / comparable; NaN when no pair is comparable."""
        if self.comparable == 0:
            return math.nan
        return (self.concordant + 0.5 * self.tied_risk) / self.comparable

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(
            self.concordant + other.concordant,
            self.discordant + other.discordant,
            self.tied_risk + other.tied_risk,
            self.tied_time + other.tied_time,
        )


def concordance_counts(risk: np.ndarray, survival_months: np.ndarray, censorship: np.ndarray) -> PairCounts:
    """Harrell's pair counts of predicted ``risk`` against observed survival.

    A pair (i, j) is comparable when patient i died (censorship 0) before j's
    time. It is concordant when risk_i > risk_j. Computed by scikit-survival's
    `concordance_index_censored`; all-censored or empty inputs give zero counts.
    """
    risk = np.asarray(risk, dtype=np.float64)
    time = np.asarray(survival_months, dtype=np.float64)
    event = np.asarray(censorship) == 0
    if risk.shape != time.shape or risk.shape != event.shape:
        raise ValueError(f"risk {risk.shape}, time {time.shape}, censorship {event.shape} differ in shape")
    if not event.any():
        return PairCounts()
    _, concordant, discordant, tied_risk, tied_time = concordance_index_censored(event, time, risk)
    return PairCounts(int(concordant), int(discordant), int(tied_risk), int(tied_time))


def harrell_cindex(risk: np.ndarray, survival_months: np.ndarray, censorship: np.ndarray) -> float:
    """Harrell's c-index of ``risk`` (higher = earlier death); NaN when no pair is comparable."""
    return concordance_counts(risk, survival_months, censorship).cindex
