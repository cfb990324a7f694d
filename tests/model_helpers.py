"""Small models and batches shared by the model and ACS tests."""

from __future__ import annotations

import torch

from cancermoe.config import CancerMoEConfig
from cancermoe.model import CancerMoE

FEATURES = 16


def small_config(**changes) -> CancerMoEConfig:
    base = CancerMoEConfig(feature_dim=FEATURES, tokens=32, dropout=0.0, max_genomic_tokens=16)
    return base.replace(**changes)


def make_batch(batch: int = 3, n_wsi: int = 32, n_pieces: int = 5, seed: int = 0,
               padded_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs; the first sample's last ``padded_tokens`` WSI tokens are padding."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "wsi": torch.randn(batch, n_wsi, FEATURES, generator=g),
        "wsi_mask": torch.ones(batch, n_wsi, dtype=torch.bool),
        "genomics": torch.randn(batch, n_pieces, 8, generator=g),
        "genomics_mask": torch.ones(batch, n_pieces, dtype=torch.bool),
    }
    if padded_tokens:
        out["wsi_mask"][0, n_wsi - padded_tokens:] = False
    return out


def build(config: CancerMoEConfig, seed: int = 0) -> CancerMoE:
    torch.manual_seed(seed)
    return CancerMoE(config)
