"""Against full-bag attention MIL: one training step of ABMIL over the whole slide vs CancerMoE with DPS.

Both train on the same bank: one patient with one slide of 50k patches (random
float16 features, D = 1024) and 64 genomic values; a batch of one patient (ABMIL's
usual setting).

- ABMIL (``bench/abmil.py``, gated attention, CLAM/PORPOISE "small" sizes): a step
  reads ALL rows of the slide from the bank, in blocks, into one float32 bag,
  then forward (softmax over every patch), survival loss, backward, Adam step.
  Reading the whole bag each step is the baseline's real cost: a cohort's bags do
  not fit in memory, so CLAM-style training loads each slide's features per step.
- CancerMoE: the real `SiteTrainer` step of ``bench/model_memory.py`` (DPS
  selection, reading N = 3072 rows, forward, backward, optimizer step), default
  config, genomics included.

Measured side by side in one run, each model in a fresh process: cold step (the
first), step time (median of ``--steps`` after it), peak RSS during those steps
and its growth over the RSS at their start; ratios ABMIL / CancerMoE.

    python bench/vs_abmil.py [--patches 50000] [--tokens 3072] [--feature-dim 1024]
                             [--steps 3] [--threads 2] [--workdir DIR]

CancerMoE's step holds attention maps of 8 * L^2 * 4 bytes (L ~ 3100: ~300 MB
each) for backward, so at 50k patches it is not expected to use less memory
than ABMIL; what it buys is a cost that stays flat as slides grow (see
``bench/model_memory.py``) while ABMIL's grows with every patch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from model_memory import cached_bank, measure_cancermoe, measure_steps, print_table, ratio, run_child, size_label

from cancermoe.bank import Bank, Patient, open_bank

if TYPE_CHECKING:
    import torch

# torch, the model and the loss are imported inside the measuring functions, which run in the
# child processes only (as in bench/model_memory.py): the parent stays light.

# PORPOISE's optimizer settings for its attention-MIL baseline.
ABMIL_LR = 2e-4
ABMIL_WEIGHT_DECAY = 1e-5


def read_bag(bank: Bank, patient: Patient) -> torch.Tensor:
    """Every patch feature of the patient's slides, float32 [n, D], read block by block into one array."""
    import torch

    n_total = sum(bank.n_patches(slide_id) for slide_id in patient.slide_ids)
    bag = np.empty((n_total, bank.feature_dim), dtype=np.float32)
    at = 0
    for slide_id in patient.slide_ids:
        for block in bank.iter_feature_blocks(slide_id):
            bag[at:at + len(block)] = block
            at += len(block)
    return torch.from_numpy(bag)


def measure_abmil(bank_path: Path, steps: int, threads: int) -> dict[str, float]:
    """Child process: ABMIL training steps on the bank's first patient, whole bag read every step."""
    import torch
    from abmil import ABMIL

    from cancermoe.survival import nll_survival_loss

    os.environ["OMP_NUM_THREADS"] = str(threads)  # SiteTrainer keeps the thread count it is given
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with open_bank(bank_path) as bank:
        patient = bank.patients[0]
        model = ABMIL(feature_dim=bank.feature_dim)
        optimizer = torch.optim.Adam(model.parameters(), lr=ABMIL_LR, weight_decay=ABMIL_WEIGHT_DECAY)
        # Which bin the patient falls in changes nothing of the cost: bin 0.
        time_bin = torch.zeros(1, dtype=torch.long)
        censorship = torch.tensor([float(patient.censorship)])

        def step() -> None:
            model.train()
            hazard_logits, _ = model(read_bag(bank, patient))
            loss = nll_survival_loss(hazard_logits, time_bin, censorship)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        result = measure_steps(step, steps)
        result["rows_read"] = sum(bank.n_patches(slide_id) for slide_id in patient.slide_ids)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=50_000, help="patches of the slide")
    parser.add_argument("--tokens", type=int, default=3072, help="N: WSI tokens CancerMoE selects")
    parser.add_argument("--feature-dim", type=int, default=1024)
    parser.add_argument("--genomic-features", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one cold step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-bench-model")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, path = args.child
        if model == "abmil":
            result = measure_abmil(Path(path), args.steps, args.threads)
        else:
            result = measure_cancermoe(Path(path), args.tokens, args.steps, args.threads)
        print(json.dumps(result))
        return

    path = cached_bank(args.workdir, 1, args.patches, args.feature_dim, args.genomic_features)
    child_args = ["--tokens", str(args.tokens), "--steps", str(args.steps)]
    results = {model: run_child(__file__, [model, str(path), *child_args], args.threads)
               for model in ("abmil", "cancermoe")}

    abmil, cmoe = results["abmil"], results["cancermoe"]
    print(f"one training step, 1 patient, slide of {size_label(args.patches)} patches, D = {args.feature_dim}, "
          f"{args.threads} threads (step: median of {args.steps}); ABMIL reads all {abmil['rows_read']:.0f} rows, "
          f"CancerMoE {cmoe['rows_read']:.0f}:")
    print_table({"ABMIL": abmil, "CancerMoE": cmoe}, "model")
    print(f"ratio ABMIL/CancerMoE: step time {ratio(abmil['seconds'], cmoe['seconds']):.2f}, "
          f"peak RSS {ratio(abmil['peak_mib'], cmoe['peak_mib']):.2f}, "
          f"step growth {ratio(abmil['growth_mib'], cmoe['growth_mib']):.2f}, "
          f"rows read {ratio(abmil['rows_read'], cmoe['rows_read']):.1f}")


if __name__ == "__main__":
    main()
