"""The full-bag baseline: gated-attention MIL (ABMIL) for survival, as CLAM and PORPOISE use it.

Ilse et al. 2018, "Attention-based deep multiple instance learning", with the
gated attention of CLAM / PORPOISE's AMIL ("small" size)::

    h_i = ReLU(W_fc x_i)                                  x_i: one patch feature [feature_dim], h_i [hidden]
    a_i = w^T (tanh(V h_i) * sigmoid(U h_i))              one score per patch
    alpha = softmax(a) over ALL patches of the bag        so the whole bag must be in memory
    z = sum_i alpha_i h_i                                 the slide embedding [hidden]
    hazard logits = W_out z                               [n_bins], trained with `nll_survival_loss`

PORPOISE's AMIL adds a second Linear + ReLU (``rho``) between pooling and the
classifier; it is left out here, as it costs nothing next to the per-patch work.
Used by ``bench/vs_abmil.py`` as what CancerMoE's dynamic patch selection is
measured against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedAttention(nn.Module):
    """a_i = w^T (tanh(V h_i) * sigmoid(U h_i)): one unnormalised attention score per patch."""

    def __init__(self, hidden: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.sigmoid_branch = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        """h [n, hidden] -> scores [n]."""
        return self.score(self.tanh_branch(h) * self.sigmoid_branch(h)).squeeze(-1)


class ABMIL(nn.Module):
    """One bag (all patches of a patient's slides) -> discrete hazard logits.

    Sizes default to CLAM/PORPOISE "small": 1024 -> 256, attention 256, dropout 0.25.
    """

    def __init__(self, feature_dim: int = 1024, hidden: int = 256, attention_dim: int = 256, n_bins: int = 4,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attention_dim, dropout)
        self.head = nn.Linear(hidden, n_bins)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [n, feature_dim] -> (hazard logits [1, n_bins], attention weights alpha [n])."""
        h = self.embed(features)
        alpha = torch.softmax(self.attention(h), dim=0)
        pooled = alpha @ h  # [hidden]
        return self.head(pooled)[None], alpha
