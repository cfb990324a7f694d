"""Memory independence: does a CancerMoE training step cost the same on a 10k- and a 500k-patch slide?

A step is what `SiteTrainer` does for one batch, run through its own code
(`SiteTrainer._train_batches` on a cohort of exactly B patients): DPS selection
(key tokens from the score cache, KD-tree neighbourhoods, the unseen draw),
reading the N selected rows of each slide from the bank, forward, survival
loss, backward (with the ACS head statistics of the first epochs), optimizer
step, and staging the new token scores. Model: the default config (feature_dim
1024, d 32, 8 heads, SMoE, ACS sparsification), N = 3072 tokens.

Measured side by side in one run, each slide size in a fresh process:

- cold step: the first step, which also builds the slide's KD-tree and loads its
  score-cache entry (a real epoch pays this again whenever a slide has left the
  selector's tree cache);
- step: median of ``--steps`` steps after that one;
- peak RSS: the process's resident-memory high-water mark during those steps;
- step growth: that peak minus the RSS at their start (the step's working memory).

The ratios large/small should all be near 1 (goal <= 1.2): the step reads N rows
and never touches a slide whole, so only the per-slide bookkeeping (coords,
KD-tree, scores: tens of bytes a patch) grows with the slide.

    python bench/model_memory.py [--patches 10000 500000] [--tokens 3072] [--batch 2]
                                 [--feature-dim 1024] [--steps 3] [--threads 2] [--workdir DIR]

The banks (B patients, one slide each, random float16 features on a square grid,
64 genomic values a patient) are generated once per workdir and reused; the
500k-patch bank is ~1 GB a patient at D = 1024.

Memory: at L = 1 + N + genomic tokens ~ 3100, one attention map of the batch is
B * 8 * L^2 * 4 bytes (~630 MB at B = 2) and autograd keeps several, so expect a
few GB per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from bank_read import grid_coords

from cancermoe.bank import BankWriter, curve_order

if TYPE_CHECKING:
    from cancermoe.train import SiteTrainer

# torch and the trainer are imported inside the measuring functions, which run in the child
# processes only: the parent just writes banks and starts children, and stays light (and quick).

CANCER = "BENCH"
BLOCK_ROWS = 65536  # rows generated and written at a time: bounded memory for any slide size

# --------------------------------------------------------------------------- banks


def size_label(n: int) -> str:
    """10000 -> '10k', 500000 -> '500k', 1000000 -> '1M', 2000 -> '2k'."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def make_bank(path: Path, n_patients: int, n_patches: int, feature_dim: int, genomic_features: int) -> None:
    """``n_patients`` patients, each with one slide of ``n_patches`` (random float16, streamed) and genomics."""
    coords = grid_coords(n_patches)
    order = curve_order(coords)
    rng = np.random.default_rng(0)
    with BankWriter(path, feature_dim=feature_dim, source="bench", overwrite=True) as writer:
        writer.set_genomic_features(CANCER, [f"gene{i}" for i in range(genomic_features)])
        for p in range(n_patients):
            blocks = (rng.standard_normal((min(BLOCK_ROWS, n_patches - i), feature_dim), dtype=np.float32)
                      for i in range(0, n_patches, BLOCK_ROWS))
            writer.add_slide_blocks(f"slide{p}", coords[order], blocks, source_row=order)
            # Survival times of 6, 18, 30... months, every other patient censored: both loss terms are used.
            writer.add_patient(f"case{p}", CANCER, 6.0 + 12.0 * p, p % 2, [f"slide{p}"],
                               genomics=rng.standard_normal(genomic_features).astype(np.float32))


def cached_bank(workdir: Path, n_patients: int, n_patches: int, feature_dim: int, genomic_features: int) -> Path:
    """The bank for these sizes in ``workdir``, generated on first use."""
    path = workdir / f"patients{n_patients}-slide{size_label(n_patches)}-d{feature_dim}-g{genomic_features}.h5"
    if not path.exists():
        print(f"writing {path} ({n_patients} x {n_patches} patches x {feature_dim})", file=sys.stderr)
        workdir.mkdir(parents=True, exist_ok=True)
        make_bank(path, n_patients, n_patches, feature_dim, genomic_features)
    return path


# --------------------------------------------------------------------------- measuring (in a child process)


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS: now, VmHWM: high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_steps(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Time one cold step, then ``steps`` more with the RSS high-water mark reset before them."""
    start = time.perf_counter()
    step()
    cold = time.perf_counter() - start
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = rss_kib("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = rss_kib("VmHWM")
    return {"cold_seconds": cold, "seconds": statistics.median(times), "peak_mib": peak / 1024,
            "growth_mib": (peak - base) / 1024}


def build_trainer(bank_path: Path, tokens: int, workdir: Path) -> SiteTrainer:
    """A `SiteTrainer` on every patient of the bank, all in one batch; default config otherwise."""
    from cancermoe.cohort import open_cohort
    from cancermoe.config import CancerMoEConfig
    from cancermoe.survival import time_bin_edges
    from cancermoe.train import SiteTrainer

    cohort = open_cohort([bank_path])
    config = CancerMoEConfig(feature_dim=cohort.banks()[0].feature_dim, tokens=tokens, batch_size=len(cohort))
    edges = time_bin_edges(cohort.survival_months, cohort.censorship, config.n_bins)
    return SiteTrainer(config, cohort, edges=edges, workdir=workdir)


def training_step(trainer: SiteTrainer) -> None:
    """One optimizer step over the trainer's cohort (one batch), set up as `SiteTrainer.train_epoch` does."""
    trainer.model.train()
    trainer.model.enable_head_stats(trainer.collecting_head_stats())
    patients = np.arange(len(trainer.cohort))
    risk = np.full(len(trainer.cohort), np.nan)
    trainer._train_batches(trainer.model, patients, risk, on_batch=None)


def measure_cancermoe(bank_path: Path, tokens: int, steps: int, threads: int) -> dict[str, float]:
    """Child process: CancerMoE training steps on the bank's patients (one batch), score caches in a temp dir."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)  # SiteTrainer keeps the thread count it is given
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="cmoe-bench-") as scratch:
        trainer = build_trainer(bank_path, tokens, Path(scratch))
        result = measure_steps(lambda: training_step(trainer), steps)
        for bank in trainer.cohort.banks():
            bank.close()
    result["rows_read"] = tokens * len(trainer.cohort)
    return result


def run_child(script: str, child_args: list[str], threads: int) -> dict[str, float]:
    """Run ``script --child ...`` in a fresh process and return the JSON it prints last."""
    command = [sys.executable, script, "--threads", str(threads), "--child", *child_args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"measuring process failed ({' '.join(command)}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def print_table(results: dict[str, dict[str, float]], first_column: str) -> None:
    print(f"{first_column:>10} {'cold step s':>12} {'step s':>10} {'peak RSS MiB':>13} {'growth MiB':>11}")
    for label, r in results.items():
        print(f"{label:>10} {r['cold_seconds']:>12.3f} {r['seconds']:>10.3f} {r['peak_mib']:>13.1f} "
              f"{r['growth_mib']:>11.1f}")


def ratio(a: float, b: float) -> float:
    return a / max(b, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, nargs=2, default=[10_000, 500_000], metavar=("SMALL", "LARGE"),
                        help="patches per slide of the two cases")
    parser.add_argument("--tokens", type=int, default=3072, help="N: WSI tokens selected per patient")
    parser.add_argument("--batch", type=int, default=2, help="patients per step (each with one slide)")
    parser.add_argument("--feature-dim", type=int, default=1024)
    parser.add_argument("--genomic-features", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one cold step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-bench-model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_cancermoe(Path(args.child), args.tokens, args.steps, args.threads)))
        return

    results = {}
    for n in args.patches:
        path = cached_bank(args.workdir, args.batch, n, args.feature_dim, args.genomic_features)
        results[size_label(n)] = run_child(__file__, [str(path), "--tokens", str(args.tokens), "--steps",
                                                      str(args.steps)], args.threads)

    small, large = (results[size_label(n)] for n in args.patches)
    print(f"CancerMoE training step: B = {args.batch} patients, N = {args.tokens} tokens each, "
          f"D = {args.feature_dim}, {args.genomic_features} genomic values, {args.threads} threads "
          f"(step: median of {args.steps}):")
    print_table(results, "slide")
    label = f"{size_label(args.patches[1])}/{size_label(args.patches[0])}"
    print(f"ratio {label}: step time {ratio(large['seconds'], small['seconds']):.2f}, "
          f"peak RSS {ratio(large['peak_mib'], small['peak_mib']):.2f} (goal <= 1.2 for both)")
    print(f"ratio {label}: cold step time {ratio(large['cold_seconds'], small['cold_seconds']):.2f}, "
          f"step growth {ratio(large['growth_mib'], small['growth_mib']):.2f}")


if __name__ == "__main__":
    main()
