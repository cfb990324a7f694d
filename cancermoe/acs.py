"""Attention consolidation and sparsification (ACS, paper section 3.4, algorithms 1 and 2).

Three pieces, all plain functions and data so that the federation can run the
statistics and the plan on a coordinator that never sees a patient:

1. Head statistics (`HeadStats`, `head_statistics`). The importance of head h is
   ``I_h = E_x |<A_h(x), dL/dA_h(x)>|`` (Michel et al. 2019), with A_h(x) the
   head's output [L, d_h] before the output projection and the inner product
   taken over the sample's real tokens and the d_h dims. Next to it, the mean
   cosine similarity of every pair of head outputs (flattened over real tokens
   and dims). Both are kept as SUMS over samples plus a sample count, so they
   add up over batches, epochs and sites.

2. The consolidation plan (`compute_consolidation_plan`). Per layer the
   k = round(ratio * H) most important heads become cluster centres, every other
   head joins the centre whose output it is most cosine-similar to, and each
   cluster's members get weights softmax(mean importances) (paper eq. 1). The
   plan is plain data: the federation computes ONE plan from the summed
   statistics of all sites and sends it out, so every site ends with the same
   shapes.

3. Applying a plan (`merge_head_rows`, `merge_output_columns`; the model's
   ``apply_consolidation`` calls them). Eq. 1 computed literally would still run
   all H heads and then mix their outputs: no saving. Instead we merge the
   *projections*: cluster c with members j and weights w_j gets
   ``W_c = sum_j w_j W_j`` for its query, key and value slices (weights and
   biases), i.e. one attention map per cluster, and the output projection's
   column block of c becomes ``sum_{j in c} W_o[:, j]`` (each member's output is
   replaced by its cluster's). A consolidated layer computes k heads instead of
   H, so it saves parameters and FLOPs. Value merging is exact: when the members
   share their query and key weights, the cluster output is exactly
   ``sum_j w_j A_j(x)`` (eq. 1); with different q/k the merged map is an
   approximation of the members' maps. A plan with one head per cluster (ratio
   1) leaves the layer unchanged.

Sparsification (`sparsify_attention`, algorithm 1) keeps, per sample and head,
the (qN)^2 largest entries of the first layer's attention map, N = the sample's
real WSI tokens; `kept_wsi_tokens` says what qN is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------------
# Head statistics


@dataclass
class HeadStats:
    """Sums over training samples of the per-head ACS statistics, per encoder layer.

    ``importance_sum[l][h]`` = sum over samples of |<A_h(x), dL/dA_h(x)>| (float64, [H]);
    ``similarity_sum[l][i, j]`` = sum over samples of cosine(A_i(x), A_j(x)) (float64, [H, H]);
    ``n_samples`` = how many samples went in (every layer sees every sample, so one count).
    Add two with ``+`` (batches, epochs, sites); divide with `mean_importance` / `mean_similarity`.
    """

    importance_sum: list[np.ndarray]
    similarity_sum: list[np.ndarray]
    n_samples: int = 0

    @classmethod
    def zeros(cls, n_layers: int, n_heads: int) -> HeadStats:
        return cls(
            [np.zeros(n_heads) for _ in range(n_layers)],
            [np.zeros((n_heads, n_heads)) for _ in range(n_layers)],
            0,
        )

    @property
    def n_layers(self) -> int:
        return len(self.importance_sum)

    def n_heads(self, layer: int) -> int:
        return len(self.importance_sum[layer])

    def mean_importance(self, layer: int) -> np.ndarray:
        if self.n_samples == 0:
            raise ValueError("head statistics hold no samples")
        return self.importance_sum[layer] / self.n_samples

    def mean_similarity(self, layer: int) -> np.ndarray:
        if self.n_samples == 0:
            raise ValueError("head statistics hold no samples")
        return self.similarity_sum[layer] / self.n_samples

    def __add__(self, other: HeadStats) -> HeadStats:
        shapes = [a.shape for a in self.importance_sum]
        if shapes != [b.shape for b in other.importance_sum]:
            raise ValueError(f"cannot add head statistics of different shapes: {shapes} vs "
                             f"{[b.shape for b in other.importance_sum]}")
        return HeadStats(
            [a + b for a, b in zip(self.importance_sum, other.importance_sum, strict=True)],
            [a + b for a, b in zip(self.similarity_sum, other.similarity_sum, strict=True)],
            self.n_samples + other.n_samples,
        )

    def __radd__(self, other: Any) -> HeadStats:
        if isinstance(other, int) and other == 0:  # so that sum(list_of_stats) works
            return self
        return NotImplemented

    def to_dict(self) -> dict[str, np.ndarray]:
        """Flat numpy arrays (for sending): ``layer{l}.importance_sum``, ``layer{l}.similarity_sum``, ``n_samples``."""
        out: dict[str, np.ndarray] = {"n_samples": np.asarray(self.n_samples, dtype=np.int64)}
        for layer, (imp, sim) in enumerate(zip(self.importance_sum, self.similarity_sum, strict=True)):
            out[f"layer{layer}.importance_sum"] = np.asarray(imp, dtype=np.float64)
            out[f"layer{layer}.similarity_sum"] = np.asarray(sim, dtype=np.float64)
        return out

    @classmethod
    def from_dict(cls, arrays: dict[str, Any]) -> HeadStats:
        """Inverse of `to_dict`; raises ValueError on missing keys or inconsistent shapes."""
        if "n_samples" not in arrays:
            raise ValueError("head statistics: no 'n_samples'")
        n_layers = sum(1 for key in arrays if key.endswith(".importance_sum"))
        importance, similarity = [], []
        for layer in range(n_layers):
            try:
                imp = np.asarray(arrays[f"layer{layer}.importance_sum"], dtype=np.float64)
                sim = np.asarray(arrays[f"layer{layer}.similarity_sum"], dtype=np.float64)
            except KeyError as exc:
                raise ValueError(f"head statistics: missing {exc.args[0]!r}") from None
            if imp.ndim != 1 or sim.shape != (len(imp), len(imp)):
                raise ValueError(f"head statistics: layer {layer} has importance {imp.shape}, similarity {sim.shape}")
            importance.append(imp)
            similarity.append(sim)
        return cls(importance, similarity, int(np.asarray(arrays["n_samples"])))


def head_statistics(head_outputs: Tensor, head_grads: Tensor, token_mask: Tensor,
                    loss_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-head importance and similarity SUMS over the samples of one batch.

    head_outputs, head_grads: [B, H, L, d_h], the heads' outputs A_h(x) and dL/dA_h(x);
    token_mask: [B, L] bool, True for real tokens (padding is left out of both statistics);
    loss_scale: factor that turns the batch gradient into each sample's own gradient. The trainer's
    loss is a mean over the batch, so dL/dA_h(x_b) = (1/B) dL_b/dA_h(x_b): pass B to make each
    sample's importance independent of the batch size (the batch-level MoE balancing term, if it
    is part of the loss, is scaled the same way).

    Returns (importance_sum [H], similarity_sum [H, H]), float64 numpy arrays.
    """
    with torch.no_grad():
        keep = token_mask[:, None, :, None].to(head_outputs.dtype)
        outputs = (head_outputs * keep).float()
        grads = (head_grads * keep).float()
        importance = (outputs * grads).sum(dim=(2, 3)).abs() * loss_scale  # [B, H]
        flat = F.normalize(outputs.flatten(2), dim=-1)  # [B, H, L * d_h]; an all-zero head stays zero
        similarity = flat @ flat.transpose(1, 2)  # [B, H, H]
        return importance.sum(0).double().cpu().numpy(), similarity.sum(0).double().cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Consolidation plan


@dataclass(frozen=True)
class LayerPlan:
    """One layer's clusters: ``clusters[c]`` lists the member heads (centre first, then by head index),
    ``weights[c]`` their softmax(mean importance) weights in the same order (they sum to 1)."""

    clusters: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @property
    def n_clusters(self) -> int:
        return len(self.clusters)


@dataclass(frozen=True)
class ConsolidationPlan:
    """How every layer's ``n_heads`` heads are merged into clusters; plain data (`to_dict` is JSON-safe).

    Clusters are ordered by their centre's head index, so a plan with one head per cluster is the identity.
    """

    n_heads: int
    layers: tuple[LayerPlan, ...]

    def __post_init__(self) -> None:
        for index, layer in enumerate(self.layers):
            members = sorted(h for cluster in layer.clusters for h in cluster)
            if members != list(range(self.n_heads)):
                raise ValueError(f"consolidation plan layer {index}: clusters {layer.clusters} do not hold "
                                 f"every head 0..{self.n_heads - 1} exactly once")
            if [len(c) for c in layer.clusters] != [len(w) for w in layer.weights]:
                raise ValueError(f"consolidation plan layer {index}: weights do not match the clusters")
            for weights in layer.weights:
                if any(w < 0 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
                    raise ValueError(f"consolidation plan layer {index}: weights {weights} are not a distribution")

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_heads": self.n_heads,
            "layers": [{"clusters": [list(c) for c in layer.clusters], "weights": [list(w) for w in layer.weights]}
                       for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConsolidationPlan:
        """Inverse of `to_dict`; raises ValueError when the data is not a valid plan."""
        try:
            layers = tuple(
                LayerPlan(tuple(tuple(int(h) for h in c) for c in layer["clusters"]),
                          tuple(tuple(float(w) for w in ws) for ws in layer["weights"]))
                for layer in data["layers"]
            )
            return cls(int(data["n_heads"]), layers)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a consolidation plan ({type(exc).__name__}: {exc})") from None


def n_cluster_centres(ratio: float, n_heads: int) -> int:
    """k = ratio * H rounded half up, at least 1 and at most H."""
    return min(n_heads, max(1, math.floor(ratio * n_heads + 0.5)))


def compute_consolidation_plan(stats: HeadStats, ratio: float) -> ConsolidationPlan:
    """Algorithm 2 on mean head statistics; deterministic (ties broken towards the lower head index).

    Per layer: the k = `n_cluster_centres` (ratio, H) heads of highest mean importance are centres;
    every other head joins the centre with the highest mean cosine similarity to it; each
    cluster's weights are the softmax of its members' mean importances.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"consolidation ratio {ratio} must be in [0, 1]")
    n_heads = {stats.n_heads(layer) for layer in range(stats.n_layers)}
    if len(n_heads) != 1:
        raise ValueError(f"layers have different head counts {sorted(n_heads)}")
    (heads,) = n_heads
    layers = []
    for layer in range(stats.n_layers):
        importance = stats.mean_importance(layer)
        similarity = stats.mean_similarity(layer)
        k = n_cluster_centres(ratio, heads)
        by_importance = sorted(range(heads), key=lambda h: (-importance[h], h))
        centres = sorted(by_importance[:k])
        members: dict[int, list[int]] = {c: [c] for c in centres}
        for head in range(heads):
            if head in members:
                continue
            # max() keeps the first maximum, and centres are in index order: ties go to the lower centre.
            members[max(centres, key=lambda c: similarity[head, c])].append(head)
        clusters = tuple((c, *sorted(members[c][1:])) for c in centres)
        weights = tuple(tuple(softmax([importance[h] for h in cluster])) for cluster in clusters)
        layers.append(LayerPlan(clusters, weights))
    return ConsolidationPlan(heads, tuple(layers))


def softmax(values: list[float]) -> list[float]:
    """Numerically stable softmax of a few floats (float64)."""
    shifted = np.asarray(values, dtype=np.float64) - np.max(values)
    e = np.exp(shifted)
    return [float(v) for v in e / e.sum()]


def merge_head_rows(weight: Tensor, bias: Tensor | None, layer: LayerPlan,
                    head_dim: int) -> tuple[Tensor, Tensor | None]:
    """Merge a query/key/value projection: weight [H * d_h, d_in] -> [k * d_h, d_in] (bias likewise).

    Rows h*d_h:(h+1)*d_h belong to head h; cluster c's rows become sum_j w_j * (member j's rows).
    """
    def merged(t: Tensor) -> Tensor:
        blocks = t.view(-1, head_dim, *t.shape[1:])  # [H, d_h, ...]
        return torch.cat([
            sum(w * blocks[h] for h, w in zip(cluster, ws, strict=True))
            for cluster, ws in zip(layer.clusters, layer.weights, strict=True)
        ])

    return merged(weight), (None if bias is None else merged(bias))


def merge_output_columns(weight: Tensor, layer: LayerPlan, head_dim: int) -> Tensor:
    """Merge the output projection: weight [d_out, H * d_h] -> [d_out, k * d_h].

    Cluster c's column block is the SUM of its members' blocks: the cluster output stands in for
    each member's output, so every member's contribution to the layer output is kept.
    """
    blocks = weight.view(weight.shape[0], -1, head_dim)  # [d_out, H, d_h]
    return torch.cat([blocks[:, list(cluster)].sum(1) for cluster in layer.clusters], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Sparsification


def kept_wsi_tokens(n_wsi: Tensor, keep_ratio: float) -> Tensor:
    """qN per sample: round(keep_ratio * n_wsi) half up, at least 1 when the sample has a WSI token, else 0."""
    n_wsi = n_wsi.long()
    kept = torch.floor(keep_ratio * n_wsi.double() + 0.5).long().clamp(min=1)
    return torch.where(n_wsi > 0, kept, torch.zeros_like(kept))


def sparsify_attention(attn: Tensor, keep_entries: Tensor | int) -> Tensor:
    """Algorithm 1: keep the ``keep_entries`` largest entries of each (sample, head) map, zero the rest.

    attn: [B, H, L, L] attention probabilities; keep_entries: one count, or [B] counts per sample
    (a count >= L*L keeps the whole map). Exactly that many entries are kept (ties resolved by
    `torch.topk`). No renormalisation: the paper returns A_sparse V, so a query row that keeps no
    entry yields a zero head output (its token then passes the layer on the residual path alone).
    Gradients flow through the kept entries.
    """
    batch, heads, length, _ = attn.shape
    n_entries = length * length
    keep = torch.as_tensor(keep_entries, device=attn.device).long().expand(batch).clamp(min=0)
    whole = keep >= n_entries
    flat = attn.flatten(2)  # [B, H, L*L]
    mask = whole[:, None, None].expand_as(flat).clone()
    if not bool(whole.all()):
        k_max = int(keep[~whole].max())
        if k_max > 0:
            top = flat.detach().topk(k_max, dim=-1).indices  # [B, H, k_max], largest first
            in_budget = torch.arange(k_max, device=attn.device)[None, None, :] < keep[:, None, None]
            mask.scatter_(-1, top, in_budget.expand_as(top) | mask.gather(-1, top))
    return (flat * mask).view_as(attn)
