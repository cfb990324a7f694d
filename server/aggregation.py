"""Combining the sites' model updates into the next global model (pure numpy: no Flower, no MLflow).

Four weighting rules (DESIGN.md, "Federation"):

- experts: each expert e of the last block's SMoE is averaged with weights
  n_ke = tokens site k routed to e this round (summed over modalities; with
  ``expert_modalities``, over those modalities only: ``load-aware-cls`` counts
  the CLS tokens alone, the only tokens whose last-block output reaches the
  survival head, so the only ones that trained the experts). An
  expert no site routed any token to keeps the previous global weights: no
  site trained it, so averaging untouched copies would only add noise (and,
  with weight decay, shrink it).
- attention heads: head h of layer l (rows h*d_h:(h+1)*d_h of query/key/value
  weight and bias, columns h*d_h:(h+1)*d_h of the output projection) is
  averaged with weights = each site's summed head importance for h this
  round. The importance is a SUM over the site's samples, so a site's weight
  grows with both how much it used the head and how many patients it has. A
  head no site reports any importance for (all zeros, e.g. rounds where
  importance is not collected) falls back to patient weights.
- genomic rows: row t of the genomic token embedding (the per-piece map and
  the position embedding) is averaged with weights = genomic tokens site k
  embedded at position t this round. Each cancer has positions of its own
  (`cancermoe.genomics.GenomicLayout`), so a site without that cancer's
  patients did not train those rows: by patients, its untouched copy would
  dilute the step of the sites that did (and its optimizer's lasso steps,
  which Adam scales to full learning-rate steps on a zero data gradient,
  would shrink them). A row no site fed keeps the previous global weights.
  Sites that report no counts put the rows back on patient weights.
- everything else (the WSI embedding, norms, dense MLPs, router, noise router, the
  SMoE output bias, the attention output bias, the survival head): weighted
  by the number of patients the site trained on (FedAvg).

After ACS consolidation the head count H is the number of clusters: every
site applies the same plan, so shapes stay aligned; pass that H as ``n_heads``.
Averages are computed in float64 and returned in the dtype the sites sent.

The server first checks every reply with `validate_update` and `norm_outliers`
(server.admission) and leaves out (and logs) the ones that fail.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cancermoe.acs import HeadStats

# ---------------------------------------------------------------------------------------------------------------------
# What a site sends


@dataclass
class SiteUpdate:
    """One site's reply to a training round. Everything here is model weights or aggregate counts.

    weights: the site's model state after local training (name -> array, the model's dtype, float32);
    n_patients: patients trained on this round (>= 1);
    expert_tokens: [n_modalities, n_experts] float64, real tokens routed to each expert this round
        (`CancerMoE.routing_counts`); a token sent to k experts counts k times;
    head_importance: per encoder layer an [H] float64 array, this round's summed head importance
        |<A_h, dL/dA_h>| (`HeadStats.importance_sum`); all zeros, or an empty list, when not collected;
    genomic_tokens: [max_genomic_tokens] float64, real genomic tokens embedded per piece position this round
        (`CancerMoE.genomic_token_counts`); empty when not reported.
    """

    site: str
    weights: dict[str, np.ndarray]
    n_patients: int
    expert_tokens: np.ndarray
    head_importance: list[np.ndarray]
    genomic_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))


# ---------------------------------------------------------------------------------------------------------------------
# Which rule applies to which parameter

EXPERT = "expert"  # index = expert e: averaged by tokens routed to e
HEAD_ROWS = "head_rows"  # index = layer l: rows h*d_h:(h+1)*d_h per head h, averaged by head importance
HEAD_COLUMNS = "head_columns"  # index = layer l: columns h*d_h:(h+1)*d_h per head h, averaged by head importance
GENOMIC_ROWS = "genomic_rows"  # index = None: row t averaged by the genomic tokens sites embedded at position t
BY_PATIENTS = "by_patients"  # index = None: averaged by patients


@dataclass(frozen=True)
class ParameterRole:
    """How one parameter is averaged: ``kind`` is one of the constants above, ``index`` the expert or layer."""

    kind: str
    index: int | None = None


_EXPERT_NAME = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.(\d+)\.")
_HEAD_ROWS_NAME = re.compile(r"^blocks\.(\d+)\.attn\.(query|key|value)\.(weight|bias)$")
_HEAD_COLUMNS_NAME = re.compile(r"^blocks\.(\d+)\.attn\.proj\.weight$")
GENOMIC_POSITIONS = "genomic_embed.position.weight"  # [max_genomic_tokens, d]: one row per piece position
GENOMIC_ROW_NAMES = ("genomic_embed.weight", GENOMIC_POSITIONS)  # [max_genomic_tokens, ...]


def parameter_groups(names: Iterable[str], n_layers: int, n_experts: int) -> dict[str, ParameterRole]:
    """The `ParameterRole` of every state-dict name of `cancermoe.model.CancerMoE`.

    Naming rules (the model's module names):

    - ``blocks.{n_layers-1}.mlp.experts.{e}.*`` -> (EXPERT, e); experts exist in the last block only;
    - ``blocks.{l}.attn.{query,key,value}.{weight,bias}`` -> (HEAD_ROWS, l);
    - ``blocks.{l}.attn.proj.weight`` -> (HEAD_COLUMNS, l);
    - ``genomic_embed.weight`` (the per-piece map) and ``genomic_embed.position.weight`` -> GENOMIC_ROWS
      (a shared genomic map, ``genomic_embed.linear.*``, serves every position: by patients);
    - anything else -> (BY_PATIENTS, None), ``blocks.{l}.attn.proj.bias`` included: it is added
      once after the heads are summed, so it belongs to no head.

    A model with a dense last MLP (``smoe = false``) has no expert parameters: everything but
    attention then goes by patients. Raises ValueError for names that do not fit a model of
    ``n_layers`` blocks and ``n_experts`` experts (an expert outside the last block or beyond
    ``n_experts``, attention in a block >= ``n_layers``).
    """
    roles: dict[str, ParameterRole] = {}
    for name in names:
        if match := _EXPERT_NAME.match(name):
            block, expert = int(match[1]), int(match[2])
            if block != n_layers - 1 or expert >= n_experts:
                raise ValueError(f"{name}: expected experts 0..{n_experts - 1} in block {n_layers - 1} only")
            roles[name] = ParameterRole(EXPERT, expert)
        elif match := _HEAD_ROWS_NAME.match(name) or _HEAD_COLUMNS_NAME.match(name):
            layer = int(match[1])
            if layer >= n_layers:
                raise ValueError(f"{name}: attention of block {layer}, the model has {n_layers} blocks")
            roles[name] = ParameterRole(HEAD_COLUMNS if name.endswith("proj.weight") else HEAD_ROWS, layer)
        elif name in GENOMIC_ROW_NAMES:
            roles[name] = ParameterRole(GENOMIC_ROWS)
        else:
            roles[name] = ParameterRole(BY_PATIENTS)
    return roles


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation


def weighted_mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k w_k x_k / sum_k w_k over the first axis of ``stacked`` [K, ...], in float64 (weights sum > 0)."""
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights / weights.sum(), stacked.astype(np.float64, copy=False), axes=1)


def per_head_mean(stacked: np.ndarray, head_weights: np.ndarray, head_dim: int, axis: int) -> np.ndarray:
    """Average each head's slice with its own site weights, in float64.

    stacked: [K, *shape], K sites' copies of one parameter whose ``axis`` (of the parameter, not
    of ``stacked``) holds H consecutive blocks of ``head_dim``; head_weights: [K, H], every
    column with a positive sum. Returns the merged parameter [*shape].
    """
    n_sites, n_heads = head_weights.shape
    moved = np.moveaxis(stacked.astype(np.float64, copy=False), axis + 1, 1)  # [K, H * d_h, ...]
    if moved.shape[1] != n_heads * head_dim:
        raise ValueError(f"axis {axis} has size {moved.shape[1]}, expected {n_heads} heads x {head_dim}")
    blocks = moved.reshape(n_sites, n_heads, head_dim, *moved.shape[2:])
    share = head_weights / head_weights.sum(axis=0)
    merged = (blocks * share.reshape(n_sites, n_heads, *[1] * (blocks.ndim - 2))).sum(axis=0)
    return np.moveaxis(merged.reshape(moved.shape[1:]), 0, axis)


def patient_weights(updates: list[SiteUpdate]) -> np.ndarray:
    return np.array([u.n_patients for u in updates], dtype=np.float64)


def expert_weights(updates: list[SiteUpdate], n_experts: int,
                   modalities: Sequence[int] | None = None) -> np.ndarray:
    """[K, E]: tokens each site routed to each expert this round, summed over ``modalities`` (rows of
    ``expert_tokens``; None: all)."""
    loads = []
    for update in updates:
        tokens = np.asarray(update.expert_tokens, dtype=np.float64)
        if tokens.ndim != 2 or tokens.shape[1] != n_experts:
            raise ValueError(f"site {update.site}: expert_tokens {tokens.shape}, expected [n_modalities, {n_experts}]")
        if modalities is not None:
            if any(not 0 <= m < tokens.shape[0] for m in modalities):
                raise ValueError(f"site {update.site}: modalities {list(modalities)} outside expert_tokens' "
                                 f"{tokens.shape[0]} rows")
            tokens = tokens[list(modalities)]
        loads.append(tokens.sum(axis=0))
    return np.stack(loads)


def head_weights(updates: list[SiteUpdate], layer: int, n_heads: int) -> np.ndarray:
    """[K, H]: each site's importance of each head of ``layer``; heads nobody reports fall back to patients.

    A site that sent no importance (an empty list) counts as zeros.
    """
    rows = []
    for update in updates:
        if len(update.head_importance) == 0:
            rows.append(np.zeros(n_heads))
            continue
        importance = np.asarray(update.head_importance[layer], dtype=np.float64)
        if importance.shape != (n_heads,):
            raise ValueError(f"site {update.site}: head_importance[{layer}] {importance.shape}, expected ({n_heads},)")
        rows.append(importance)
    weights = np.stack(rows)
    unreported = weights.sum(axis=0) <= 0
    weights[:, unreported] = patient_weights(updates)[:, None]
    return weights


def genomic_row_weights(updates: list[SiteUpdate], n_positions: int) -> np.ndarray | None:
    """[K, T]: genomic tokens each site embedded at each of the ``n_positions`` piece positions; None when
    any site reported no counts (its rows' use is unknown: the caller averages them by patients)."""
    if any(np.asarray(u.genomic_tokens).size == 0 for u in updates):
        return None
    rows = []
    for update in updates:
        tokens = np.asarray(update.genomic_tokens, dtype=np.float64)
        if tokens.shape != (n_positions,):
            raise ValueError(f"site {update.site}: genomic_tokens {tokens.shape}, expected ({n_positions},)")
        rows.append(tokens)
    return np.stack(rows)


def per_row_mean(stacked: np.ndarray, row_weights: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Row t of ``stacked`` [K, T, ...] averaged over the sites with weights ``row_weights[:, t]`` [K, T], in
    float64; a row whose weights sum to 0 (no site used it) is ``previous``'s row."""
    totals = row_weights.sum(axis=0)
    used = totals > 0
    share = np.divide(row_weights, totals, out=np.zeros_like(row_weights), where=used)
    merged = (stacked.astype(np.float64, copy=False) * share.reshape(*share.shape, *[1] * (stacked.ndim - 2))).sum(0)
    merged[~used] = previous[~used]
    return merged


def check_same_parameters(updates: list[SiteUpdate], names: Iterable[str]) -> None:
    """ValueError unless every update holds exactly the parameters ``names`` (`validate_update` says more)."""
    if not updates:
        raise ValueError("no site updates to aggregate")
    expected = set(names)
    for update in updates:
        if set(update.weights) != expected:
            raise ValueError(f"site {update.site}: parameters differ from the global model's")


def aggregate_fedavg(updates: list[SiteUpdate]) -> dict[str, np.ndarray]:
    """Plain FedAvg: every parameter averaged with weights n_patients (the "w/o load-aware" baseline)."""
    check_same_parameters(updates, updates[0].weights if updates else ())
    patients = patient_weights(updates)
    return {
        name: weighted_mean(np.stack([u.weights[name] for u in updates]), patients).astype(reference.dtype)
        for name, reference in updates[0].weights.items()
    }


def server_step(previous: Mapping[str, np.ndarray] | None, aggregate: dict[str, np.ndarray],
                server_lr: float) -> dict[str, np.ndarray]:
    """``previous + server_lr * (aggregate - previous)`` for floating-point parameters (integer buffers keep the
    aggregate). A server learning rate above 1 lengthens the round's averaged step: averaging sites that each took
    a few local steps moves the model about as far as one site's steps (Reddi et al. 2021, "Adaptive Federated
    Optimization", the server optimizer of FedAvg)."""
    if server_lr == 1.0 or previous is None:
        return aggregate
    return {name: (previous[name] + server_lr * (value - previous[name])).astype(value.dtype)
            if _steppable(name, value, previous) else value
            for name, value in aggregate.items()}


def _earlier_state(state: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A server optimizer's state of parameter ``name`` from earlier rounds; zeros when it has none of this shape
    (a new parameter, or one whose shape changed: it starts afresh)."""
    earlier = state.get(name)
    return earlier if earlier is not None and earlier.shape == shape else np.zeros(shape)


def _steppable(name: str, value: np.ndarray, previous: Mapping[str, np.ndarray]) -> bool:
    """A floating-point parameter the previous global model has in the same shape (the server may step it)."""
    return (np.issubdtype(value.dtype, np.floating) and name in previous
            and previous[name].shape == value.shape)


@dataclass
class ServerMomentum:
    """FedAvg's server optimizer with heavy-ball momentum (FedAvgM: Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification"; Reddi et al. 2021).

    Each round's pseudo-gradient is ``previous - aggregate`` (the way the averaged sites moved, reversed);
    ``velocity = momentum * velocity + pseudo-gradient`` and ``global = previous - lr * velocity``, for
    floating-point parameters (integer buffers keep the aggregate). momentum 0 is `server_step`: stateless.
    The velocity is the only state a server optimizer keeps across rounds: the job checkpoints it (`to_dict`)
    so a resumed federation continues the same trajectory, and `reset` drops it when the parameters change
    meaning (ACS consolidation merges attention heads: the old velocity points nowhere in the new space).
    """

    lr: float = 1.0
    momentum: float = 0.0
    velocity: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, previous: Mapping[str, np.ndarray] | None,
             aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model from the previous one and the sites' aggregate."""
        if self.momentum == 0.0 or previous is None:
            return server_step(previous, aggregate, self.lr)
        stepped = {}
        for name, value in aggregate.items():
            if not _steppable(name, value, previous):
                stepped[name] = value
                continue
            velocity = previous[name].astype(np.float64) - value  # this round's pseudo-gradient
            velocity += self.momentum * _earlier_state(self.velocity, name, velocity.shape)
            self.velocity[name] = velocity
            stepped[name] = (previous[name] - self.lr * velocity).astype(value.dtype)
        return stepped

    def reset(self) -> None:
        self.velocity = {}

    def to_dict(self) -> dict[str, np.ndarray]:
        return dict(self.velocity)

    def load(self, velocity: Mapping[str, np.ndarray] | None) -> None:
        self.velocity = {name: np.asarray(value, dtype=np.float64) for name, value in (velocity or {}).items()}


@dataclass
class ServerAdam:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the server, fed each round's
    pseudo-gradient ``aggregate - previous`` (the way the averaged sites moved).

    ``first = beta1 x first + (1 - beta1) x delta``, ``second = beta2 x second + (1 - beta2) x delta^2`` and
    ``global = previous + lr x first_hat / (sqrt(second_hat) + tau)``, with Adam's bias correction (ours: the
    paper has none, but a federation of 10 rounds would spend its first rounds on moments still near zero).
    Each parameter's step is scaled by its own history: one that every round moves a little the same way takes
    steps of about ``lr``, as does one the sites move far, so ``lr`` is a step length in weight units (not a
    multiple of the average, as `ServerMomentum`'s is). ``tau`` (the paper's adaptivity) damps parameters the
    sites hardly move. Floating-point parameters only (integer buffers keep the aggregate). The moments and the
    round count are the state: checkpointed (`to_dict`), dropped at ACS consolidation (`reset`).
    """

    lr: float = 0.01
    tau: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    first: dict[str, np.ndarray] = field(default_factory=dict)
    second: dict[str, np.ndarray] = field(default_factory=dict)
    rounds: int = 0

    def step(self, previous: Mapping[str, np.ndarray] | None,
             aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model from the previous one and the sites' aggregate."""
        if previous is None:
            return aggregate
        self.rounds += 1
        first_correction = 1.0 - self.beta1 ** self.rounds
        second_correction = 1.0 - self.beta2 ** self.rounds
        stepped = {}
        for name, value in aggregate.items():
            if not _steppable(name, value, previous):
                stepped[name] = value
                continue
            start = np.asarray(previous[name], dtype=np.float64)
            delta = value.astype(np.float64) - start
            first = (1.0 - self.beta1) * delta + self.beta1 * _earlier_state(self.first, name, delta.shape)
            second = (1.0 - self.beta2) * delta ** 2 + self.beta2 * _earlier_state(self.second, name, delta.shape)
            self.first[name], self.second[name] = first, second
            direction = (first / first_correction) / (np.sqrt(second / second_correction) + self.tau)
            stepped[name] = (start + self.lr * direction).astype(value.dtype)
        return stepped

    def reset(self) -> None:
        self.first, self.second, self.rounds = {}, {}, 0

    def to_dict(self) -> dict[str, np.ndarray]:
        state = {f"first/{name}": value for name, value in self.first.items()}
        state.update({f"second/{name}": value for name, value in self.second.items()})
        if self.rounds:
            state["rounds"] = np.array(self.rounds)
        return state

    def load(self, state: Mapping[str, np.ndarray] | None) -> None:
        self.reset()
        for key, value in (state or {}).items():
            if key == "rounds":
                self.rounds = int(value)
            elif key.startswith(("first/", "second/")):
                kind, name = key.split("/", 1)
                (self.first if kind == "first" else self.second)[name] = np.asarray(value, dtype=np.float64)
            else:
                raise ValueError(f"server optimizer state: unknown entry {key!r} (not FedAdam's)")


def aggregate_load_aware(updates: list[SiteUpdate], previous: Mapping[str, np.ndarray], *, n_layers: int,
                         n_heads: int, head_dim: int, n_experts: int,
                         expert_modalities: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The next global model from the sites' updates: experts by tokens, heads by importance, genomic rows by
    genomic tokens, the rest by patients.

    previous: the global model the sites started this round from (an expert nobody used keeps
    its weights from here). n_heads: heads per layer now (the cluster count after consolidation);
    head_dim: d_model // the original head count (consolidation keeps it). expert_modalities: the rows
    of the sites' ``expert_tokens`` the expert weights count (None: every modality). See the module
    docstring for the rules. Raises ValueError when the updates do not fit ``previous``.
    """
    check_same_parameters(updates, previous)
    roles = parameter_groups(previous, n_layers, n_experts)
    patients = patient_weights(updates)
    experts = expert_weights(updates, n_experts, expert_modalities)
    heads = [head_weights(updates, layer, n_heads) for layer in range(n_layers)]
    genomic_rows = (genomic_row_weights(updates, previous[GENOMIC_POSITIONS].shape[0])
                    if GENOMIC_POSITIONS in previous else None)
    merged: dict[str, np.ndarray] = {}
    for name, role in roles.items():
        dtype = updates[0].weights[name].dtype
        stacked = np.stack([u.weights[name] for u in updates])
        if role.kind == EXPERT:
            load = experts[:, role.index]
            if load.sum() <= 0:
                merged[name] = np.array(previous[name], dtype=dtype, copy=True)
                continue
            value = weighted_mean(stacked, load)
        elif role.kind in (HEAD_ROWS, HEAD_COLUMNS):
            value = per_head_mean(stacked, heads[role.index], head_dim, axis=0 if role.kind == HEAD_ROWS else 1)
        elif role.kind == GENOMIC_ROWS and genomic_rows is not None:
            value = per_row_mean(stacked, genomic_rows, np.asarray(previous[name], dtype=np.float64))
        else:
            value = weighted_mean(stacked, patients)
        merged[name] = value.astype(dtype)
    return merged


def aggregate_head_stats(stats: list[HeadStats]) -> HeadStats | None:
    """The sum of the sites' ACS head statistics (the input of the one global consolidation plan); None if none."""
    return sum(stats) if stats else None


# ---------------------------------------------------------------------------------------------------------------------
# Checking a reply before it is used


def _listed(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _count_problems(label: str, values: np.ndarray) -> list[str]:
    problems = []
    if not np.all(np.isfinite(values)):
        problems.append(f"{label}: non-finite values")
    elif np.any(values < 0):
        problems.append(f"{label}: negative values")
    return problems


def validate_update(update: SiteUpdate, reference: Mapping[str, np.ndarray], *, n_modalities: int, n_experts: int,
                    n_layers: int, n_heads: int) -> list[str]:
    """Human-readable problems of a site's reply against the global model ``reference``; empty = usable.

    Checks: the same parameter names, shapes and dtypes as ``reference`` and finite values;
    n_patients an integer >= 1; expert_tokens of shape [n_modalities, n_experts] (n_experts = 1
    for a dense last MLP, whose routing counts are [n_modalities, 1]), finite and non-negative;
    head_importance either empty (not collected) or ``n_layers`` arrays of shape [n_heads], finite
    and non-negative; genomic_tokens either empty (not reported) or one count per row of the reference's
    genomic position table, finite and non-negative.
    """
    problems = []
    missing = set(reference) - set(update.weights)
    extra = set(update.weights) - set(reference)
    if missing:
        problems.append(f"missing parameters: {_listed(missing)}")
    if extra:
        problems.append(f"unexpected parameters: {_listed(extra)}")
    for name in sorted(set(reference) & set(update.weights)):
        value, expected = np.asarray(update.weights[name]), np.asarray(reference[name])
        if value.shape != expected.shape:
            problems.append(f"{name}: shape {value.shape}, expected {expected.shape}")
        elif value.dtype != expected.dtype:
            problems.append(f"{name}: dtype {value.dtype}, expected {expected.dtype}")
        elif not np.all(np.isfinite(value)):
            problems.append(f"{name}: non-finite values")

    n_patients = update.n_patients
    if isinstance(n_patients, bool) or not isinstance(n_patients, int | np.integer) or n_patients < 1:
        problems.append(f"n_patients {n_patients!r}: expected an integer >= 1")

    tokens = np.asarray(update.expert_tokens, dtype=np.float64)
    if tokens.shape != (n_modalities, n_experts):
        problems.append(f"expert_tokens: shape {tokens.shape}, expected ({n_modalities}, {n_experts})")
    else:
        problems += _count_problems("expert_tokens", tokens)

    if len(update.head_importance) not in (0, n_layers):
        problems.append(f"head_importance: {len(update.head_importance)} layers, expected {n_layers} (or none)")
    else:
        for layer, importance in enumerate(update.head_importance):
            importance = np.asarray(importance, dtype=np.float64)
            if importance.shape != (n_heads,):
                problems.append(f"head_importance[{layer}]: shape {importance.shape}, expected ({n_heads},)")
            else:
                problems += _count_problems(f"head_importance[{layer}]", importance)

    genomic = np.asarray(update.genomic_tokens, dtype=np.float64)
    if genomic.size and GENOMIC_POSITIONS in reference:
        positions = np.asarray(reference[GENOMIC_POSITIONS]).shape[0]
        if genomic.shape != (positions,):
            problems.append(f"genomic_tokens: shape {genomic.shape}, expected ({positions},)")
        else:
            problems += _count_problems("genomic_tokens", genomic)
    return problems


def update_norm(update: SiteUpdate, reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm, over all of ``reference``'s parameters together, of the site's weights minus the reference (float64)."""
    squares = sum(
        float(np.sum(np.square(np.asarray(update.weights[name], np.float64) - np.asarray(ref, np.float64))))
        for name, ref in reference.items()
    )
    return math.sqrt(squares)


def norm_outliers(updates: list[SiteUpdate], reference: Mapping[str, np.ndarray], factor: float = 10.0) -> list[str]:
    """Sites whose `update_norm` exceeds ``factor`` x the round's median norm (or is not finite).

    A median needs a majority to define "normal": with fewer than 3 sites nobody is an outlier.
    A median of 0 (most sites did not move) gives no scale either: then only non-finite norms
    are flagged. Run it after `validate_update` (it assumes matching parameters).
    """
    if len(updates) < 3:
        return []
    norms = np.array([update_norm(u, reference) for u in updates])
    finite = np.isfinite(norms)
    median = float(np.median(norms[finite])) if finite.any() else 0.0
    return [u.site for u, norm, ok in zip(updates, norms, finite, strict=True)
            if not ok or (median > 0 and norm > factor * median)]
