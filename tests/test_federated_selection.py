"""Federated genomic standardization and federated validation, in-process (the real ClientApp handlers,
strategy and Job through `tests.federation_helpers.InProcessGrid`).

- The pooled scaler the coordinator sends is the central scaler of the union of the sites' training patients,
  built from per-site moment sums only, and every site's trainer uses it.
- Each site's validation patients come from its training patients, never from its held-out ones.
- best.pt is the round with the best federated validation c-index; results.json reports the held-out c-index
  of that round and of the last one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import client.site
from cancermoe.cohort import open_cohort
from cancermoe.config import load_config
from cancermoe.experiment import load_model, selection_split
from cancermoe.genomics import MIN_PATIENTS_FOR_MOMENTS, GenomicMoments, GenomicScaler, genomic_moments
from cancermoe.model import CancerMoE
from cancermoe.survival import PairCounts
from cancermoe.train import SiteTrainer
from client.site import SiteSettings, site_patients, time_histogram
from fedcommon.protocol import EvalReport, TimeHistogram, is_allowed_metric_key, moments_to_metrics
from server.app import BEST, CHECKPOINT, FINAL, Job, JobSettings
from server.config import FederationConfig
from server.strategy import CancerMoEStrategy
from server.weights import numpy_to_arrays
from tests.federation_helpers import (
    SMALL_MODEL,
    InProcessGrid,
    grid_of_sites,
    make_message,
    synth_site,
)

GENOMIC_FEATURES = 8  # synth_site's genomic profile length
RECIPE = ["standardize_genomics=true", "validation_fraction=0.3"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sites")
    return {"A": synth_site(root / "A.h5", 11, cancers=("BRCA", "LUAD")),
            "B": synth_site(root / "B.h5", 12, cancers=("LUAD", "KIRC"))}


@pytest.fixture()
def grid(sites, tmp_path) -> InProcessGrid:
    return grid_of_sites(sites, tmp_path)


def configs(recipe: list[str], **federation):
    model = load_config(overrides=SMALL_MODEL + recipe)
    return model, FederationConfig(**{"rounds": 2, "min_sites": 2, "consolidate_round": 1, **federation})


def keys(cohort) -> set[str]:
    return {ref.key for ref in cohort.refs}


# --------------------------------------------------------------------------- the splits


@pytest.mark.parametrize(("eval_fraction", "validation_fraction", "seed"), [(0.2, 0.3, 0), (0.25, 0.5, 7)])
def test_no_held_out_patient_is_in_any_validation_split(sites, eval_fraction, validation_fraction, seed) -> None:
    model = load_config(overrides=[f"validation_fraction={validation_fraction}", f"seed={seed}"])
    for bank in sites.values():
        cohort = open_cohort([bank])
        patients = site_patients(cohort, eval_fraction, validation_fraction, seed)
        fit, validation, held = keys(patients.fit), keys(patients.validation), keys(patients.held)
        assert validation and fit and held
        assert not validation & held and not fit & held and not fit & validation
        assert fit | validation | held == keys(cohort)  # every patient in exactly one group
        # the same split cmoe-train makes of the same training patients
        train = client.site.split_site(cohort, eval_fraction, seed)[0]
        central_fit, central_validation = selection_split(model, train)
        assert keys(central_fit) == fit and keys(central_validation) == validation
    # the fractions are what was asked for (stratification rounds per cancer and event)
    everyone = sum(len(open_cohort([b])) for b in sites.values())
    held_total = sum(len(site_patients(open_cohort([b]), eval_fraction, validation_fraction, seed).held)
                     for b in sites.values())
    assert abs(held_total / everyone - eval_fraction) < 0.1


# --------------------------------------------------------------------------- standardization


def test_pooled_scaler_is_the_central_scaler_of_every_sites_training_patients(grid, sites) -> None:
    model, federation = configs(RECIPE)
    strategy = CancerMoEStrategy(model, federation, edges=np.zeros(0))
    strategy.round_zero(grid)
    # Centrally: the union of the patients each site trains on (not its held-out or validation patients).
    pooled = open_cohort(list(sites.values()))
    training = set().union(*(keys(site_patients(open_cohort([bank]), federation.eval_fraction,
                                                model.validation_fraction, model.seed).fit)
                             for bank in sites.values()))
    union = pooled.subset([i for i, ref in enumerate(pooled.refs) if ref.key in training])
    central = genomic_moments(union).scaler()
    scaler = strategy.genomic_scaler
    assert scaler is not None and set(scaler.mean) == {"BRCA", "LUAD", "KIRC"} == set(central.mean)
    for cancer in central.mean:
        np.testing.assert_allclose(scaler.mean[cancer], central.mean[cancer], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scaler.scale[cancer], central.scale[cancer], rtol=1e-5)
    # LUAD is at both sites: its statistics pool both, unlike either site's own.
    own = genomic_moments(union.subset([i for i, r in enumerate(union.refs) if r.bank.path == sites["A"]])).scaler()
    assert not np.allclose(own.mean["LUAD"], scaler.mean["LUAD"])
    # What left the sites: allowed keys only, sums of feature length, per cancer of enough patients.
    for reply in grid.received:
        metrics = dict(reply.content["metrics"])
        assert all(is_allowed_metric_key(k) for k in metrics), sorted(metrics)
        genomic = {k: v for k, v in metrics.items() if k.startswith("genomic-")}
        assert genomic
        for key, value in genomic.items():
            if key.startswith("genomic-patients/"):
                assert value >= MIN_PATIENTS_FOR_MOMENTS
            else:
                assert len(value) == GENOMIC_FEATURES  # one sum per gene, never a value per patient


def test_every_sites_trainer_and_evaluation_use_the_pooled_scaler(grid, monkeypatch) -> None:
    used: list[tuple[int, GenomicScaler]] = []

    class Recording(SiteTrainer):
        def __init__(self, config, cohort, **kwargs) -> None:
            super().__init__(config, cohort, **kwargs)
            used.append((len(cohort), self.genomic_scaler))

    monkeypatch.setattr(client.site, "SiteTrainer", Recording)
    model, federation = configs(RECIPE)
    strategy = CancerMoEStrategy(model, federation, edges=np.zeros(0))
    strategy.round_zero(grid)
    torch.manual_seed(0)
    weights = numpy_to_arrays({k: v.numpy() for k, v in CancerMoE(model).state_dict().items()})
    train = {**dict(strategy.shared_config(1)), "local-epochs": 1}
    evaluate = {**dict(strategy.shared_config(1)), **strategy.grid.to_config()}
    replies = grid.send_and_receive([make_message(train, "train", weights, node=1),
                                     make_message(evaluate, "evaluate", weights, node=2)])
    assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
    assert len(used) == 2
    for _, scaler in used:
        assert scaler.to_dict() == strategy.genomic_scaler.to_dict()
    # The evaluation reply carries the validation pair counts beside the held-out ones.
    shape = (strategy.grid.n_risk_bins, strategy.grid.n_time_bins, 2)
    report = EvalReport.from_metrics(dict(replies[1].content["metrics"]), shape)
    assert set(report.validation) == {"LUAD", "KIRC"}
    assert sum(c.comparable for c in report.validation.values()) > 0


@pytest.mark.bad_input
def test_a_cancer_with_too_few_training_patients_sends_no_moments(tmp_path) -> None:
    bank = synth_site(tmp_path / "small.h5", 3, patients=18, cancers=("BRCA", "LUAD", "KIRC"))
    model = load_config(overrides=SMALL_MODEL + RECIPE)
    settings = SiteSettings("small", bank, tmp_path / "site", "cpu")
    fit = site_patients(open_cohort([bank]), 0.2, model.validation_fraction, model.seed).fit
    counts = {c: int((fit.cancers == c).sum()) for c in fit.cancer_codes()}
    assert min(counts.values()) < MIN_PATIENTS_FOR_MOMENTS  # the premise: some cancer is small here
    report = time_histogram(settings, np.linspace(0, 200, 11), 0.2, model)
    sent = TimeHistogram.from_metrics(report.to_metrics()).genomics
    assert sent.patients == {c: n for c, n in counts.items() if n >= MIN_PATIENTS_FOR_MOMENTS}
    # and the encoder itself refuses moments of a small cancer, whoever builds them
    small = GenomicMoments({"BRCA": MIN_PATIENTS_FOR_MOMENTS - 1}, {"BRCA": np.zeros(3)}, {"BRCA": np.zeros(3)})
    with pytest.raises(ValueError, match="BRCA rest on fewer than"):
        moments_to_metrics(small)


def test_protocol_round_trip_of_validation_counts_and_moments() -> None:
    rng = np.random.default_rng(0)
    counts = PairCounts(5, 3, 1, 0, 2.5, 1.25, 4.0)
    report = EvalReport(4, {}, {"BRCA": counts})
    metrics = report.to_metrics()
    assert all(is_allowed_metric_key(k) for k in metrics)
    assert EvalReport.from_metrics(metrics, (1, 1, 2)).validation == {"BRCA": counts}
    moments = GenomicMoments({"LUAD": 7}, {"LUAD": rng.normal(size=4)}, {"LUAD": rng.random(4)})
    back = TimeHistogram.from_metrics(TimeHistogram(np.arange(3), 9, moments).to_metrics()).genomics
    assert back.patients == moments.patients
    np.testing.assert_array_equal(back.total["LUAD"], moments.total["LUAD"])
    np.testing.assert_array_equal(back.total_squares["LUAD"], moments.total_squares["LUAD"])


# --------------------------------------------------------------------------- the job


def run_job(grid: InProcessGrid, workdir: Path, recipe: list[str], rounds: int,
            weights_by_round: dict[int, dict[str, np.ndarray]]) -> Job:
    model, federation = configs(recipe, rounds=rounds)
    job = Job(JobSettings(workdir, f"sqlite:///{workdir / 'mlflow.db'}", "test", False, model, federation))
    after_round = job.after_round

    def recording(server_round, arrays):
        if server_round:
            weights_by_round[job.strategy.absolute_round(server_round)] = {
                k: v.numpy().copy() for k, v in arrays.to_torch_state_dict().items()}
        return after_round(server_round, arrays)

    job.after_round = recording
    job.run(grid)
    return job


@pytest.mark.slow
def test_best_round_is_chosen_on_validation_and_both_held_out_cindices_are_reported(grid, sites, tmp_path) -> None:
    workdir = tmp_path / "server"
    weights: dict[int, dict[str, np.ndarray]] = {}
    job = run_job(grid, workdir, RECIPE, 3, weights)
    results = json.loads((workdir / "results.json").read_text())
    rows = {row["round"]: row["metrics"] for row in results["rounds"]}
    assert sorted(rows) == [1, 2, 3]
    validation = [rows[r]["validation_cindex"] for r in (1, 2, 3)]
    assert all(v is not None for v in validation)
    best_round = 1 + int(np.argmax(validation))
    assert results["best"]["round"] == best_round
    assert results["best"]["validation_cindex"] == validation[best_round - 1]
    assert results["best"]["heldout_cindex"] == rows[best_round]["cindex/all"]
    assert results["last"]["round"] == 3 and results["last"]["heldout_cindex"] == rows[3]["cindex/all"]
    assert "validation c-index" in results["best"]["chosen"] and "held-out patients never" in results["selection"]
    assert "last round" in results["last"]["chosen"]

    best = torch.load(workdir / BEST, weights_only=False)
    assert best["round"] == best_round
    for key, value in weights[best_round].items():
        np.testing.assert_array_equal(best["model"][key].numpy(), value, err_msg=key)
    scaler = job.strategy.genomic_scaler.to_dict()
    final = torch.load(workdir / FINAL, weights_only=False)
    assert best["genomic_scaler"] == scaler == final["genomic_scaler"] and scaler["mean"]
    cohort = open_cohort([sites["A"]])
    assert load_model(workdir / FINAL, cohort, tmp_path / "loaded").genomic_scaler.to_dict() == scaler

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(job.tracker.run_id)
    assert run.data.tags["best.round"] == str(best_round) and run.data.tags["best.chosen_on"] == "validation_cindex"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation_cindex")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation_cindex/LUAD")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "best")] == ["best/best.pt"]

    # Everything the sites sent over the job passed the protocol check, the moments in round 0 included.
    for name in sites:
        entries = [json.loads(line) for line in (tmp_path / f"site-{name}" / "audit.jsonl").read_text().splitlines()]
        assert all(e["refused"] == [] and all(is_allowed_metric_key(k) for k in e["metrics"]) for e in entries)
        query = [e for e in entries if e["type"] == "query"]
        assert query and all(any(k.startswith("genomic-sum/") for k in e["metrics"]) for e in query)
        evaluations = [e for e in entries if e["type"] == "evaluate"]
        assert evaluations and all(any(k.startswith("val-pairs/") for k in e["metrics"]) for e in evaluations)

    # A resumed job keeps the scaler the sites trained with (round 0 is not asked again).
    state = torch.load(workdir / CHECKPOINT, weights_only=False)
    assert state["genomic_scaler"] == scaler and state["best_round"] == best_round
