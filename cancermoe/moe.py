"""Modality-aware sparse mixture of experts: the SMoE layer of CancerMoE.

The dense MLP of the last encoder layer (hidden size ``hidden``) is cut into
``n_experts`` equal experts of hidden size ``hidden // n_experts`` (paper 3.1,
"modularization"). Each real token goes to ``top_k`` of them:

    x_m   = concat(x, onehot(m))               what the router sees
    R(x)  = TopK(softmax(g(x_m)), k)           softmax over all experts, the k largest kept,
                                               the rest zeroed, NOT renormalised (paper appendix A)
    y     = sum_e R(x)_e * f_e(x) + b          the experts see x itself

``b`` is one output bias shared by all experts: cutting the dense MLP's hidden
units into groups gives E first layers with their biases, E second layers
*without* bias, and the dense MLP's single output bias. So the experts together
hold exactly the dense MLP's parameters, and `DenseMLP` (the "w/o SMoE"
ablation) is the same network with every expert always on and gate 1.

Why modality-aware routing: WSI patch tokens and genomic tokens are very
different inputs; when both share one MLP their gradients pull its weights in
conflicting directions (paper figure 4b). Giving the router the modality as a
one-hot lets it learn modality-specific experts (and shared ones where that
helps), which separates the conflicting updates into different parameters.

Balancing (Shazeer et al. 2017, "Outrageously large neural networks"): in
training, Gaussian noise with a learned, input-dependent scale
(softplus(W_noise x_m)) is added to the router logits before the top-k. Two
losses, both the squared coefficient of variation over experts, keep the
experts in use:

- importance: the sum of each expert's gate values over the batch's real tokens;
- load: the expected number of tokens each expert receives, a smooth estimate
  through the normal CDF (`prob_in_top_k`), so it has a gradient.

``aux_loss = balance_weight * (cv^2(importance) + cv^2(load))``. In eval mode no
noise is drawn (routing is deterministic) and the load is the hard count of
tokens per expert: the aux loss then reports the imbalance that actually
happened; it carries no useful gradient for the load term, and is not meant to.

The router and the noise layer start at zero weights (Shazeer et al.'s advice):
every expert gets the same score, training noise spreads tokens evenly at
first. Ties (the zero-initialised router in eval) are broken towards the lower
expert index with a stable sort, identically on CPU and CUDA.

Routing counts: ``routing_counts[m, e]`` counts the real tokens of modality m
sent to expert e (a token sent to k experts counts k times), accumulated in
training only. The federated server averages each expert's parameters across
sites weighted by these counts (a site that never used an expert does not
move it); the modality split feeds the expert-by-modality plots. The buffer is
float64 and not persistent (counts are per-round statistics, not weights, so
they stay out of the state dict and checkpoints). Use autocast for bf16; a
``module.to(torch.bfloat16)`` would also cast the counts. Under DDP, each rank
counts its own tokens: build DDP with ``broadcast_buffers=False`` (or rank 0's
counts overwrite the others) and all-reduce (sum) the counts before reporting.

Only real tokens (mask True) are routed, enter the losses and the counts;
padding positions of the output are zero. Modality ids must lie in
0..n_modalities-1 (not checked here: checking would force a device sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Floor on the router noise scale (Shazeer et al.'s noise_epsilon): keeps the load
# estimator's CDF argument finite when softplus(W_noise x) underflows.
NOISE_EPSILON = 1e-2


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation of a vector: population variance / mean^2, in float32.

    0 for a uniform vector (and for an all-zero one, or fewer than two values);
    E - 1 when one of E entries holds everything.
    """
    values = values.float()
    if values.numel() < 2:
        return values.new_zeros(())
    return torch.var(values, correction=0) / (values.mean().square() + 1e-10)


def prob_in_top_k(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, selected: Tensor, k: int) -> Tensor:
    """P(expert e is in a token's top-k if only e's own noise were drawn again), [T, E] float32.

    Shazeer et al. 2017, appendix A: expert e makes the top-k when its noisy logit
    beats the k-th largest noisy logit among the *other* experts. For a selected
    expert that threshold is the (k+1)-th largest logit overall, for an
    unselected one the k-th largest; then P = Phi((clean_e - threshold) / std_e).

    clean_logits, noisy_logits, noise_std: [T, E]; selected: [T, E] bool, the experts each token was routed to.
    """
    if k >= clean_logits.shape[-1]:
        return torch.ones_like(clean_logits, dtype=torch.float32)  # every expert is always chosen
    largest = noisy_logits.float().topk(k + 1, dim=-1).values
    threshold = torch.where(selected, largest[:, k : k + 1], largest[:, k - 1 : k])
    return torch.special.ndtr((clean_logits.float() - threshold) / noise_std.float())


@dataclass
class Routing:
    """How the real tokens of one batch were routed. T = number of real tokens, E = experts.

    Tokens are in row-major (batch, position) order of the real positions.
    """

    token_index: Tensor  # [T] long: position of each real token in the flattened [B * L] batch
    modality: Tensor  # [T] long
    gates: Tensor  # [T, E] float32: softmax over all experts, zero outside the token's top-k (not renormalised)
    experts: Tensor  # [T, k] long: the chosen experts, highest score first (ties: lower index first)
    importance: Tensor  # [E] float32: sum of gate values per expert
    load: Tensor  # [E] float32: expected tokens per expert (smooth, training) or tokens per expert (eval)


def real_tokens(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(token_index [T], tokens [T, D]): the flattened positions and rows of the real (mask True) tokens."""
    token_index = mask.reshape(-1).nonzero().squeeze(1)
    return token_index, x.reshape(-1, x.shape[-1]).index_select(0, token_index)


def scatter_to_batch(rows: Tensor, token_index: Tensor, like: Tensor) -> Tensor:
    """Put per-token rows [T, D] back at their positions in a zero tensor shaped like ``like`` [B, L, D]."""
    out = like.new_zeros(like.shape[0] * like.shape[1], rows.shape[-1])
    out[token_index] = rows.to(out.dtype)
    return out.view(*like.shape[:2], rows.shape[-1])


class Expert(nn.Module):
    """One expert: d_model -> hidden -> d_model with GELU; no output bias (the layer adds one shared bias)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class SparseMoE(nn.Module):
    """Top-k modality-aware mixture of ``n_experts`` experts replacing a dense MLP of hidden size ``hidden``."""

    routing_counts: Tensor

    def __init__(
        self,
        d_model: int,
        hidden: int,
        n_experts: int,
        top_k: int,
        n_modalities: int,
        balance_weight: float = 0.01,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden % n_experts:
            raise ValueError(f"hidden {hidden} is not divisible by n_experts {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k {top_k} must be in 1..n_experts ({n_experts})")
        if n_modalities < 1:
            raise ValueError(f"n_modalities must be at least 1, got {n_modalities}")
        self.n_experts = n_experts
        self.top_k = top_k
        self.n_modalities = n_modalities
        self.balance_weight = balance_weight
        self.experts = nn.ModuleList(Expert(d_model, hidden // n_experts) for _ in range(n_experts))
        self.output_bias = nn.Parameter(torch.zeros(d_model))
        self.router = nn.Linear(d_model + n_modalities, n_experts)
        self.noise_router = nn.Linear(d_model + n_modalities, n_experts)  # W_noise: per-expert noise scale
        for layer in (self.router, self.noise_router):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer(
            "routing_counts", torch.zeros(n_modalities, n_experts, dtype=torch.float64), persistent=False
        )

    def reset_routing_counts(self) -> None:
        self.routing_counts.zero_()

    def route(self, x: Tensor, modality: Tensor, mask: Tensor) -> Routing:
        """Choose the experts of every real token of x [B, L, D] (modality [B, L] long, mask [B, L] bool).

        In training the logits get the learned Gaussian noise; in eval they do not.
        """
        token_index, tokens = real_tokens(x, mask)
        token_modality = modality.reshape(-1).index_select(0, token_index)
        routed_on = torch.cat([tokens.float(), F.one_hot(token_modality, self.n_modalities).float()], dim=-1)
        # Routing in float32 even under bf16 autocast: near-ties between experts and the normal CDF
        # of the load estimator need the precision, and the router is tiny.
        with torch.autocast(device_type=x.device.type, enabled=False):
            clean_logits = F.linear(routed_on, self.router.weight.float(), self.router.bias.float())
            if self.training:
                noise_logits = F.linear(routed_on, self.noise_router.weight.float(), self.noise_router.bias.float())
                noise_std = F.softplus(noise_logits) + NOISE_EPSILON
                logits = clean_logits + torch.randn_like(clean_logits) * noise_std
            else:
                logits = clean_logits
            # A stable sort makes ties go to the lower expert index (torch.topk leaves tie order unspecified).
            experts = logits.sort(dim=-1, descending=True, stable=True).indices[:, : self.top_k]
            probs = logits.softmax(dim=-1)
            gates = torch.zeros_like(probs).scatter(1, experts, probs.gather(1, experts))
            if self.training:
                selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, experts, True)
                load = prob_in_top_k(clean_logits, logits, noise_std, selected, self.top_k).sum(dim=0)
            else:
                load = torch.bincount(experts.reshape(-1), minlength=self.n_experts).float()
        return Routing(token_index, token_modality, gates, experts, gates.sum(dim=0), load)

    def balance_loss(self, routing: Routing) -> Tensor:
        """balance_weight * (cv^2(importance) + cv^2(load)), float32 scalar."""
        return self.balance_weight * (cv_squared(routing.importance) + cv_squared(routing.load))

    def mix(self, tokens: Tensor, routing: Routing) -> Tensor:
        """sum_e gate_e * expert_e(token) + shared bias, real tokens [T, D]; each expert runs on its own tokens."""
        k = self.top_k
        flat_experts = routing.experts.reshape(-1)  # [T * k], token-major
        order = flat_experts.argsort(stable=True)  # (token, slot) pairs grouped by expert
        sizes = torch.bincount(flat_experts, minlength=self.n_experts).tolist()  # the one host sync
        rows = (order // k).split(sizes)
        weights = routing.gates.gather(1, routing.experts).reshape(-1)[order].split(sizes)
        # Every expert runs, on zero rows if it got no token: its parameters stay in the graph,
        # which DDP needs (otherwise find_unused_parameters).
        outputs = [
            (expert(tokens[r]) * w.unsqueeze(1)).to(tokens.dtype)
            for expert, r, w in zip(self.experts, rows, weights, strict=True)
        ]
        # Undo the grouping and add each token's k contributions: a gather and a sum, no scatter-add,
        # so the result does not depend on atomic-add order on the GPU.
        per_slot = torch.cat(outputs)[order.argsort()].view(-1, k, tokens.shape[-1])
        return self.dropout(per_slot.sum(dim=1) + self.output_bias)

    def forward(self, x: Tensor, modality: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, L, d_model]; modality [B, L] long in 0..n_modalities-1; mask [B, L] bool (True = real token).

        Returns (y [B, L, d_model], zero at masked positions; aux_loss, float32 scalar).
        """
        routing = self.route(x, modality, mask)
        tokens = x.reshape(-1, x.shape[-1]).index_select(0, routing.token_index)
        y = scatter_to_batch(self.mix(tokens, routing), routing.token_index, like=x)
        if self.training:
            self._count(routing)
        return y, self.balance_loss(routing)

    @torch.no_grad()
    def _count(self, routing: Routing) -> None:
        cell = routing.modality.repeat_interleave(self.top_k) * self.n_experts + routing.experts.reshape(-1)
        counts = torch.bincount(cell, minlength=self.n_modalities * self.n_experts)
        self.routing_counts += counts.view(self.n_modalities, self.n_experts).to(self.routing_counts.dtype)


class DenseMLP(nn.Module):
    """The "w/o SMoE" ablation: one MLP d_model -> hidden -> d_model (GELU), the experts' total parameters.

    Same call signature as `SparseMoE`; aux_loss is zero and ``routing_counts``
    [n_modalities, 1] counts real tokens per modality (training only), so the
    rest of the pipeline treats both alike.
    """

    routing_counts: Tensor

    def __init__(self, d_model: int, hidden: int, n_modalities: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_modalities = n_modalities
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("routing_counts", torch.zeros(n_modalities, 1, dtype=torch.float64), persistent=False)

    def reset_routing_counts(self) -> None:
        self.routing_counts.zero_()

    def forward(self, x: Tensor, modality: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Same contract as `SparseMoE.forward`; aux_loss is a float32 zero."""
        token_index, tokens = real_tokens(x, mask)
        y = scatter_to_batch(self.dropout(self.fc_out(F.gelu(self.fc_in(tokens)))), token_index, like=x)
        if self.training:
            with torch.no_grad():
                token_modality = modality.reshape(-1).index_select(0, token_index)
                counts = torch.bincount(token_modality, minlength=self.n_modalities)
                self.routing_counts += counts.view(-1, 1).to(self.routing_counts.dtype)
        return y, torch.zeros((), device=x.device)
