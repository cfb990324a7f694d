"""The training recipe: what the paper leaves to us about how CancerMoE is trained.

The paper states batch 32 and learning rate 1e-3 and nothing else about
optimisation (see ``../shared/notes/survival-recipes.md``). Our choices, each a
config key (`cancermoe.config.CancerMoEConfig`), are made here as plain
functions:

- the budget is counted in optimizer steps (`epochs_for_steps`): 200 patients
  at batch 32 are 7 steps an epoch, so "10 epochs" is 70 steps, too few to
  learn anything; ``steps`` sets the budget and the epochs follow;
- the learning rate warms up linearly, then decays along a cosine
  (`learning_rate_factor`); in a federation over the whole job
  (`federated_schedule`);
- patients are drawn balanced over (time bin x censorship) groups, as PORPOISE
  does (`balanced_order`), so the few early deaths are not drowned out;
- the model is chosen on an inner validation split of the training patients
  (`validation_split`), by its validation c-index, with early stopping
  (`EarlyStopping`). The patients a reported c-index is scored on never take
  part in that choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def steps_per_epoch(patients: int, batch_size: int) -> int:
    """Optimizer steps of one epoch: one per batch of ``batch_size`` patients, the last batch possibly smaller."""
    return max(1, math.ceil(patients / batch_size))


def epochs_for_steps(steps: int, patients: int, batch_size: int) -> int:
    """Epochs that give at least ``steps`` optimizer steps (one step per batch of ``batch_size`` patients)."""
    return max(1, math.ceil(steps / steps_per_epoch(patients, batch_size)))


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, final_ratio: float) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps, then a
    cosine from 1 down to ``final_ratio`` at ``total_steps``; past the end it stays there.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def federated_schedule(server_round: int, total_rounds: int, local_epochs: int, patients: int,
                       batch_size: int) -> tuple[int, int]:
    """Where one site's learning-rate schedule stands when it starts round ``server_round`` (1-based) of a
    federated job of ``total_rounds``: (steps taken before this round, steps of the whole job), counting this
    site's steps (``local_epochs`` x one per batch of its ``patients``) in every round. Warm-up and decay then
    span the job, as they span a centralized run, instead of starting again each round."""
    per_round = local_epochs * steps_per_epoch(patients, batch_size)
    return (server_round - 1) * per_round, total_rounds * per_round


def balanced_order(time_bin: np.ndarray, censorship: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An epoch's patient order, drawn with replacement so each (time bin, censorship) group is equally likely.

    PORPOISE's class-balanced sampler: patient i is drawn with probability proportional to
    1 / (size of its group). Returns indices into the arrays, as many as there are patients.
    """
    time_bin = np.asarray(time_bin)
    group = time_bin * 2 + np.asarray(censorship).astype(np.int64)
    _, inverse, sizes = np.unique(group, return_inverse=True, return_counts=True)
    weights = 1.0 / sizes[inverse]
    return rng.choice(len(group), size=len(group), replace=True, p=weights / weights.sum())


def validation_split(cancers: np.ndarray, censorship: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices: about ``fraction`` of each (cancer, event) group held for model selection.

    Every group with at least two patients keeps at least one patient on each side, so a
    small cancer is both learned and validated. Seeded: the same split every call.
    """
    rng = np.random.default_rng(seed)
    validation = []
    for cancer in sorted(set(np.asarray(cancers).tolist())):
        for event in (True, False):
            members = np.flatnonzero((cancers == cancer) & ((np.asarray(censorship) == 0) == event))
            if members.size < 2:
                continue
            take = min(members.size - 1, max(1, round(fraction * members.size)))
            validation.extend(rng.permutation(members)[:take].tolist())
    held = np.zeros(len(cancers), dtype=bool)
    held[validation] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


@dataclass
class EarlyStopping:
    """Keeps the best validation score seen and says when ``patience`` evaluations brought no improvement.

    Scores are c-indices (higher is better); NaN (no comparable validation pair) never improves.
    ``min_delta``: an improvement must exceed it.
    """

    patience: int
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int = 0
    waited: int = 0

    def improved(self, score: float, epoch: int) -> bool:
        """Record ``score`` of ``epoch``; True when it is the best so far (the caller keeps that model)."""
        if not math.isnan(score) and score > self.best + self.min_delta:
            self.best, self.best_epoch, self.waited = score, epoch, 0
            return True
        self.waited += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience
