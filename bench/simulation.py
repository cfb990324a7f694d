"""Simulating many sites: seconds per site-round of `cmoe-simulate` (Flower's Ray simulation) on this machine.

One synthetic world split into ``--sites`` sites (`simulate.sites.WorldSplit`: Dirichlet(``--alpha``) cancer
mixes over BRCA/KIRC/LUAD, log-normal sizes around ``--patients-per-site``), banks written once into
``--workdir``/banks and given to ``cmoe-simulate`` as one site per bank; a small model (D = 16, N = 32 tokens,
batch 8, 30-patch slides, 8 genomic features: the test suite's SMALL_MODEL); ``--rounds`` rounds of one local
epoch; local Ray limited to ``--cpus`` CPUs; one run per ``--cpus-per-site`` value, each in its own process
and workdir, side by side. Every run is the whole job: the real ServerApp job (strategy, aggregation,
evaluation, checkpoints, MLflow in a sqlite file, the final models registered) and the real ClientApp.

Printed: one markdown table (ready for the README), a row per run: the command's wall time split into before
round 1 (Ray and its workers started, round 0), the rounds (every site trains and evaluates, the coordinator
aggregates, checkpoints and logs each round to MLflow) and after (final models and MLflow artifacts), and
seconds per site-round = the rounds' time / (sites x rounds); the 1-minute load average before and after each
run, since the machine may be shared.

    python bench/simulation.py [--sites 100] [--rounds 5] [--cpus 2] [--cpus-per-site 1 0.5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import Table, exit_on_input_error

from simulate.sites import WorldSplit, write_world_banks

SMALL_MODEL = ["tokens=32", "batch_size=8", "sparsify_keep=0.25"]
TIMING = re.compile(r"(\d+) sites x (\d+) rounds: ([\d.]+) s wall = ([\d.]+) s before round 1 \(banks, Ray, round 0\) "
                    r"\+ ([\d.]+) s of rounds \+ ([\d.]+) s after; ([\d.]+) s per site-round")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def run(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cmoe-bench-simulate-")).resolve()
    split = WorldSplit(sites=args.sites, alpha=args.alpha, mean_patients=args.patients_per_site, patches=args.patches,
                       feature_dim=16, genomic_features=8, seed=args.seed)
    started = time.monotonic()
    sites = write_world_banks(split, workdir / "banks", workdir)
    banks_seconds = time.monotonic() - started
    sizes = split.draw()[0]
    log(f"{len(sites)} banks in {workdir / 'banks'} ({banks_seconds:.1f} s; {int(sizes.sum())} patients)")
    table = Table(f"cmoe-simulate: {args.sites} sites x {args.rounds} rounds, small model, local Ray on "
                  f"{args.cpus:g} CPUs ({os.cpu_count()} cores on the machine)",
                  ["CPU per site", "wall s", "before round 1 s", "rounds s", "after s", "s per site-round",
                   "load before / after"])
    for per_site in args.cpus_per_site:
        job = workdir / f"job-{per_site:g}"
        shutil.rmtree(job, ignore_errors=True)
        command = [sys.executable, "-c", "from simulate.cli import main; main()",
                   *[str(s.bank) for s in sites], "--rounds", str(args.rounds), "--cpus", f"{args.cpus:g}",
                   "--cpus-per-site", f"{per_site:g}", "--workdir", str(job),
                   *[f"--set={s}" for s in SMALL_MODEL], "--set=local_epochs=1"]
        before = load()
        log(f"running {args.sites} sites x {args.rounds} rounds, {per_site:g} CPU per site (load {before})")
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"})
        (job / "stdout.txt").write_text(done.stdout)
        (job / "stderr.txt").write_text(done.stderr)
        if done.returncode != 0:
            raise SystemExit(f"cmoe-simulate failed ({done.returncode}):\n{done.stderr[-3000:]}")
        timing = TIMING.search(done.stdout)
        if timing is None:
            raise SystemExit(f"no timing line in cmoe-simulate's output:\n{done.stdout[-3000:]}")
        _, _, wall, setup, rounds, after, per_site_round = timing.groups()
        table.rows.append([f"{per_site:g}", wall, setup, rounds, after, per_site_round, f"{before} / {load()}"])
        log(done.stdout.splitlines()[-1] if done.stdout else "")
    table.seconds = time.monotonic() - started
    table.notes.append(f"Banks: {args.sites} written in {banks_seconds:.1f} s ({int(sizes.sum())} patients, "
                       f"{int(sizes.min())}-{int(sizes.max())} a site, alpha {args.alpha:g}), once, before the "
                       "runs. Load: the 1-minute load average.")
    print(table.markdown())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpus", type=float, default=2)
    parser.add_argument("--cpus-per-site", type=float, nargs="+", default=[1.0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--patients-per-site", type=float, default=40)
    parser.add_argument("--patches", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Banks and jobs (default: a new temporary folder).")
    args = parser.parse_args()
    exit_on_input_error(lambda: run(args))


if __name__ == "__main__":
    main()
