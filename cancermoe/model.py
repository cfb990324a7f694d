"""The CancerMoE network (paper sections 3.1-3.4, appendix B), in one file, top to bottom.

Input of one patient: N selected WSI patch features [N, feature_dim] (a set: no
positional embedding) and the genomic vector cut into T pieces of
``genomic_piece`` values (`genomic_pieces`). A batch pads both to a common
length with masks (True = real). The sequence is

    [CLS, WSI tokens (N), genomic tokens (T)]          modality ids 0, 1, 2

    CLS token       a learned vector
    WSI token       Linear(feature_dim -> d) of a patch feature
    genomic token   `GenomicEmbedding`: Linear(genomic_piece -> d) of a piece + a learned piece-position
                    embedding; the linear map shared by all pieces (ViT's patch embedding) or, with
                    ``genomic_embedding = "per-piece"``, one map per piece position (ours, see the class);
                    with ``genomics_by_cancer`` each cancer's pieces start at its own position
                    (`cancermoe.genomics.GenomicLayout`: gene j of one study is not gene j of another)
    every token     + a learned modality embedding (ours: the paper only feeds the modality to the router)

then ``n_layers`` pre-norm transformer blocks (x += Attn(LN(x)); x += MLP(LN(x)))
with d_model 32 and 8 heads. The MLP of the LAST block is the modality-aware
sparse mixture of experts (`cancermoe.moe.SparseMoE`, routing on
concat(x, onehot(modality))), or `DenseMLP` for the "w/o SMoE" ablation; the
earlier blocks have a plain dense MLP of the same hidden size (ours: the paper
only says the SMoE sits in the last layer). The survival head reads the CLS
token: LayerNorm -> Linear(d, n_bins) discrete hazard logits.

Attention is written out (softmax(QK^T / sqrt(d_h)) V with a key padding mask)
because ACS needs the per-head outputs and maps (see `cancermoe.acs`):

- head statistics: `CancerMoE.enable_head_stats`, then after each
  ``loss.backward()`` `CancerMoE.collect_head_stats` returns that batch's
  `HeadStats` (the trainer sums them);
- consolidation: `CancerMoE.apply_consolidation` (plan computed elsewhere, once
  for all sites); a consolidated model is rebuilt with ``CancerMoE(config, plan)``;
- sparsification, first block only, when ``config.acs``: in training each head
  keeps the (qN)^2 largest entries of its attention map (N = the sample's real
  WSI tokens, q = ``sparsify_keep``); at inference (eval mode) the first block
  picks the qN WSI tokens with the highest CLS attention and the whole network
  then runs on CLS + those tokens + the genomic tokens.

The Dynamic Patch Selector's token score (`ModelOutput.token_scores`) comes
from the same forward pass; ``config.dps_score`` chooses it: ``last-cls`` is
the last block's CLS attention (the paper, `ModelOutput.cls_attention`),
``first-cls`` the first block's CLS attention before sparsification, which
covers every WSI token given, also under sparse inference (it is the row the
inference filter ranks tokens by).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cancermoe.acs import (
    ConsolidationPlan,
    HeadStats,
    LayerPlan,
    head_statistics,
    kept_wsi_tokens,
    merge_head_rows,
    merge_output_columns,
    sparsify_attention,
)
from cancermoe.config import CancerMoEConfig
from cancermoe.moe import DenseMLP, SparseMoE

MODALITY_CLS = 0
MODALITY_WSI = 1
MODALITY_GENOMICS = 2
N_MODALITIES = 3


def genomic_pieces(vector: np.ndarray | Tensor, piece: int) -> Tensor:
    """Cut a patient's genomic vector [G] into T = ceil(G / piece) pieces [T, piece] (float32).

    The last piece is zero-padded at the end. Each piece becomes one genomic token.
    """
    values = vector if isinstance(vector, Tensor) else torch.from_numpy(np.asarray(vector, dtype=np.float32))
    values = values.float().reshape(-1)
    n_pieces = math.ceil(values.numel() / piece)
    padded = F.pad(values, (0, n_pieces * piece - values.numel()))
    return padded.view(n_pieces, piece)


@dataclass
class ModelOutput:
    """What one forward pass gives. B = patients, N = WSI tokens given, n_bins = survival time bins."""

    hazard_logits: Tensor  # [B, n_bins]: one logit per time bin; the survival loss maps them to hazards
    aux_loss: Tensor  # scalar: the SMoE balancing loss, already weighted by config.balance_weight
    # [B, N]: last block's CLS -> WSI token attention (before any sparsification), head mean; detached.
    # Zero at padding and, under sparse inference, at the tokens the first block filtered out.
    cls_attention: Tensor
    # [B, N]: first block's CLS -> WSI token attention before sparsification, head mean; detached.
    # Zero at padding only: under sparse inference it is the row that chose the kept tokens.
    first_cls_attention: Tensor
    dps_score: str = "last-cls"  # which of the two `token_scores` is (config.dps_score)

    @property
    def token_scores(self) -> Tensor:
        """[B, N] the DPS token score ``config.dps_score`` names (higher = more worth selecting); detached."""
        return self.first_cls_attention if self.dps_score == "first-cls" else self.cls_attention


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks


class Attention(nn.Module):
    """Multi-head self-attention with its per-head pieces reachable for ACS.

    Rows h*d_h:(h+1)*d_h of ``query``/``key``/``value`` and columns h*d_h:(h+1)*d_h of
    ``proj`` belong to head h. After consolidation ``n_heads`` is the number of clusters.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim
        inner = n_heads * head_dim
        self.query = nn.Linear(d_model, inner)
        self.key = nn.Linear(d_model, inner)
        self.value = nn.Linear(d_model, inner)
        self.proj = nn.Linear(inner, d_model)
        self.dropout = nn.Dropout(dropout)
        # ACS head statistics: when on, forward keeps the head outputs (with their gradient) and the token mask.
        self.record_head_outputs = False
        self.head_outputs: Tensor | None = None
        self.head_mask: Tensor | None = None
        # Dense attention through torch's fused kernel; `count_flops` turns it off because torch's
        # FLOP counter does not see inside fused kernels (the arithmetic is the same).
        self.fused = True

    def split_heads(self, t: Tensor) -> Tensor:
        """[B, L, H * d_h] -> [B, H, L, d_h]."""
        return t.view(t.shape[0], t.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def attention_map(self, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d_h)) over the real keys: q [B, H, Lq, d_h], k [B, H, L, d_h] -> [B, H, Lq, L]."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        return scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(dim=-1)

    def forward(self, x: Tensor, mask: Tensor, keep_entries: Tensor | None = None,
                cls_query_only: bool = False) -> tuple[Tensor | None, Tensor]:
        """x [B, L, d], mask [B, L] bool (True = real; position 0, the CLS token, always real).

        keep_entries: [B] attention entries each head keeps (`sparsify_attention`), or None for dense.
        Returns (output [B, L, d], the CLS row of the map before sparsification, head mean [B, L], detached).
        cls_query_only: compute only the CLS query's row and return (None, that row): one query
        instead of L, which is what makes the inference token choice cheap.
        """
        k = self.split_heads(self.key(x))
        if cls_query_only:
            q = self.split_heads(self.query(x[:, :1]))
            return None, self.attention_map(q, k, mask)[:, :, 0, :].mean(dim=1)
        q, v = self.split_heads(self.query(x)), self.split_heads(self.value(x))
        if keep_entries is None and self.fused:
            # Dense: a fused kernel never materialises the [B, H, L, L] map (about 3.5x faster at
            # L ~ 3100 on CPU); the CLS row, the only part of the map we need, costs one query.
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            cls_row = self.attention_map(q[:, :, :1], k, mask)[:, :, 0, :].mean(dim=1).detach()
        else:
            attn = self.attention_map(q, k, mask)
            cls_row = attn[:, :, 0, :].mean(dim=1).detach()
            if keep_entries is not None:
                # Padding query rows are dropped first, so the budget goes to real rows only.
                attn = sparsify_attention(attn * mask[:, None, :, None], keep_entries)
            heads = attn @ v
        # heads [B, H, L, d_h]: A_h(x), the head outputs ACS scores
        if self.record_head_outputs and heads.requires_grad:
            heads.retain_grad()
            self.head_outputs, self.head_mask = heads, mask
        y = heads.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.proj(y)), cls_row

    def consolidate(self, layer: LayerPlan) -> None:
        """Replace the H heads by the plan's clusters (merged projections, see `cancermoe.acs`)."""
        if sum(len(c) for c in layer.clusters) != self.n_heads:
            raise ValueError(f"plan covers {sum(len(c) for c in layer.clusters)} heads, layer has {self.n_heads}")
        with torch.no_grad():
            for name in ("query", "key", "value"):
                old: nn.Linear = getattr(self, name)
                weight, bias = merge_head_rows(old.weight, old.bias, layer, self.head_dim)
                new = nn.Linear(old.in_features, weight.shape[0]).to(old.weight.device, old.weight.dtype)
                new.weight.copy_(weight)
                new.bias.copy_(bias)
                setattr(self, name, new)
            old = self.proj
            new = nn.Linear(layer.n_clusters * self.head_dim, old.out_features).to(old.weight.device, old.weight.dtype)
            new.weight.copy_(merge_output_columns(old.weight, layer, self.head_dim))
            new.bias.copy_(old.bias)
            self.proj = new
        self.n_heads = layer.n_clusters
        self.head_outputs = self.head_mask = None


class GenomicEmbedding(nn.Module):
    """Genomic pieces [B, T, piece] -> tokens [B, T, d]: a linear map of each piece plus its position embedding.

    ``shared`` (one Linear for every piece, as a ViT patch embedding) is how we first read the paper's
    "PatchEmbedding ... projected into the embedding space through a linear layer". ``per_piece`` gives
    piece position t its own Linear(piece -> d) (ours; the paper's sentence allows both): the value of
    gene j then has its own direction in token space, so even a uniform CLS attention is a full linear
    model of the genes (what an elastic-net Cox model is), where a shared map can only weigh gene j by
    its slot in the piece. `l1_norm` is the lasso penalty of `CancerMoEConfig.genomic_l1`: per gene
    with ``per_piece``, per slot with ``shared``.

    ``token_counts[t]`` counts the real genomic tokens embedded at position t, in training only (float64, not
    persistent, like `SparseMoE`'s routing counts): with each cancer at positions of its own, a federated site
    trains only its cancers' rows, and the server averages row t over the sites that fed it tokens.
    """

    def __init__(self, piece: int, d_model: int, max_tokens: int, per_piece: bool) -> None:
        super().__init__()
        self.per_piece = per_piece
        if per_piece:
            self.weight = nn.Parameter(torch.empty(max_tokens, piece, d_model))
            nn.init.uniform_(self.weight, -1 / math.sqrt(piece), 1 / math.sqrt(piece))  # nn.Linear's range
        else:
            self.linear = nn.Linear(piece, d_model)
        self.position = nn.Embedding(max_tokens, d_model)
        nn.init.normal_(self.position.weight, std=0.02)  # small next to the content embedding
        self.max_tokens = max_tokens
        self.register_buffer("token_counts", torch.zeros(max_tokens, dtype=torch.float64), persistent=False)

    def forward(self, genomics: Tensor, offset: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``offset`` [B] long: the position of each patient's first piece (its cancer's place in the
        `cancermoe.genomics.GenomicLayout`); None = every patient starts at position 0. ``mask`` [B, T] bool:
        the real pieces (None = all), which `token_counts` counts in training."""
        n_pieces = genomics.shape[1]
        positions = torch.arange(n_pieces, device=genomics.device)
        if offset is None:
            if n_pieces > self.max_tokens:
                raise ValueError(f"{n_pieces} genomic tokens exceed max_genomic_tokens {self.max_tokens}")
            content = (torch.einsum("btp,tpd->btd", genomics, self.weight[:n_pieces]) if self.per_piece
                       else self.linear(genomics))
            positions = positions[None, :].expand(genomics.shape[0], -1)
        else:
            # [B, T]; a layout fits the table (`GenomicLayout.check_fits`), so only padding slots can pass its end
            positions = (offset.to(genomics.device)[:, None] + positions[None, :]).clamp(max=self.max_tokens - 1)
            content = (torch.einsum("btp,btpd->btd", genomics, self.weight[positions]) if self.per_piece
                       else self.linear(genomics))
        if self.training:
            self._count(positions if mask is None else positions[mask.bool()])
        return content + self.position(positions)

    @torch.no_grad()
    def _count(self, positions: Tensor) -> None:
        counts = torch.bincount(positions.reshape(-1), minlength=self.max_tokens)
        self.token_counts += counts.to(self.token_counts.dtype)

    def l1_norm(self) -> Tensor:
        return (self.weight if self.per_piece else self.linear.weight).abs().sum()


class MLP(nn.Module):
    """Dense MLP d -> hidden -> d (GELU) of the blocks before the last; same call signature as `SparseMoE`."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, modality: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x)))), torch.zeros((), device=x.device)


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, config: CancerMoEConfig, mlp: nn.Module) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = Attention(config.d_model, config.n_heads, config.d_model // config.n_heads, config.dropout)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = mlp

    def forward(self, x: Tensor, modality: Tensor, mask: Tensor,
                keep_entries: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (x [B, L, d], aux_loss, CLS attention row [B, L])."""
        attended, cls_row = self.attn(self.ln_attn(x), mask, keep_entries)
        x = x + attended
        mixed, aux_loss = self.mlp(self.ln_mlp(x), modality, mask)
        return x + mixed, aux_loss, cls_row


# ---------------------------------------------------------------------------------------------------------------------
# The model


class CancerMoE(nn.Module):
    """CLS + WSI + genomic tokens -> transformer with a modality-aware SMoE -> discrete hazard logits.

    ``plan``: a `ConsolidationPlan` already applied to the weights about to be loaded (a
    consolidated checkpoint has different shapes: build with its plan, then load_state_dict).
    """

    def __init__(self, config: CancerMoEConfig, plan: ConsolidationPlan | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.wsi_embed = nn.Linear(config.feature_dim, d)
        self.genomic_embed = GenomicEmbedding(config.genomic_piece, d, config.max_genomic_tokens,
                                              per_piece=config.genomic_embedding == "per-piece")
        self.modality_embed = nn.Embedding(N_MODALITIES, d)
        nn.init.normal_(self.modality_embed.weight, std=0.02)  # small next to the content embeddings
        self.embed_dropout = nn.Dropout(config.dropout)
        blocks = []
        for index in range(config.n_layers):
            if index < config.n_layers - 1:
                mlp: nn.Module = MLP(d, config.mlp_hidden, config.dropout)
            elif config.smoe:
                mlp = SparseMoE(d, config.mlp_hidden, config.n_experts, config.top_k, N_MODALITIES,
                                config.balance_weight, config.dropout)
            else:
                mlp = DenseMLP(d, config.mlp_hidden, N_MODALITIES, config.dropout)
            blocks.append(Block(config, mlp))
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.n_bins)
        self.consolidation_plan: ConsolidationPlan | None = None
        if plan is not None:
            self.apply_consolidation(plan)

    # ---- tokens

    def embed(self, wsi: Tensor, wsi_mask: Tensor, genomics: Tensor | None, genomics_mask: Tensor | None,
              genomic_offset: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The token sequence: (x [B, L, d], modality [B, L] long, mask [B, L] bool), L = 1 + N + T."""
        batch = wsi.shape[0]
        parts = [self.cls_token.expand(batch, -1, -1), self.wsi_embed(wsi)]
        masks = [torch.ones(batch, 1, dtype=torch.bool, device=wsi.device), wsi_mask.bool()]
        modalities = [MODALITY_CLS, MODALITY_WSI]
        if self.config.use_genomics and genomics is not None and genomics.shape[1] > 0:
            if genomics_mask is None:
                genomics_mask = torch.ones(batch, genomics.shape[1], dtype=torch.bool, device=wsi.device)
            parts.append(self.genomic_embed(genomics, genomic_offset, genomics_mask))
            masks.append(genomics_mask.bool())
            modalities.append(MODALITY_GENOMICS)
        modality = torch.cat([torch.full(m.shape, kind, dtype=torch.long, device=wsi.device)
                              for m, kind in zip(masks, modalities, strict=True)], dim=1)
        x = torch.cat(parts, dim=1) + self.modality_embed(modality)
        return self.embed_dropout(x), modality, torch.cat(masks, dim=1)

    def first_cls_row(self, x: Tensor, mask: Tensor) -> Tensor:
        """The first block's CLS attention row over the whole sequence, head mean, [B, L] (one query: cheap)."""
        first = self.blocks[0]
        return first.attn(first.ln_attn(x), mask, cls_query_only=True)[1]

    def select_wsi_tokens(self, x: Tensor, modality: Tensor, mask: Tensor, n_wsi: int, kept: Tensor,
                          cls_row: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Inference sparsification: keep each sample's ``kept`` WSI tokens of highest first-block CLS attention.

        ``cls_row``: `first_cls_row` of (x, mask). Returns the shorter sequence (x, modality, mask) =
        [CLS, kept WSI tokens, genomic tokens] and, for the kept WSI slots, their index among the N
        input tokens and whether the slot is real. Only the CLS query's attention row is computed over
        all tokens; every block, the first included, then attends among the kept tokens only.
        """
        scores = cls_row[:, 1:1 + n_wsi]
        scores = scores.masked_fill(~mask[:, 1:1 + n_wsi], float("-inf"))
        slots = int(kept.max()) if kept.numel() else 0
        wsi_index = scores.topk(slots, dim=1).indices  # [B, slots], highest score first
        wsi_real = torch.arange(slots, device=x.device)[None, :] < kept[:, None]

        def take(t: Tensor, wsi_part: Tensor) -> Tensor:
            return torch.cat([t[:, :1], wsi_part, t[:, 1 + n_wsi:]], dim=1)

        picked = torch.gather(x[:, 1:1 + n_wsi], 1, wsi_index[..., None].expand(-1, -1, x.shape[-1]))
        x = take(x, picked)
        modality = take(modality, torch.full_like(wsi_index, MODALITY_WSI))
        mask = take(mask, wsi_real)
        return x, modality, mask, wsi_index, wsi_real

    # ---- forward

    def forward(self, wsi: Tensor, wsi_mask: Tensor, genomics: Tensor | None = None,
                genomics_mask: Tensor | None = None, sparse_inference: bool | None = None,
                genomic_offset: Tensor | None = None) -> ModelOutput:
        """wsi [B, N, feature_dim] float, wsi_mask [B, N] bool, genomics [B, T, genomic_piece] float,
        genomics_mask [B, T] bool (None = no genomic tokens), genomic_offset [B] long (each patient's first
        genomic token position, `GenomicEmbedding`; None = 0). A patient without a slide (wsi_mask all
        False) or without genomics still gets finite outputs: the CLS token is always a valid key.

        With ``config.acs``: in training the first block keeps (qN)^2 entries of each head's attention
        map; with sparse_inference (default: in eval mode) the network runs on the qN WSI tokens of
        highest first-block CLS attention only. Without ``config.acs`` attention is dense everywhere.
        """
        batch, n_wsi = wsi.shape[:2]
        x, modality, mask = self.embed(wsi, wsi_mask, genomics, genomics_mask, genomic_offset)
        wsi_index = torch.arange(n_wsi, device=wsi.device).expand(batch, -1)
        wsi_real = wsi_mask.bool()
        keep_entries = None
        first_row: Tensor | None = None  # first block's CLS row over all N WSI tokens, when filtering computed it
        if self.config.acs:
            n_real = wsi_real.sum(dim=1)
            kept = kept_wsi_tokens(n_real, self.config.sparsify_keep)
            filter_tokens = (not self.training) if sparse_inference is None else sparse_inference
            if filter_tokens:
                first_row = self.first_cls_row(x, mask).detach()
                x, modality, mask, wsi_index, wsi_real = self.select_wsi_tokens(x, modality, mask, n_wsi, kept,
                                                                                 first_row)
            elif bool((n_real > 0).any()):
                # A sample without WSI tokens has nothing to filter: its first block stays dense.
                keep_entries = torch.where(n_real > 0, kept * kept, x.shape[1] ** 2)
            # else: a batch without any WSI token stays dense (keep_entries None: the fused kernel)
        aux_loss = torch.zeros((), device=wsi.device)
        cls_row = x.new_zeros(x.shape[:2])
        for index, block in enumerate(self.blocks):
            x, block_aux, cls_row = block(x, modality, mask, keep_entries if index == 0 else None)
            aux_loss = aux_loss + block_aux
            if index == 0 and first_row is None:
                first_row = cls_row  # no token was filtered: the block saw all N
        slots = wsi_index.shape[1]
        cls_attention = torch.zeros(batch, n_wsi, dtype=cls_row.dtype, device=wsi.device)
        cls_attention.scatter_(1, wsi_index, cls_row[:, 1:1 + slots] * wsi_real)
        assert first_row is not None  # n_layers >= 1
        first_cls_attention = first_row[:, 1:1 + n_wsi] * wsi_mask.bool()
        hazard_logits = self.head(self.ln_final(x[:, 0]))
        return ModelOutput(hazard_logits, aux_loss, cls_attention, first_cls_attention, self.config.dps_score)

    # ---- ACS

    def enable_head_stats(self, enabled: bool = True) -> None:
        """Keep every block's head outputs and their gradients for `collect_head_stats` (costs memory)."""
        for block in self.blocks:
            block.attn.record_head_outputs = enabled
            block.attn.head_outputs = block.attn.head_mask = None

    def collect_head_stats(self, loss_scale: float | None = None) -> HeadStats:
        """Head statistics of the last batch; call after ``loss.backward()`` with head stats enabled.

        ``loss_scale``: how many samples the backward loss averaged over (default: this forward's
        batch; with gradient accumulation, the whole optimizer batch). See
        `cancermoe.acs.head_statistics`. Returns this batch's sums; add them up with ``+``.
        """
        importance, similarity = [], []
        batch = None
        for index, block in enumerate(self.blocks):
            outputs = block.attn.head_outputs
            if outputs is None or outputs.grad is None or block.attn.head_mask is None:
                raise RuntimeError(f"block {index} has no head outputs with gradients: call enable_head_stats(), "
                                   "run a training forward pass, then loss.backward()")
            batch = outputs.shape[0]
            scale = batch if loss_scale is None else loss_scale
            imp, sim = head_statistics(outputs, outputs.grad, block.attn.head_mask, loss_scale=scale)
            importance.append(imp)
            similarity.append(sim)
            block.attn.head_outputs = block.attn.head_mask = None
        return HeadStats(importance, similarity, int(batch or 0))

    def apply_consolidation(self, plan: ConsolidationPlan) -> None:
        """Merge every block's heads into the plan's clusters, in place.

        Parameters are replaced: rebuild the optimizer afterwards. Refused (ValueError) when
        ``config.acs`` is off (the "w/o ACS" ablation keeps vanilla attention), when the model is
        already consolidated, or when the plan does not fit this model.
        """
        if not self.config.acs:
            raise ValueError("attention consolidation is off (config.acs = false)")
        if self.consolidation_plan is not None:
            raise ValueError("the model is already consolidated")
        if plan.n_heads != self.config.n_heads or len(plan.layers) != len(self.blocks):
            raise ValueError(f"plan for {len(plan.layers)} layers x {plan.n_heads} heads does not fit "
                             f"{len(self.blocks)} layers x {self.config.n_heads} heads")
        for block, layer in zip(self.blocks, plan.layers, strict=True):
            block.attn.consolidate(layer)
        self.consolidation_plan = plan

    # ---- SMoE routing statistics

    def routing_counts(self) -> Tensor:
        """Real tokens routed per (modality, expert) by the last block since the last reset, [N_MODALITIES, E]."""
        return self.blocks[-1].mlp.routing_counts

    def reset_routing_counts(self) -> None:
        """Zero the SMoE routing counts and the genomic token counts (both are per-round statistics)."""
        self.blocks[-1].mlp.reset_routing_counts()
        self.genomic_embed.token_counts.zero_()

    def genomic_token_counts(self) -> Tensor:
        """Real genomic tokens embedded per piece position since the last reset, [max_genomic_tokens] float64."""
        return self.genomic_embed.token_counts


# ---------------------------------------------------------------------------------------------------------------------
# Size and cost


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass (2 per multiply-add, matrix products only, as torch's FlopCounterMode counts)."""

    total: int
    attention: int  # inside the blocks' attention modules: q/k/v/output projections and the two attention products


def count_flops(model: CancerMoE, **inputs: Tensor | None) -> FlopCount:
    """Count the FLOPs of ``model(**inputs)`` (no gradient) in the model's current mode."""
    attention_modules = [m for m in model.modules() if isinstance(m, Attention)]
    for module in attention_modules:
        module.fused = False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
    finally:
        for module in attention_modules:
            module.fused = True
    per_module = counter.get_flop_counts()
    # A module's count includes its children's, so the attention modules' own entries are the whole story.
    attention = sum(sum(ops.values()) for name, ops in per_module.items() if name.endswith(".attn"))
    return FlopCount(total=counter.get_total_flops(), attention=attention)
