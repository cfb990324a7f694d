"""The training recipe and model selection: schedule, balanced sampling, genomic standardization, the inner
validation split, early stopping, published folds, and the proof that no evaluation patient reaches selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cancermoe.cohort import Cohort, open_cohort
from cancermoe.config import CancerMoEConfig, load_config
from cancermoe.errors import InputError
from cancermoe.experiment import fit, published_folds, run_experiment
from cancermoe.genomics import GenomicLayout, GenomicMoments, genomic_moments
from cancermoe.recipe import (
    EarlyStopping,
    balanced_order,
    epochs_for_steps,
    federated_schedule,
    learning_rate_factor,
    validation_split,
)
from cancermoe.survival import time_bin_edges
from cancermoe.synthetic import SynthSpec, synthesize_bank
from cancermoe.train import SiteTrainer

SMALL = ["feature_dim=16", "tokens=32", "batch_size=8", "sparsify_keep=0.25"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    spec = SynthSpec(site="R", patients=120, cancers=("BRCA", "LUAD"), patches=60, seed=4, feature_dim=16,
                     genomic_features=8, signal_fraction=0.2)
    return synthesize_bank(tmp_path_factory.mktemp("recipe") / "R.h5", spec)


def keys(cohort: Cohort) -> set[str]:
    return {ref.key for ref in cohort.refs}


# --------------------------------------------------------------------------- pure pieces


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    factors = [learning_rate_factor(step, 100, 10, 0.1) for step in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:100], factors[11:100], strict=False))
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02) and factors[119] == pytest.approx(0.1)


def test_epochs_for_steps_counts_batches():
    assert epochs_for_steps(300, 200, 32) == 43  # 7 batches an epoch
    assert epochs_for_steps(1, 5, 32) == 1


def test_a_federated_schedule_gives_each_round_its_part_of_one_job_long_schedule():
    """R rounds of e local epochs step through the same learning-rate factors as one centralized run of R x e
    epochs on the same patients: no warm-up again each round."""
    rounds, local_epochs, patients, batch = 5, 2, 37, 8  # 5 batches an epoch
    central_total = rounds * local_epochs * 5
    central = [learning_rate_factor(step, central_total, 7, 0.1) for step in range(central_total)]
    federated = []
    for server_round in range(1, rounds + 1):
        start, total = federated_schedule(server_round, rounds, local_epochs, patients, batch)
        assert total == central_total
        federated += [learning_rate_factor(start + k, total, 7, 0.1) for k in range(local_epochs * 5)]
    assert federated == central


def test_balanced_order_draws_each_time_bin_and_censorship_group_equally():
    time_bin = np.array([0] * 80 + [1] * 15 + [2] * 5)
    censorship = np.array([1] * 80 + [0] * 20)
    rng = np.random.default_rng(0)
    drawn = np.concatenate([balanced_order(time_bin, censorship, rng) for _ in range(200)])
    shares = np.bincount(time_bin[drawn]) / drawn.size
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.02)


def test_validation_split_is_stratified_seeded_and_keeps_small_groups_on_both_sides():
    cancers = np.array(["A"] * 50 + ["B"] * 4)
    censorship = np.array(([0] * 10 + [1] * 40) + [0, 0, 1, 1])
    fit_rows, val_rows = validation_split(cancers, censorship, 0.2, seed=3)
    assert sorted(np.concatenate([fit_rows, val_rows]).tolist()) == list(range(54))
    assert np.array_equal(val_rows, validation_split(cancers, censorship, 0.2, seed=3)[1])
    for cancer in ("A", "B"):
        for event in (0, 1):
            group = np.flatnonzero((cancers == cancer) & (censorship == event))
            assert np.isin(group, val_rows).any() and np.isin(group, fit_rows).any()
    assert 9 <= len(val_rows) <= 13


def test_early_stopping_keeps_the_best_and_stops_after_patience():
    stopping = EarlyStopping(patience=2)
    assert stopping.improved(0.6, 1) and not stopping.improved(math.nan, 2) and not stopping.should_stop
    assert not stopping.improved(0.55, 3) and stopping.should_stop
    assert (stopping.best, stopping.best_epoch) == (0.6, 1)


def test_genomic_moments_of_two_sites_add_up_to_the_pooled_standardization(bank):
    cohort = open_cohort([bank])
    half = len(cohort) // 2
    summed = genomic_moments(cohort.subset(range(half))) + genomic_moments(cohort.subset(range(half, len(cohort))))
    pooled = genomic_moments(cohort).scaler()
    for cancer in cohort.cancer_codes():
        np.testing.assert_allclose(summed.scaler().mean[cancer], pooled.mean[cancer], rtol=1e-6)
        np.testing.assert_allclose(summed.scaler().scale[cancer], pooled.scale[cancer], rtol=1e-5)
        values = np.stack([v for r in cohort.refs if r.patient.cancer == cancer
                           and (v := r.bank.genomics(r.patient)) is not None])
        standardized = np.stack([pooled.apply(cancer, v) for v in values])
        np.testing.assert_allclose(standardized.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(standardized.std(axis=0), 1.0, atol=1e-3)
    few = GenomicMoments({"X": 3}, {"X": np.zeros(2)}, {"X": np.ones(2)})
    assert few.without_small_cancers().patients == {}  # a site never sends moments of 3 patients


def test_genomic_layout_gives_each_cancer_consecutive_positions_of_its_own(bank):
    layout = GenomicLayout({"KIRC": 17, "BLCA": 16}, piece=8)
    assert layout.offsets() == {"BLCA": 0, "KIRC": 2} and layout.positions == 5
    assert layout.offset("KIRC") == 2 and layout.offset("LUAD") is None  # an unknown cancer has no positions
    assert GenomicLayout().offset("LUAD") == 0  # the empty layout: every cancer shares positions
    assert GenomicLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="max_genomic_tokens"):
        layout.check_fits(4)
    cohort = open_cohort([bank])
    moments = genomic_moments(cohort)
    assert GenomicLayout.of_cohort(cohort, 8) == GenomicLayout.of_moments(moments, 8)
    assert set(GenomicLayout.of_cohort(cohort, 8).genes) == set(cohort.cancer_codes())


def test_a_cancer_the_layout_does_not_know_goes_without_genomic_tokens(bank, tmp_path):
    cohort = open_cohort([bank])
    known = cohort.cancer_codes()[0]
    layout = GenomicLayout({known: len(cohort.refs[0].bank.genomic_feature_names(known))}, piece=8)
    trainer = SiteTrainer(CancerMoEConfig(feature_dim=16, tokens=8, batch_size=64), cohort,
                          edges=time_bin_edges(cohort.survival_months, cohort.censorship, 4), workdir=tmp_path,
                          genomic_layout=layout)
    batch = next(iter(trainer._batches(cohort, trainer.selectors, np.zeros(len(cohort), dtype=np.int64),
                                       np.arange(len(cohort)), train=False, rng=np.random.default_rng(0))))
    has_tokens = batch.genomics_mask.any(dim=1).numpy()
    for row, index in enumerate(batch.indices):
        ref = cohort.refs[index]
        assert has_tokens[row] == (ref.patient.cancer == known and ref.patient.has_genomics)


# --------------------------------------------------------------------------- selection without peeking


@pytest.mark.slow
def test_no_evaluation_patient_reaches_model_selection(bank, tmp_path, monkeypatch):
    """Every cohort the trainer scores while training and selecting is recorded: the held-out patients are
    scored once, after the last epoch, by the chosen model; validation patients are training patients."""
    cohort = open_cohort([bank])
    train, held = cohort.subset(range(90)), cohort.subset(range(90, len(cohort)))
    events: list[tuple[str, set[str]]] = []
    original = SiteTrainer.evaluate

    def recording(self, scored: Cohort):
        events.append(("evaluate", keys(scored)))
        return original(self, scored)

    monkeypatch.setattr(SiteTrainer, "evaluate", recording)
    config = load_config(overrides=[*SMALL, "epochs=6", "validation_fraction=0.25", "patience=3",
                                    "consolidate_after_epoch=1"])
    result = fit(config, train, held, tmp_path, device=torch.device("cpu"),
                 on_epoch=lambda report: events.append(("epoch", set())))
    last_epoch = max(i for i, (kind, _) in enumerate(events) if kind == "epoch")
    for i, (kind, scored) in enumerate(events):
        if kind == "evaluate" and scored & keys(held):
            assert i > last_epoch and scored == keys(held)
        if kind == "evaluate" and i < last_epoch:
            assert scored <= keys(train) and not scored & keys(held)
    assert 1 <= result.selected_epoch <= len(result.epochs)
    assert result.validation_cindex == max(r.validation_cindex for r in result.epochs)
    # The saved model is the selected one: loaded again, it scores the held-out patients identically.
    from cancermoe.experiment import load_model

    again = load_model(tmp_path / "model.pt", held, tmp_path / "again").evaluate(held)
    assert again.counts == result.evaluation.counts


def test_the_cox_term_changes_training_and_a_negative_weight_is_refused(bank, tmp_path):
    cohort = open_cohort([bank])
    weights = {}
    for weight in (0.0, 1.0):
        config = load_config(overrides=[*SMALL, "epochs=1", f"cox_loss_weight={weight}"])
        fit(config, cohort, None, tmp_path / f"cox-{weight}", device=torch.device("cpu"))
        weights[weight] = torch.load(tmp_path / f"cox-{weight}" / "model.pt", weights_only=False)["model"]
    assert any(not torch.equal(torch.as_tensor(weights[0.0][k]), torch.as_tensor(weights[1.0][k]))
               for k in weights[0.0])
    with pytest.raises(ValueError, match="cox_loss_weight must not be negative"):
        CancerMoEConfig(cox_loss_weight=-1.0)


def test_published_folds_are_read_by_case_id_and_bad_files_refused(bank, tmp_path):
    cohort = open_cohort([bank])
    ids = [ref.patient.case_id for ref in cohort.refs]
    folder = tmp_path / "splits"
    folder.mkdir()
    for k in range(2):
        val = ids[k::2]
        train = [c for c in ids if c not in val]
        rows = max(len(train), len(val))
        lines = ["train,val"] + [f"{train[i] if i < len(train) else ''},{val[i] if i < len(val) else ''}"
                                 for i in range(rows)]
        (folder / f"splits_{k}.csv").write_text("\n".join(lines) + "\n")
    folds = published_folds(cohort, folder)
    assert [len(h) for _, h in folds] == [60, 60] and not keys(folds[0][0]) & keys(folds[0][1])
    result = run_experiment(load_config(overrides=[*SMALL, "epochs=1"]), cohort, tmp_path / "run",
                            device=torch.device("cpu"), splits=folder)
    assert result.protocol.startswith("2 published folds") and "last epoch" in result.protocol
    (folder / "splits_1.csv").write_text("train,val\nnobody,\n")
    with pytest.raises(InputError, match="splits_1.csv: 1 case ids not in the banks"):
        published_folds(cohort, folder)
