"""Cost at the paper's configuration: parameters and inference FLOPs of one patient.

One patient at inference: N = 3072 WSI tokens of D = 1024 and a genomic vector
of 2181 values (the size of TCGA-BLCA's), default config otherwise (d 32, 8
heads, 2 layers, SMoE in the last). Three models, counted side by side:

(a) CancerMoE as trained: heads consolidated (ratio 0.5, so 4 of 8 heads per
    layer) and sparse inference (eval mode with ACS: the first block's CLS
    attention keeps qN = 8% of the WSI tokens, the whole network runs on those);
(b) the same without consolidation (8 heads), sparse inference;
(c) a dense transformer of the same size: no ACS (all N tokens, all heads) and
    the dense MLP in place of the SMoE (``acs = false, smoe = false``).

Counted with torch's FlopCounterMode (`cancermoe.model.count_flops`): matrix
products only, 2 FLOPs per multiply-add. Papers that count with thop/fvcore
report multiply-adds as "FLOPs", so our GFLOPs / 2 is the figure to set beside
the paper's 0.170; both are printed.

The consolidation plan comes from `compute_consolidation_plan` on head
statistics filled from a seeded generator: the parameter and FLOP counts only
depend on how many clusters a layer has, not on which heads merge.

    python bench/model_cost.py [--tokens 3072] [--genomic-features 2181] [--feature-dim 1024]
                               [--consolidation-ratio 0.5] [--threads 2]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from cancermoe.acs import ConsolidationPlan, HeadStats, compute_consolidation_plan
from cancermoe.config import CancerMoEConfig
from cancermoe.model import CancerMoE, count_flops, count_parameters, genomic_pieces

PAPER_PARAMS_M = 0.446
PAPER_GFLOPS = 0.170


@dataclass
class Cost:
    params: int
    gflops: float  # 2 FLOPs per multiply-add
    attention_gflops: float
    attention_gflops_by_layer: list[float]


def patient_inputs(config: CancerMoEConfig, genomic_features: int) -> dict[str, Tensor]:
    """One patient: N random WSI features (all real) and a random genomic vector cut into tokens."""
    generator = torch.Generator().manual_seed(0)
    wsi = torch.randn(1, config.tokens, config.feature_dim, generator=generator)
    genomics = genomic_pieces(torch.randn(genomic_features, generator=generator), config.genomic_piece)[None]
    return {"wsi": wsi, "wsi_mask": torch.ones(1, config.tokens, dtype=torch.bool), "genomics": genomics,
            "genomics_mask": None}


def seeded_plan(config: CancerMoEConfig, ratio: float, seed: int = 0) -> ConsolidationPlan:
    """A plan from made-up but valid head statistics (importance > 0, cosine similarities of random vectors)."""
    rng = np.random.default_rng(seed)
    stats = HeadStats.zeros(config.n_layers, config.n_heads)
    for layer in range(config.n_layers):
        stats.importance_sum[layer] = rng.random(config.n_heads)
        directions = rng.standard_normal((config.n_heads, 16))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        stats.similarity_sum[layer] = directions @ directions.T
    stats.n_samples = 1
    return compute_consolidation_plan(stats, ratio)


def attention_flops_by_layer(model: CancerMoE, inputs: dict[str, Tensor]) -> list[int]:
    """FLOPs inside each block's attention module (projections + the two attention products)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    per_module = counter.get_flop_counts()
    return [sum(per_module.get(f"CancerMoE.blocks.{i}.attn", {}).values()) for i in range(len(model.blocks))]


def inference_cost(model: CancerMoE, inputs: dict[str, Tensor]) -> Cost:
    model.eval()
    flops = count_flops(model, **inputs)
    by_layer = attention_flops_by_layer(model, inputs)
    return Cost(count_parameters(model), flops.total / 1e9, flops.attention / 1e9, [f / 1e9 for f in by_layer])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3072, help="N: WSI tokens of the patient")
    parser.add_argument("--genomic-features", type=int, default=2181, help="genomic values (TCGA-BLCA: 2181)")
    parser.add_argument("--feature-dim", type=int, default=1024)
    parser.add_argument("--consolidation-ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = CancerMoEConfig(feature_dim=args.feature_dim, tokens=args.tokens,
                             consolidation_ratio=args.consolidation_ratio)
    inputs = patient_inputs(config, args.genomic_features)
    torch.manual_seed(0)
    costs = {
        "(a) CancerMoE, consolidated + sparse": inference_cost(
            CancerMoE(config, plan=seeded_plan(config, args.consolidation_ratio)), inputs),
        "(b) CancerMoE, sparse only": inference_cost(CancerMoE(config), inputs),
        "(c) dense transformer": inference_cost(CancerMoE(config.replace(acs=False, smoe=False)), inputs),
    }

    n_genomic_tokens = inputs["genomics"].shape[1]
    print(f"inference cost of one patient: N = {args.tokens} WSI tokens (D = {args.feature_dim}), "
          f"{args.genomic_features} genomic values = {n_genomic_tokens} tokens, d = {config.d_model}, "
          f"{config.n_heads} heads, {config.n_layers} layers; FLOPs = 2 per multiply-add (torch's count)")
    print(f"{'model':<38} {'params M':>9} {'GFLOPs':>8} {'GMACs':>8} {'attn GFLOPs':>12} {'x dense':>8}")
    dense = costs["(c) dense transformer"]
    for name, cost in costs.items():
        print(f"{name:<38} {cost.params / 1e6:>9.3f} {cost.gflops:>8.3f} {cost.gflops / 2:>8.3f} "
              f"{cost.attention_gflops:>12.3f} {cost.gflops / dense.gflops:>8.3f}")
    print(f"{'paper, as reported':<38} {PAPER_PARAMS_M:>9.3f} {PAPER_GFLOPS:>8.3f}   (its FLOP convention is not "
          "stated; thop/fvcore-style counts are multiply-adds: compare with GMACs)")

    ours, unconsolidated = costs["(a) CancerMoE, consolidated + sparse"], costs["(b) CancerMoE, sparse only"]
    print(f"ratio vs dense: (a) params {ours.params / dense.params:.3f}, GFLOPs {ours.gflops / dense.gflops:.4f}; "
          f"(b) params {unconsolidated.params / dense.params:.3f}, GFLOPs {unconsolidated.gflops / dense.gflops:.4f}")
    print(f"ratio ours/paper: params {ours.params / 1e6 / PAPER_PARAMS_M:.2f}, "
          f"GFLOPs {ours.gflops / PAPER_GFLOPS:.2f} (GMACs {ours.gflops / 2 / PAPER_GFLOPS:.2f})")
    for layer, (a, b) in enumerate(zip(ours.attention_gflops_by_layer, unconsolidated.attention_gflops_by_layer,
                                       strict=True)):
        print(f"attention of layer {layer}: consolidated {a:.4f} GFLOPs vs unconsolidated {b:.4f} "
              f"(ratio {a / b:.3f}, {b - a:.4f} GFLOPs saved)")


if __name__ == "__main__":
    main()
