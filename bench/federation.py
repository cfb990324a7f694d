"""Federation: is it as good as pooling the data, better than each site alone, and what does a round cost?

One synthetic world (`cancermoe.synthetic`), three hospitals with different
cancer mixes (non-IID) and a fourth, held-out test site D of the same world
with all three cancers, so every method is scored on the same unseen patients:

    site A: BRCA, LUAD     site B: LUAD, KIRC     site C: BRCA, KIRC     test site D: BRCA, KIRC, LUAD

Four sections, each one printed markdown table (ready for the README):

1. ``quality``: the c-index on site D, per cancer, their mean and the
   stratified c-index (Harrell pairs formed within a cancer, summed over
   cancers), of
   (a) federated training with load-aware aggregation and (b) with FedAvg, both
       through the real server `Job` (strategy, aggregation, MLflow,
       checkpoints) and the real ClientApp handlers, called in this process
       by `InProcessGrid` instead of over a SuperLink;
   (c) centralized training on the pooled patients of A + B + C
       (`cancermoe.experiment.fit`, what `cmoe-train` runs);
   (d) each site alone (A, then B, then C).
   Every row trains on the same patients: each site's training split, the
   patients a federated site trains on (`client.site.split_site`: the other
   ``eval_fraction`` are kept for the federation's own per-round evaluation).
   Every row has the same config, seed and epoch budget: rounds x local epochs
   = centralized epochs, and attention is consolidated at the same point of
   that budget (after round ``consolidate_round`` = after epoch
   ``consolidate_round x local_epochs``). Survival time bins come from the
   training patients' deaths (federated: quartiles of the summed per-site
   histograms, on a 0.5-month grid). Every final model file (``model.pt``:
   config, time bins, plan, weights) is loaded the same way and predicts site
   D. A site alone still predicts the cancer it never saw: the point of
   federating is that it need not. The oracle row is the true log-hazard each
   patient was drawn with: the best any model can do on D.
2. ``cost``: one real loopback federation, a SuperLink (``cmoe-server``) and
   three SuperNodes (``cmoe-client``), insecure, ``--cost-rounds`` rounds of the
   same config. Per round (from the job's ``progress.jsonl``): the training
   payload down + up (`server.strategy.payload_bytes`: arrays' bytes, 8 per
   metric or config value) against the floor 2 x model bytes x sites (every
   site must receive the model and send one back), and the round's wall time
   (the coordinator's push of the round's messages to the end of its
   aggregation: one exchange, which also carries the previous round's
   evaluation) against the slowest site's local work (``work-seconds``: each
   site's wall time for the whole message, evaluation and training included)
   and against its training alone (the ratio the README reported before).
   Below the table, Flower's own accounting of the run, read from the
   SuperLink's state file (``superlink.db``, the ``bytes_sent`` /
   ``bytes_recv`` / ``clientapp_runtime`` that ``flwr list`` reports as
   network-traffic and compute-time; the SuperLink is gone once ``cmoe-server``
   returns, so it cannot be asked).

3. ``tcga-sites``: the real TCGA-BLCA table split by tissue-source site (see its function).
4. ``ranking`` (issue 10, part 3): a world where federation matters, many small non-IID sites (per seed s:
   `simulate.sites.WorldSplit` of world seed ``--world-seed`` + s into ``--rank-sites`` sites, Dirichlet
   ``--rank-alpha`` cancer mixes, log-normal sizes), each keeping ``--rank-eval-fraction`` held out. Every
   method, same config, same training seed s and epoch budget, is scored on all sites' held-out patients
   pooled (pairs within a cancer, across sites): federated load-aware, FedAvg, FedProx (FedAvg + the proximal
   term, ``--rank-proximal-mu``), load-aware-cls, FedAvg with a server learning rate (``--rank-server-lr``),
   FedAvgM (``--rank-server-momentum``), FedAdam (``--rank-adam-lr``), FedAdam over sites running plain SGD
   (``--rank-site-sgd-lr``), centralized on the pooled training patients, each site alone (the mean
   over sites of each site's own model) and the oracle. One table: per method the c-index of each seed,
   mean +- sd and the 95% t-interval of the mean; then the per-seed paired differences against FedAvg and
   (federated rules) against pooled, with theirs. Each (seed, method) result is a JSON file under
   ``WORKDIR/ranking/<digest of the setting>/``: a rerun (or an interrupted one) trains only what is missing.

Where a round's time goes beyond the sites' work (README, "Federation"): the
transport of the model down and the weights up (Flower objects, each a request
to the SuperLink; the weights travel packed as one array, `fedcommon.packing`,
8 objects a message instead of ~92), the SuperNode's idle poll (0.5 s,
`client.supernode`), the executor's claim of the task (0.05 s,
`client.executor`: one long-lived process per site, no process start per
message) and the coordinator's pull of the replies (0.1 s, `server.exchange`).
Before issue 10 a round was two exchanges, each crossing Flower's fixed 3 s
polls and starting a fresh ``flwr-clientapp`` process per message.

    python bench/federation.py [--sections quality,cost,tcga-sites,ranking] [--rounds 10] [--local-epochs 2]
                               [--cost-rounds 3] [--rank-seeds 0,1,2,3,4] [--workdir DIR] [--threads 1]

``--set key=value`` (repeatable) changes the CancerMoE config of every row;
``--fed-set key=value`` then that of the federated rows only (e.g. ``lr=0.01``,
the sites' learning rate, while the centralized rows keep the paper's).
``--threads`` (default 1) is torch's thread count here and OMP_NUM_THREADS of
the loopback processes: three sites share two cores, and a second spinning
OpenMP thread per process only slows the others down. Synthetic banks are
generated once per workdir and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from banks import cached_bank
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from report import Table, cindex_with_interval, exit_on_input_error
from scipy import stats

from cancermoe.cohort import Cohort, open_cohort
from cancermoe.config import CancerMoEConfig, load_config
from cancermoe.experiment import fit, load_model
from cancermoe.importers import import_tcga
from cancermoe.survival import PairCounts
from cancermoe.synthetic import SynthSpec
from cancermoe.train import Evaluation, evaluate_risks, load_checkpoint, seed_everything
from client.app import app as client_app
from client.site import split_site
from fedcommon import processes
from server.app import FINAL, PROGRESS, RESULTS, Job, JobSettings, initial_weights
from server.config import SERVER_OPTIMIZERS, FederationConfig
from simulate.sites import WorldSplit

SECTIONS = ("quality", "cost", "tcga-sites", "ranking")
WORLD_SECTIONS = ("quality", "cost")  # the sections that use the A/B/C/D world
SITE_CANCERS = {"A": ("BRCA", "LUAD"), "B": ("LUAD", "KIRC"), "C": ("BRCA", "KIRC")}
TEST_SITE = "D"
TEST_CANCERS = ("BRCA", "KIRC", "LUAD")
AGGREGATIONS = (("load-aware", "federated, load-aware"), ("fedavg", "federated, FedAvg"))
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- tables





def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def kib(n_bytes: float) -> str:
    return f"{n_bytes / 1024:,.1f}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the world and the settings


def world_specs(args: argparse.Namespace) -> dict[str, SynthSpec]:
    """Sites A, B, C (training) and D (test) of one world: shared biology, own patients and cancer mix."""
    common = {"patches": args.patches, "world_seed": args.world_seed, "feature_dim": args.feature_dim,
              "genomic_features": args.genomic_features, "signal_fraction": args.signal_fraction}
    specs = {site: SynthSpec(site=site, patients=args.patients, cancers=cancers, seed=k + 1, **common)
             for k, (site, cancers) in enumerate(SITE_CANCERS.items())}
    specs[TEST_SITE] = SynthSpec(site=TEST_SITE, patients=args.test_patients, cancers=TEST_CANCERS,
                                 seed=len(SITE_CANCERS) + 1, **common)
    return specs


class Configs(NamedTuple):
    """The model configs of one setting: the centralized rows' (``base`` under ``--set``) and the federated rows'
    (the same, then ``--fed-set``: what a federation may set for its sites alone, e.g. their learning rate)."""

    central: CancerMoEConfig
    federated: CancerMoEConfig

    @classmethod
    def of(cls, args: argparse.Namespace, base: CancerMoEConfig) -> Configs:
        return cls(load_config(overrides=args.set, base=base),
                   load_config(overrides=[*args.set, *args.fed_set], base=base))

    def replace(self, **changes: Any) -> Configs:
        return Configs(self.central.replace(**changes), self.federated.replace(**changes))


def epoch_budget(configs: Configs, rounds: int, local_epochs: int) -> tuple[Configs, int]:
    """Both configs spending the federation's epochs (rounds x local epochs), and the round after which the
    federation consolidates attention: the first whose epochs reach ``consolidate_after_epoch``; centralized
    training consolidates at that same epoch."""
    consolidate_round = max(1, math.ceil(configs.central.consolidate_after_epoch / local_epochs))
    return configs.replace(epochs=rounds * local_epochs,
                           consolidate_after_epoch=consolidate_round * local_epochs), consolidate_round


def settings(args: argparse.Namespace) -> tuple[Configs, FederationConfig]:
    """The model configs of every row, and the federation that spends the same epoch budget."""
    base = CancerMoEConfig(feature_dim=args.feature_dim, tokens=args.tokens, batch_size=16,
                           sparsify_keep=args.sparsify_keep, seed=args.seed)
    configs, consolidate_round = epoch_budget(Configs.of(args, base), args.rounds, args.local_epochs)
    federation = FederationConfig(rounds=args.rounds, min_sites=len(SITE_CANCERS), local_epochs=args.local_epochs,
                                  consolidate_round=consolidate_round)
    return configs, federation


# --------------------------------------------------------------------------- models on the test site


def evaluate_model_file(path: Path, cohort: Cohort, workdir: Path) -> Evaluation:
    """Risks of ``cohort`` from a final model file (``cmoe-train``'s or ``cmoe-server``'s ``model.pt``)."""
    return load_model(path, cohort, workdir).evaluate(cohort)


def oracle_evaluation(cohort: Cohort) -> Evaluation:
    """The c-index of the true log-hazards (higher = earlier death), scored as our risks are."""
    risk = np.array([ref.bank.oracle_risk[ref.patient.index] for ref in cohort.refs])
    return evaluate_risks(cohort, risk)


def training_patients(paths: Sequence[Path], config: CancerMoEConfig, federation: FederationConfig) -> Cohort:
    """The patients the federated sites train on (each site's split), pooled in site order."""
    refs = []
    for path in paths:
        train, _ = split_site(open_cohort([path]), federation.eval_fraction, config.seed)
        refs.extend(train.refs)
    return Cohort(refs)


# --------------------------------------------------------------------------- federation in this process


class InProcessGrid:
    """Flower's Grid, in this process: each message goes to the real ClientApp of its node's site.

    Nodes are 1..n; replies come back in order. The strategy, the Job and the handlers are the
    ones a real federation runs; only the SuperLink and the SuperNodes are left out.
    """

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [client_app(message=m, context=self.contexts[m.metadata.dst_node_id]) for m in messages]


def in_process_grid(banks: dict[str, Path], workdir: Path) -> InProcessGrid:
    # Flower stamps every message with the running task's identity; outside a SuperNode we set one.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    contexts = {}
    for node, (site, bank) in enumerate(banks.items(), start=1):
        node_config = {"site": site, "bank": str(bank), "workdir": str(workdir / f"site-{site}"), "device": "cpu"}
        contexts[node] = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})
    return InProcessGrid(contexts)


def federate_in_process(config: CancerMoEConfig, federation: FederationConfig, banks: dict[str, Path],
                        workdir: Path) -> Path:
    """One federated job from scratch; returns its final model file."""
    shutil.rmtree(workdir, ignore_errors=True)
    server = workdir / "server"
    seed_everything(config.seed)
    job = Job(JobSettings(server, f"sqlite:///{server / 'mlflow.db'}", "bench-federation", False, config,
                          federation))
    job.run(in_process_grid(banks, workdir))
    return server / FINAL


def train_centralized(config: CancerMoEConfig, cohort: Cohort, out_dir: Path) -> Path:
    """One fresh `fit` on the CPU; returns its final model file."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a leftover run would resume its DPS caches
    seed_everything(config.seed)
    return fit(config, cohort, None, out_dir, device=torch.device("cpu")).out_dir / FINAL


# --------------------------------------------------------------------------- 1. quality


def section_quality(args: argparse.Namespace, banks: dict[str, Path]) -> Table:
    configs, federation = settings(args)
    config = configs.central
    train_banks = {site: banks[site] for site in SITE_CANCERS}
    test = open_cohort([banks[TEST_SITE]])
    cancers = test.cancer_codes()
    runs = args.workdir / "quality"
    table = Table(f"c-index on the held-out test site {TEST_SITE} ({len(test)} patients, "
                  f"{'/'.join(cancers)}); training sites A: BRCA/LUAD, B: LUAD/KIRC, C: BRCA/KIRC",
                  ["method", *cancers, "mean of cancers", "stratified", "training patients", "train seconds"])
    # (label, training patients, how to get the final model file)
    methods: list[tuple[str, int, Callable[[], Path]]] = []
    pooled = training_patients(list(train_banks.values()), config, federation)
    for aggregation, label in AGGREGATIONS:
        fed = FederationConfig(**{**federation.to_dict(), "aggregation": aggregation})
        out_dir = runs / f"fed-{aggregation}"
        methods.append((label, len(pooled),
                        lambda fed=fed, out_dir=out_dir: federate_in_process(configs.federated, fed, train_banks,
                                                                             out_dir)))
    methods.append(("centralized, pooled A+B+C", len(pooled),
                    lambda: train_centralized(config, pooled, runs / "pooled")))
    for site, path in train_banks.items():
        alone = training_patients([path], config, federation)
        methods.append((f"site {site} alone ({'/'.join(SITE_CANCERS[site])})", len(alone),
                        lambda alone=alone, site=site: train_centralized(config, alone, runs / f"alone-{site}")))
    for label, n_patients, train in methods:
        log(f"quality: {label}")
        start = time.perf_counter()
        model_path = train()
        seconds = time.perf_counter() - start
        evaluation = evaluate_model_file(model_path, test, runs / "eval" / re.sub(r"[^A-Za-z0-9]+", "-", label))
        table.rows.append(cindex_row(label, evaluation, cancers) + [str(n_patients), f"{seconds:.0f}"])
    table.rows.append(cindex_row("oracle (true log-hazard)", oracle_evaluation(test), cancers) + ["", ""])
    consolidation = (f"attention consolidated after epoch {config.consolidate_after_epoch}"
                     if config.consolidate_after_epoch <= config.epochs else "attention never consolidated (budget "
                     f"shorter than consolidate_after_epoch {config.consolidate_after_epoch})")
    table.notes.append(
        f"{args.patients} patients a training site ({len(pooled)} of the {len(train_banks) * args.patients} train; "
        f"the rest are kept for the federation's own evaluation), {args.test_patients} at {TEST_SITE}; "
        f"~{args.patches} patches a slide (D = "
        f"{args.feature_dim}), region {args.signal_fraction:.0%} of a slide, {args.genomic_features} genomic "
        f"values, world seed {args.world_seed}. Every row: N = {config.tokens}, q = {config.sparsify_keep}, batch "
        f"{config.batch_size}, seed {config.seed}, {config.epochs} epoch(s) (federated: {federation.rounds} round(s) "
        f"x {federation.local_epochs} local epoch(s)), {consolidation}; learning rate {config.lr:g} (federated: "
        f"the sites' {configs.federated.lr:g}). "
        "stratified = pairs formed within a cancer, summed over cancers, with its 95% interval (first-order "
        "jackknife over patients). "
        "Train seconds: in one process (federated: the three sites one after another, plus per-round evaluation "
        "and tracking).")
    return table


def cindex_row(label: str, evaluation: Evaluation, cancers: Sequence[str]) -> list[str]:
    per_cancer = [evaluation.per_cancer.get(c, PairCounts()).cindex for c in cancers]
    finite = [v for v in per_cancer if not math.isnan(v)]
    return [label, *map(fmt, per_cancer), fmt(float(np.mean(finite)) if finite else math.nan),
            cindex_with_interval(evaluation.counts)]


# --------------------------------------------------------------------------- 2. cost


def start(command: list[str], log_path: Path, threads: int) -> subprocess.Popen:
    env = {**processes.flower_env(), "OMP_NUM_THREADS": str(threads)}
    return processes.start(command, log_path, env)


def interrupt(process: subprocess.Popen) -> None:
    """SIGINT first: cmoe-server then stops its SuperLink (in another session) on the way out."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    processes.stop(process)


def federate_over_loopback(args: argparse.Namespace, config: CancerMoEConfig, federation: FederationConfig,
                           banks: dict[str, Path], workdir: Path) -> Path:
    """cmoe-server and one cmoe-client per site on 127.0.0.1; returns the server's work folder."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port = processes.free_port()
    sets = [f"{k}={v}" for k, v in config.to_dict().items()]
    sets += [f"local_epochs={federation.local_epochs}", f"consolidate_round={federation.consolidate_round}"]
    server_dir = workdir / "server"
    server = start([str(BIN / "cmoe-server"), "--rounds", str(federation.rounds), "--min-sites", str(len(banks)),
                    "--insecure", "--listen", f"127.0.0.1:{port}", "--workdir", str(server_dir),
                    *[arg for item in sets for arg in ("--set", item)]], workdir / "server.out", args.threads)
    clients = []
    try:
        if not processes.wait_for_port("127.0.0.1", port, timeout=120, process=server):
            raise RuntimeError(f"cmoe-server did not start:\n{processes.tail(workdir / 'server.out')}")
        for site, bank in banks.items():
            clients.append(start([str(BIN / "cmoe-client"), "--site", site, "--bank", str(bank), "--superlink",
                                  f"127.0.0.1:{port}", "--insecure", "--workdir", str(workdir / f"site-{site}")],
                                 workdir / f"client-{site}.out", args.threads))
        code = server.wait(timeout=args.cost_timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        for process in [server, *clients]:
            interrupt(process)
    if code != 0:
        raise RuntimeError(f"the loopback federation failed (exit {code}):\n{processes.tail(workdir / 'server.out')}")
    return server_dir


def model_bytes(weights: dict[str, torch.Tensor | np.ndarray]) -> int:
    return int(sum(np.asarray(w).nbytes for w in weights.values()))


def flower_accounting(superlink_db: Path) -> dict[str, float] | None:
    """Flower's own totals for the (only) run in a SuperLink state file; None if it holds none we can read."""
    try:
        with sqlite3.connect(f"file:{superlink_db}?mode=ro", uri=True) as db:
            row = db.execute("SELECT SUM(bytes_sent), SUM(bytes_recv), SUM(clientapp_runtime), COUNT(*) "
                             "FROM run").fetchone()
    except sqlite3.Error:
        return None
    if not row or not row[3]:
        return None
    return {"sent": float(row[0]), "received": float(row[1]), "clientapp_seconds": float(row[2])}


def section_cost(args: argparse.Namespace, banks: dict[str, Path]) -> Table:
    configs, federation = settings(args)
    config = configs.federated
    federation = FederationConfig(**{**federation.to_dict(), "rounds": args.cost_rounds})
    train_banks = {site: banks[site] for site in SITE_CANCERS}
    sites = len(train_banks)
    log(f"cost: {federation.rounds} rounds over loopback, {sites} sites")
    server_dir = federate_over_loopback(args, config, federation, train_banks, args.workdir / "cost")
    rounds = [json.loads(line) for line in (server_dir / PROGRESS).read_text().splitlines()]
    final = load_checkpoint(server_dir / FINAL)
    full_bytes = model_bytes(initial_weights(config))
    consolidated_bytes = model_bytes(final["model"])
    table = Table(f"Cost of a federated round over loopback ({sites} sites, {federation.local_epochs} local epochs "
                  f"a round, one real SuperLink and three SuperNodes on 2 cores)",
                  ["round", "model KiB", "train payload down + up KiB", f"floor 2 x model x {sites} KiB",
                   "payload / floor", "slowest site's training s", "slowest site's work s", "round s",
                   "round - work s", "round / slowest work", "round / slowest training"])
    payload_ratios, work_ratios, training_ratios, overheads = [], [], [], []
    for row in rounds:
        metrics = row["metrics"]
        # The plan is applied when round `consolidate_round` is aggregated: later rounds ship the smaller model.
        consolidated = final["plan"] is not None and row["round"] > federation.consolidate_round
        model = consolidated_bytes if consolidated else full_bytes
        payload = metrics["bytes/down"] + metrics["bytes/up"]
        floor = 2 * model * sites
        training = metrics["seconds/slowest_site_training"]
        work = metrics["seconds/slowest_site_work"]
        payload_ratios.append(payload / floor)
        work_ratios.append(row["seconds"] / work)
        training_ratios.append(row["seconds"] / training)
        overheads.append(row["seconds"] - work)
        table.rows.append([str(row["round"]), kib(model), kib(payload), kib(floor), f"{payload / floor:.4f}",
                           f"{training:.1f}", f"{work:.1f}", f"{row['seconds']:.1f}", f"{row['seconds'] - work:.1f}",
                           f"{row['seconds'] / work:.2f}", f"{row['seconds'] / training:.1f}"])
    table.rows.append(["mean", "", "", "", f"{np.mean(payload_ratios):.4f}", "", "", "", f"{np.mean(overheads):.1f}",
                       f"{np.mean(work_ratios):.2f}", f"{np.mean(training_ratios):.1f}"])
    last_evaluation = rounds[-1]["metrics"].get("seconds/last_evaluation")
    table.notes.append(
        f"Same config as the quality table (N = {config.tokens}, D = {config.feature_dim}, batch "
        f"{config.batch_size}); model: {kib(full_bytes)} KiB of float32 weights, {kib(consolidated_bytes)} KiB "
        f"once attention is consolidated (after round {federation.consolidate_round}). Training payload: the "
        "train messages only (the weights down, the weights and aggregate statistics up, and from round 2 the "
        "evaluation of the previous round's model). Round s: one exchange, from pushing the train messages to the "
        "end of their aggregation. Work s: the slowest site's wall time for its whole message (evaluation of the "
        "previous model, training, their setup). The last round's model is evaluated in one more exchange "
        f"({fmt(last_evaluation, 1)} s), not counted in any round.")
    accounting = flower_accounting(server_dir / "superlink.db")
    if accounting is None:
        table.notes.append("Flower's own traffic accounting: not readable from superlink.db (n/a).")
    else:
        messages = sites * (federation.rounds + 2)  # round-0 time-bin query, a train each round, the last evaluate
        table.notes.append(
            f"Flower's own accounting for the run (SuperLink, every message incl. the round-0 query, evaluation "
            f"and framing): {accounting['sent'] / 2**20:.2f} MiB to the sites, {accounting['received'] / 2**20:.2f} "
            f"MiB from them ({(accounting['sent'] + accounting['received']) / federation.rounds / 1024:,.0f} KiB a "
            f"round); ClientApp runtime {accounting['clientapp_seconds']:.0f} s over {messages} messages "
            f"({accounting['clientapp_seconds'] / messages:.1f} s each).")
    return table


# --------------------------------------------------------------------------- main


def tcga_site_banks(args: argparse.Namespace) -> dict[str, Path]:
    """The real TCGA-BLCA table as one genomics-only bank per tissue-source site (imported once per workdir)."""
    folder = args.workdir / f"tcga-blca-sites-{args.tcga_min_patients}"
    if not folder.exists():
        import_tcga(folder, args.tcga_table, sites_by="site", min_patients=args.tcga_min_patients)
    return {path.stem: path for path in sorted(folder.glob("*.h5"))}


def held_out_union(banks: dict[str, Path], config: CancerMoEConfig,
                   federation: FederationConfig) -> dict[str, Cohort]:
    """Each site's held-out patients (`client.site.split_site`: what the federation evaluates on)."""
    return {site: split_site(open_cohort([path]), federation.eval_fraction, config.seed)[1]
            for site, path in banks.items()}


def site_stratified_and_pooled(model_path: Path, held: dict[str, Cohort],
                               workdir: Path) -> tuple[PairCounts, PairCounts]:
    """A model file scored centrally on every site's held-out patients: pairs within a site and cancer
    (what the federation's ``cindex/all`` is), and pairs within a cancer across sites (its ``cindex_cross``)."""
    stratified, risks = PairCounts(), []
    for site, cohort in held.items():
        evaluation = evaluate_model_file(model_path, cohort, workdir / site)
        stratified = stratified + evaluation.counts
        risks.append(evaluation.risk)
    union = Cohort([ref for cohort in held.values() for ref in cohort.refs])
    return stratified, evaluate_risks(union, np.concatenate(risks)).counts


def metric_interval(metrics: dict, prefix: str, group: str = "all") -> str:
    values = [metrics.get(f"{prefix}{part}/{group}") for part in ("", "_lower", "_upper")]
    return f"{fmt(values[0])} [{fmt(values[1])}, {fmt(values[2])}]"


class TcgaSeedResult(NamedTuple):
    """One seed of the tcga-sites section: the federation's last round against the same patients trained
    centrally and at each site alone (c-indices on every site's held-out patients)."""

    seed: int
    last_round: dict  # the last round's metrics as the federation logged them
    rescoring_exact: bool  # its pair counts equal those of the final model file scored centrally
    central_stratified: PairCounts
    central_pooled: PairCounts
    alone_mean: float  # mean over the sites of each site's own model, site-stratified
    best: dict | None  # results.json's best round (with a validation share), else None


def tcga_best_rounds(finals: list[TcgaSeedResult], validation_fraction: float) -> list[str]:
    """With a validation share: the federation's best round (chosen on the sites' validation patients, `best.pt`)
    beside the centralized model, which then also keeps its best epoch on its own validation split."""
    lines = ["", f"**Chosen without the held-out patients: the federation's best round by the sites' validation "
             f"c-index ({validation_fraction:.0%} of each site's training patients) and the centralized run's "
             "best epoch on the same share of its training patients**", "",
             "| seed | federated, best round | its round | centralized, best epoch, site-stratified | "
             "federated - centralized |", "|---|---|---|---|---|"]
    federated, central = [], []
    for result in finals:
        federated.append(result.best["heldout_cindex"])
        central.append(result.central_stratified.cindex)
        lines.append(f"| {result.seed} | {fmt(federated[-1])} | {result.best['round']} | {fmt(central[-1])} | "
                     f"{federated[-1] - central[-1]:+.3f} |")
    if len(finals) > 1:
        gaps = np.subtract(federated, central)
        lines.append(f"| mean +- sd | {fmt(float(np.mean(federated)))} | | {fmt(float(np.mean(central)))} | "
                     f"{gaps.mean():+.3f} +- {gaps.std(ddof=1):.3f} |")
    return lines


def section_tcga_sites(args: argparse.Namespace, _banks: dict[str, Path]) -> Table:
    """Issue 12's check: the real BLCA table split by tissue-source site, the federation at its defaults
    (local_epochs 1), against centralized training of the same patients for the same epochs, both scored
    on the same held-out patients; per round and over seeds, with 95% intervals."""
    banks = tcga_site_banks(args)
    configs = Configs.of(args, CancerMoEConfig(tokens=64))  # genomics only: no WSI token is ever real
    federation = FederationConfig(rounds=args.tcga_rounds, min_sites=len(banks), local_epochs=args.tcga_local_epochs,
                                  server_momentum=args.tcga_server_momentum, server_lr=args.tcga_server_lr,
                                  server_optimizer=args.tcga_server_optimizer)
    runs = args.workdir / "tcga-sites"
    table = Table(f"TCGA-BLCA split by tissue-source site ({len(banks)} banks, --min-patients "
                  f"{args.tcga_min_patients}), genomics only: the global model of each round on every site's "
                  "held-out patients, c-index [95% interval]",
                  ["seed", "round", "site-stratified (federated)", "cross-site (federated)", "deaths",
                   "training c-index"])
    finals = []
    for seed in args.tcga_seeds:
        seed_configs = configs.replace(seed=seed, epochs=federation.rounds * federation.local_epochs)
        config = seed_configs.central
        log(f"tcga-sites: seed {seed}, federated")
        model_path = federate_in_process(seed_configs.federated, federation, banks, runs / f"fed-{seed}")
        rounds = [json.loads(line) for line in (model_path.parent / PROGRESS).read_text().splitlines()]
        for row in rounds:
            m = row["metrics"]
            table.rows.append([str(seed), str(row["round"]), metric_interval(m, "cindex"),
                               metric_interval(m, "cindex_cross"), fmt(m.get("eval_events/all"), 0),
                               fmt(m.get("cindex/train"))])
        held = held_out_union(banks, config, federation)
        rescored, _ = site_stratified_and_pooled(model_path, held, runs / f"rescore-{seed}")
        last = rounds[-1]
        exact = last["pairs"]["all"] == [rescored.concordant, rescored.discordant, rescored.tied_risk]
        best = json.loads((model_path.parent / RESULTS).read_text())["best"] if config.validation_fraction else None
        log(f"tcga-sites: seed {seed}, centralized")
        pooled_training = training_patients(list(banks.values()), config, federation)
        central_model = train_centralized(config, pooled_training, runs / f"central-{seed}")
        central_stratified, central_pooled = site_stratified_and_pooled(central_model, held, runs / f"eval-{seed}")
        alone = []  # each site's own model, trained on its own training patients, scored on every site's held-out
        for site, path in banks.items():
            log(f"tcga-sites: seed {seed}, site {site} alone")
            own = train_centralized(config, training_patients([path], config, federation), runs / f"{site}-{seed}")
            alone.append(site_stratified_and_pooled(own, held, runs / f"eval-{site}-{seed}")[0].cindex)
        finals.append(TcgaSeedResult(seed, last["metrics"], exact, central_stratified, central_pooled,
                                     float(np.mean(alone)), best))
    summary = ["", f"**Last round ({federation.rounds}) vs centralized training of the same patients for "
               f"{federation.rounds * federation.local_epochs} epochs, same held-out patients**", "",
               "| seed | federated, site-stratified | federated, cross-site | centralized, site-stratified | "
               "centralized, pooled across sites | federated = central re-scoring | mean of the sites alone, "
               "site-stratified |", "|---|---|---|---|---|---|---|"]
    for r in finals:
        cells = [str(r.seed), metric_interval(r.last_round, "cindex"), metric_interval(r.last_round, "cindex_cross"),
                 cindex_with_interval(r.central_stratified), cindex_with_interval(r.central_pooled),
                 "yes" if r.rescoring_exact else "NO", fmt(r.alone_mean)]
        summary.append("| " + " | ".join(cells) + " |")
    if config.validation_fraction:
        summary += tcga_best_rounds(finals, config.validation_fraction)

    def mean_sd(values: list[float]) -> str:
        return f"{fmt(float(np.mean(values)))} +- {fmt(float(np.std(values, ddof=1)))}"

    federated = [r.last_round["cindex/all"] for r in finals]
    central = [r.central_stratified.cindex for r in finals]
    alone_means = [r.alone_mean for r in finals]
    summary.append(f"| mean +- sd | {mean_sd(federated)} | | {mean_sd(central)} | | | {mean_sd(alone_means)} |"
                   if len(finals) > 1 else "")
    table.notes += summary
    table.notes.append(
        f"Config: defaults (the paper's appendix B, tokens = 64 since no patient has slides), seed as listed "
        f"(it also draws each site's held-out split, {federation.eval_fraction:.0%}); federation: "
        f"{federation.rounds} rounds x {federation.local_epochs} local epoch, load-aware, the sites' learning rate "
        f"{configs.federated.lr:g} (centralized and sites alone: {configs.central.lr:g}), server optimizer "
        f"{federation.server_optimizer} (lr {federation.server_lr:g}, momentum {federation.server_momentum:g}), "
        "in this process "
        "(the real Job, strategy and ClientApp; no SuperLink). Site-stratified: pairs within a site and cancer "
        "(the federation's headline `cindex/all`); cross-site and pooled: pairs within a cancer across sites. "
        "Interval: 95%, normal approximation with the first-order jackknife standard error over patients. "
        "'federated = central re-scoring': the round's pair counts equal those of the final model file scored "
        "centrally on the same patients. 'Sites alone': each site's model trained on its own training patients "
        "only (same config and epochs), scored site-stratified on every site's held-out patients; the mean over "
        "sites.")
    return table


# --------------------------------------------------------------------------- 4. ranking

# (key, label): every method of the ranking, in table order; results are cached under the key.
RANK_METHODS = (("load-aware", "federated, load-aware"), ("fedavg", "federated, FedAvg"),
                ("fedprox", "federated, FedProx"), ("load-aware-cls", "federated, load-aware-cls"),
                ("fedavg-server-lr", "federated, FedAvg, server lr"), ("fedavgm", "federated, FedAvgM"),
                ("fedadam", "federated, FedAdam"), ("fedadam-sgd", "federated, FedAdam, sites on SGD"),
                ("pooled", "centralized, pooled"), ("alone", "each site alone, mean over sites"),
                ("oracle", "oracle (true log-hazard)"))
RANK_BASELINE = "fedavg"  # the paired differences are against plain FedAvg (the rule load-aware must beat)
RANK_FEDERATED = ("load-aware", "fedavg", "fedprox", "load-aware-cls", "fedavg-server-lr", "fedavgm", "fedadam",
                  "fedadam-sgd")
RANK_AGGREGATION = {"load-aware": "load-aware", "fedavg": "fedavg", "fedprox": "fedavg",
                    "load-aware-cls": "load-aware-cls", "fedavg-server-lr": "fedavg", "fedavgm": "fedavg",
                    "fedadam": "fedavg", "fedadam-sgd": "fedavg"}
RANK_SERVER_ADAM = ("fedadam", "fedadam-sgd")  # the methods with Adam on the server (step --rank-adam-lr)


def cache_name(key: str, args: argparse.Namespace) -> str:
    """A method's result file name within a setting's cache (the server-optimizer methods' include their values)."""
    if key == "fedavg-server-lr":
        return f"{key}-{args.rank_server_lr:g}"
    if key in RANK_SERVER_ADAM:
        sites = f"-{args.rank_site_sgd_lr:g}" if key == "fedadam-sgd" else ""
        return f"{key}-{args.rank_adam_lr:g}-{args.rank_adam_tau:g}{sites}"
    return f"{key}-{args.rank_server_momentum:g}" if key == "fedavgm" else key


def rank_split(args: argparse.Namespace, seed: int) -> WorldSplit:
    """Seed ``seed``'s world: its biology (world seed), its sites' sizes, cancer mixes and patients all follow it."""
    return WorldSplit(sites=args.rank_sites, alpha=args.rank_alpha, mean_patients=args.rank_mean_patients,
                      size_sd=args.rank_size_sd, min_patients=args.rank_min_patients, seed=seed,
                      world_seed=args.world_seed + seed, patches=args.rank_patches,
                      feature_dim=args.rank_feature_dim, genomic_features=args.rank_genomic_features,
                      signal_fraction=args.rank_signal_fraction, risk_sd=args.rank_risk_sd)


def rank_settings(args: argparse.Namespace, seed: int) -> tuple[Configs, FederationConfig]:
    """The model configs of a seed's methods, and the federation spending the same epoch budget (as `settings`)."""
    base = CancerMoEConfig(feature_dim=args.rank_feature_dim, tokens=args.rank_tokens, batch_size=args.rank_batch,
                           sparsify_keep=args.sparsify_keep, seed=seed)
    configs, consolidate_round = epoch_budget(Configs.of(args, base), args.rank_rounds, args.rank_local_epochs)
    federation = FederationConfig(rounds=args.rank_rounds, min_sites=args.rank_sites,
                                  local_epochs=args.rank_local_epochs, consolidate_round=consolidate_round,
                                  eval_fraction=args.rank_eval_fraction)
    return configs, federation


def rank_digest(args: argparse.Namespace) -> str:
    """Names the cache of one benchmark setting: any change of sizes, config or budget starts a fresh one."""
    configs, federation = rank_settings(args, 0)
    split = rank_split(args, 0)
    # What each method sets itself (its rule, mu, server optimizer) is not part of the setting every method shares.
    per_method = set(method_federation(RANK_BASELINE, args))
    shared = {k: v for k, v in federation.to_dict().items() if k not in per_method}
    # Ensembles and inner cross-validation are cmoe-train's (a federation refuses them): not settings of this
    # benchmark, and keys added for them leave earlier caches valid.
    model = {k: v for k, v in configs.central.to_dict().items()
             if k not in ("ensemble_size", "inner_cv_grid", "inner_cv_folds")}
    setting = {"config": model, "federation": shared, "mu": args.rank_proximal_mu,
               "split": {k: v for k, v in dataclasses.asdict(split).items() if k not in ("seed", "world_seed")},
               "world_seed": args.world_seed}
    central = configs.central.to_dict()
    federated = {k: v for k, v in configs.federated.to_dict().items() if v != central[k]}  # --fed-set's values
    if federated:
        setting["federated"] = federated
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:12]


def score_held_out(model_path: Path | None, held: Cohort, workdir: Path) -> dict:
    """A model file (None: the oracle) on the pooled held-out patients: pairs within a cancer, across sites."""
    if model_path is None:
        evaluation = oracle_evaluation(held)
    else:
        evaluation = evaluate_model_file(model_path, held, workdir)
    lower, upper = evaluation.counts.interval()
    return {"cindex": evaluation.cindex, "lower": lower, "upper": upper,
            "per_cancer": {c: v.cindex for c, v in evaluation.per_cancer.items()}}


def method_federation(key: str, args: argparse.Namespace) -> dict:
    """What a federated method sets on the setting's FederationConfig: its rule, and its own mu or server
    optimizer (every other method keeps FedAvg's: no proximal term, the sgd server step with lr 1, no momentum)."""
    server_lr = {"fedavg-server-lr": args.rank_server_lr, **dict.fromkeys(RANK_SERVER_ADAM, args.rank_adam_lr)}.get(
        key, 1.0)
    return {"aggregation": RANK_AGGREGATION[key],
            "proximal_mu": args.rank_proximal_mu if key == "fedprox" else 0.0,
            "server_lr": server_lr,
            "server_momentum": args.rank_server_momentum if key == "fedavgm" else 0.0,
            "server_optimizer": "adam" if key in RANK_SERVER_ADAM else "sgd",
            "server_adam_tau": args.rank_adam_tau}


def method_config(key: str, config: CancerMoEConfig, args: argparse.Namespace) -> CancerMoEConfig:
    """The model config a method trains with: the setting's, except fedadam-sgd's sites, which run plain SGD."""
    if key == "fedadam-sgd":
        return config.replace(optimizer="sgd", lr=args.rank_site_sgd_lr)
    return config


def rank_method(key: str, configs: Configs, federation: FederationConfig, banks: dict[str, Path],
                held: Cohort, runs: Path, args: argparse.Namespace) -> dict:
    """Train (unless the oracle) and score one method of one seed."""
    config = configs.central
    if key == "oracle":
        return score_held_out(None, held, runs / "eval-oracle")
    if key in RANK_FEDERATED:
        fed = FederationConfig(**{**federation.to_dict(), **method_federation(key, args)})
        name = cache_name(key, args)  # methods run at several settings side by side get folders of their own
        model = federate_in_process(method_config(key, configs.federated, args), fed, banks, runs / name)
        return score_held_out(model, held, runs / f"eval-{name}")
    if key == "pooled":
        model = train_centralized(config, training_patients(list(banks.values()), config, federation), runs / key)
        return score_held_out(model, held, runs / f"eval-{key}")
    sites = {}  # each site alone: its own training patients only, scored on everyone's held-out patients
    for site, path in banks.items():
        model = train_centralized(config, training_patients([path], config, federation), runs / f"alone-{site}")
        sites[site] = score_held_out(model, held, runs / f"eval-alone-{site}")["cindex"]
        shutil.rmtree(runs / f"alone-{site}", ignore_errors=True)  # ten sites a seed: keep only the scores
    values = [v for v in sites.values() if not math.isnan(v)]
    return {"cindex": float(np.mean(values)) if values else math.nan, "sites": sites}


def describe_world(banks: dict[str, Path], held: Cohort, config: CancerMoEConfig,
                   federation: FederationConfig) -> dict:
    trained = training_patients(list(banks.values()), config, federation)
    sizes = [len(open_cohort([path])) for path in banks.values()]
    return {"sites": len(banks), "site_patients": sizes, "train_patients": len(trained), "held_out": len(held),
            "held_out_deaths": int(np.count_nonzero(held.censorship == 0)),
            "held_out_per_cancer": {c: int(np.count_nonzero(held.cancers == c)) for c in held.cancer_codes()}}


def mean_sd_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean, sd (ddof 1) and the 95% t-interval of the mean over seeds (NaN where fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(x)) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(np.std(x, ddof=1))
    half = float(stats.t.ppf(0.975, len(x) - 1)) * sd / math.sqrt(len(x))
    return mean, sd, mean - half, mean + half


def section_ranking(args: argparse.Namespace, _banks: dict[str, Path]) -> Table:
    """Issue 10 part 3: every rule on the same many small non-IID sites, same held-out patients, same budget,
    over seeds; each (seed, method) result is cached as JSON, so an interrupted run resumes where it stopped."""
    root = args.workdir / "ranking" / rank_digest(args)
    labels = {key: label for key, label in RANK_METHODS if key in args.rank_methods}
    results: dict[str, dict[int, dict]] = {key: {} for key in labels}
    worlds = {}
    for seed in args.rank_seeds:
        configs, federation = rank_settings(args, seed)
        config = configs.central
        banks = {spec.site: cached_bank(args.workdir, spec) for spec in rank_split(args, seed).specs()}
        held = Cohort([ref for cohort in held_out_union(banks, config, federation).values() for ref in cohort.refs])
        worlds[seed] = describe_world(banks, held, config, federation)
        for key in labels:
            cached = root / f"seed-{seed}-{cache_name(key, args)}.json"
            if cached.exists():
                results[key][seed] = json.loads(cached.read_text())
                continue
            log(f"ranking: seed {seed}, {labels[key]}")
            start = time.perf_counter()
            result = rank_method(key, configs, federation, banks, held, root / "runs" / f"seed-{seed}", args)
            result["seconds"] = time.perf_counter() - start
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(result, indent=1))
            results[key][seed] = result
    seeds = list(args.rank_seeds)
    table = Table(f"Ranking the rules: c-index on every site's held-out patients pooled (pairs within a cancer, "
                  f"across sites), {len(seeds)} seed(s)",
                  ["row", *[f"seed {s}" for s in seeds], "mean +- sd", "95% t-interval"])

    def row(label: str, values: list[float]) -> list[str]:
        mean, sd, lower, upper = mean_sd_interval(values)
        return [label, *map(fmt, values), f"{fmt(mean)} +- {fmt(sd)}", f"[{fmt(lower)}, {fmt(upper)}]"]

    cindex = {key: [results[key][s]["cindex"] for s in seeds] for key in labels}
    for key, label in labels.items():
        table.rows.append(row(label, cindex[key]))
    paired = [(key, RANK_BASELINE) for key in labels if key not in (RANK_BASELINE, "oracle")]
    paired += [(key, "pooled") for key in RANK_FEDERATED if key in labels]
    paired += [("load-aware-cls", "load-aware")]  # the change of rule, against the rule it changes
    paired = [(key, against) for key, against in paired if key in labels and against in labels]
    differences = {}
    for key, against in paired:
        differences[key, against] = [a - b for a, b in zip(cindex[key], cindex[against], strict=True)]
        table.rows.append(row(f"{labels[key]} - {labels[against]} (paired)", differences[key, against]))
    table.notes += ranking_goals(differences, len(seeds))
    configs, federation = rank_settings(args, seeds[0])
    config = configs.central
    split = rank_split(args, seeds[0])
    world_lines = [f"seed {s}: sites of {min(w['site_patients'])}-{max(w['site_patients'])} patients "
                   f"(median {int(np.median(w['site_patients']))}), {w['train_patients']} trained on, "
                   f"{w['held_out']} held out ({w['held_out_deaths']} deaths; "
                   + ", ".join(f"{c} {n}" for c, n in w["held_out_per_cancer"].items()) + ")"
                   for s, w in worlds.items()]
    seconds = {key: float(np.mean([results[key][s].get("seconds", math.nan) for s in seeds])) for key in labels}
    table.notes.append(
        f"World per seed s (`simulate.sites.WorldSplit`, world seed {args.world_seed} + s, split seed s): "
        f"{split.sites} sites, Dirichlet alpha {split.alpha} over {'/'.join(split.cancers)}, log-normal sizes "
        f"around {split.mean_patients:g} (SD of log size {split.size_sd}, at least {split.min_patients}), "
        f"~{split.patches} patches a slide (D = {split.feature_dim}), region {split.signal_fraction:.0%} of a "
        f"slide, {split.genomic_features} genomic values, log-hazard SD {split.risk_sd} within a cancer; every "
        "cancer has its own tissue prototypes, prognostic direction and prognostic genes (`cancermoe.synthetic`), "
        "and its own genomic token positions. " + "; ".join(world_lines) + ".")
    table.notes.append(
        f"Every method, every seed: N = {config.tokens}, q = {config.sparsify_keep}, batch {config.batch_size}, "
        f"d_model {config.d_model}, {config.n_experts} experts (top {config.top_k}), training seed s, "
        f"{config.epochs} epochs (federated: {federation.rounds} rounds x {federation.local_epochs} local epochs, "
        f"attention consolidated after round {federation.consolidate_round}); learning rate {config.lr:g} "
        f"(federated methods' sites: {configs.federated.lr:g}); each site keeps "
        f"{federation.eval_fraction:.0%} of its patients held out (stratified, seed s) and every method is scored "
        f"on all of them pooled. FedProx: FedAvg aggregation, proximal mu = {args.rank_proximal_mu:g} (fixed "
        f"before any run, not tuned). FedAvg, server lr: FedAvg aggregation, global = previous + "
        f"{args.rank_server_lr:g} x (average - previous) (server_lr; {args.rank_server_lr:g} fixed before any run, "
        f"not tuned). FedAvgM: FedAvg aggregation with server momentum {args.rank_server_momentum:g} "
        "(server_momentum; velocity = momentum x velocity + (previous - average), global = previous - velocity; "
        f"fixed before any run, not tuned). FedAdam: FedAvg aggregation, then Adam on the server (server_optimizer "
        f"adam, step length {args.rank_adam_lr:g}, tau {args.rank_adam_tau:g}, betas 0.9 / 0.99, bias-corrected). "
        "load-aware-cls: load-aware with each expert weighted by the CLS tokens "
        "routed to it (the only tokens whose last-block output reaches the survival head), not every token; "
        "designed after load-aware's first seeds here (README). Pooled: one centralized `fit` of all sites' "
        "training patients. Sites alone: "
        "each site's own model (its training patients only), each scored on the pooled held-out patients, then "
        "the mean over sites. 95% t-interval: of the mean over seeds (scipy.stats.t, n - 1 degrees of freedom); "
        "paired rows: the per-seed difference. Mean seconds a seed: "
        + ", ".join(f"{labels[k]} {fmt(v, 0)}" for k, v in seconds.items() if k != "oracle")
        + f". Results cached in {root}.")
    return table


def verdict(values: Sequence[float], bar: float) -> str:
    """How a per-seed difference stands against ``bar``: its mean, 95% t-interval and what they say."""
    mean, _, lower, upper = mean_sd_interval(values)
    if lower >= bar:
        word = "met: the whole interval is at or above the bar"
    elif upper < bar:
        word = "missed: the whole interval is below the bar"
    else:
        word = f"{'met' if mean >= bar else 'missed'} on the mean, within the seed noise (the interval spans the bar)"
    return f"{fmt(mean)} [{fmt(lower)}, {fmt(upper)}], {word}"


def ranking_goals(differences: dict[tuple[str, str], list[float]], n_seeds: int) -> list[str]:
    """The issue's two goals, each read on the mean of the per-seed differences and on its 95% t-interval."""
    lines = [f"Goal federated - pooled >= -0.01 ({key}): {verdict(differences[key, 'pooled'], -0.01)}."
             for key in RANK_FEDERATED if (key, "pooled") in differences]
    for key in ("load-aware", "load-aware-cls"):
        if (key, RANK_BASELINE) in differences:
            lines.append(f"Goal {key} - FedAvg >= 0 over {n_seeds} seeds: "
                         f"{verdict(differences[key, RANK_BASELINE], 0.0)}.")
    return lines


RUNNERS: dict[str, Callable[[argparse.Namespace, dict[str, Path]], Table]] = {
    "quality": section_quality, "cost": section_cost, "tcga-sites": section_tcga_sites, "ranking": section_ranking}


def sections_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: sections are a comma-separated subset of {','.join(SECTIONS)}")
    return names


def rank_methods_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = [key for key, _ in RANK_METHODS]
    if not names or any(name not in known for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: methods are a comma-separated subset of {','.join(known)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", type=sections_arg, default=list(SECTIONS),
                        help="quality,cost,tcga-sites,ranking (default all)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-bench-federation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, and OMP_NUM_THREADS of the loopback "
                                                                "processes (see the docstring for why 1)")
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds of the quality section")
    parser.add_argument("--local-epochs", type=int, default=2, help="local epochs a round (every section)")
    parser.add_argument("--cost-rounds", type=int, default=3, help="rounds of the loopback federation")
    parser.add_argument("--cost-timeout", type=float, default=1800.0, help="seconds the loopback federation may take")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every row")
    parser.add_argument("--fed-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a model config value for the federated rows only, after --set (e.g. lr=0.01: the "
                             "sites' learning rate); centralized and single-site rows keep --set's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="CancerMoE config override for every row (repeatable)")
    tcga = parser.add_argument_group("tcga-sites section")
    tcga.add_argument("--tcga-table", type=Path,
                      default=Path(__file__).resolve().parents[1] / "data" / "tcga" / "tcga_blca_all_clean.csv.zip")
    tcga.add_argument("--tcga-min-patients", type=int, default=60, help="smaller tissue-source sites are grouped")
    tcga.add_argument("--tcga-rounds", type=int, default=10)
    tcga.add_argument("--tcga-local-epochs", type=int, default=1, help="local epochs a round (centralized and "
                      "single-site training get rounds x this many epochs)")
    tcga.add_argument("--tcga-server-momentum", type=float, default=0.0,
                      help="the federation's server momentum (FederationConfig.server_momentum; 0 = FedAvg's step)")
    tcga.add_argument("--tcga-server-optimizer", choices=SERVER_OPTIMIZERS, default="sgd",
                      help="FederationConfig.server_optimizer (adam: FedAdam)")
    tcga.add_argument("--tcga-server-lr", type=float, default=1.0,
                      help="FederationConfig.server_lr (with adam: its step length, e.g. 0.01)")
    tcga.add_argument("--tcga-seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1, 2])
    rank = parser.add_argument_group("ranking section (many small non-IID sites of one world per seed)")
    rank.add_argument("--rank-seeds", "--seeds", dest="rank_seeds", type=lambda text: [int(v) for v in text.split(",")],
                      default=[0, 1, 2, 3, 4],
                      help="each seed draws the world (world seed + it), the split and the training seed")
    rank.add_argument("--rank-methods", type=rank_methods_arg, default=[key for key, _ in RANK_METHODS],
                      help=f"a comma-separated subset of {','.join(key for key, _ in RANK_METHODS)} (default all)")
    rank.add_argument("--rank-sites", type=int, default=10)
    rank.add_argument("--rank-alpha", type=float, default=0.5, help="Dirichlet alpha of each site's cancer mix")
    rank.add_argument("--rank-mean-patients", type=float, default=55.0)
    rank.add_argument("--rank-size-sd", type=float, default=0.3, help="SD of a site's log size")
    rank.add_argument("--rank-min-patients", type=int, default=30)
    rank.add_argument("--rank-patches", type=int, default=60, help="typical patches a slide (0.5-1.5 x this)")
    rank.add_argument("--rank-feature-dim", type=int, default=16)
    rank.add_argument("--rank-genomic-features", type=int, default=16)
    rank.add_argument("--rank-signal-fraction", type=float, default=0.2)
    rank.add_argument("--rank-risk-sd", type=float, default=2.0, help="SD of the true log-hazard within a cancer")
    rank.add_argument("--rank-tokens", type=int, default=32, help="N")
    rank.add_argument("--rank-batch", type=int, default=8)
    rank.add_argument("--rank-rounds", type=int, default=10)
    rank.add_argument("--rank-local-epochs", type=int, default=2)
    rank.add_argument("--rank-eval-fraction", type=float, default=0.25, help="each site's held-out share")
    rank.add_argument("--rank-proximal-mu", type=float, default=0.1, help="FedProx's mu (fixed, not tuned)")
    rank.add_argument("--rank-server-lr", type=float, default=3.0,
                      help="the server learning rate of the fedavg-server-lr method (FederationConfig.server_lr)")
    rank.add_argument("--rank-server-momentum", type=float, default=0.9,
                      help="the server momentum of the fedavgm method (FederationConfig.server_momentum)")
    rank.add_argument("--rank-adam-lr", type=float, default=0.01,
                      help="the fedadam method's server step length (FederationConfig.server_lr with server_optimizer "
                           "adam)")
    rank.add_argument("--rank-adam-tau", type=float, default=1e-3, help="the fedadam methods' adaptivity tau")
    rank.add_argument("--rank-site-sgd-lr", type=float, default=0.1,
                      help="the sites' SGD learning rate of the fedadam-sgd method")
    world = parser.add_argument_group("synthetic world")
    world.add_argument("--patients", type=int, default=150, help="patients per training site")
    world.add_argument("--test-patients", type=int, default=300, help="patients at the test site D")
    world.add_argument("--patches", type=int, default=300, help="typical patches per slide")
    world.add_argument("--feature-dim", type=int, default=64)
    world.add_argument("--genomic-features", type=int, default=16)
    world.add_argument("--signal-fraction", type=float, default=0.1)
    world.add_argument("--world-seed", type=int, default=0)
    world.add_argument("--tokens", type=int, default=64, help="N: WSI tokens per patient")
    world.add_argument("--sparsify-keep", type=float, default=0.25, help="q (the paper's 0.08 keeps 5 of 64 tokens)")
    args = parser.parse_args(argv)
    for name in ("rounds", "local_epochs", "cost_rounds", "threads", "rank_rounds", "rank_local_epochs", "rank_sites"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_input_error(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    banks = {}
    if any(name in WORLD_SECTIONS for name in args.sections):  # the other sections bring their own banks
        banks = {site: cached_bank(args.workdir, spec) for site, spec in world_specs(args).items()}
        log(f"banks ready in {time.perf_counter() - start:.0f} s")
    tables = []
    for name in args.sections:
        start = time.perf_counter()
        table = RUNNERS[name](args, banks)
        table.seconds = time.perf_counter() - start
        tables.append(table)
        print(table.markdown(), flush=True)
        print(flush=True)
    print("| section | minutes |\n|---|---|")
    for name, table in zip(args.sections, tables, strict=True):
        print(f"| {name} | {table.seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
