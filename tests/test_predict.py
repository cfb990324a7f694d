"""`cmoe-predict` and what it computes: risk groups, survival per bin, heatmap files, unlabelled patients,
refusals of bad input, and the centralized path (`cmoe-train --out X`, then `cmoe-predict X BANK`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cancermoe.bank import UNLABELLED, BankWriter, open_bank
from cancermoe.cohort import labelled_patients, open_cohort
from cancermoe.errors import InputError
from cancermoe.heatmaps import geojson, write_geojson, write_heatmaps, write_patch_csv
from cancermoe.predict import (
    SlidePatches,
    bin_labels,
    load_model_state,
    predict_cohort,
    resolve_model_file,
    survival_per_bin,
)
from cancermoe.risk_groups import RiskGroups, risk_groups_from_risks
from cancermoe.survival import risk_from_hazard_logits
from cancermoe.synthetic import SynthSpec, synthesize_bank
from cancermoe.tables import read_survival_table
from cancermoe.train import load_checkpoint
from tests.predict_helpers import copy_bank

TINY = ["--set", "feature_dim=16", "--set", "batch_size=8", "--tokens", "32", "--epochs", "1"]


def synth(path: Path, seed: int = 3, patients: int = 24) -> Path:
    return synthesize_bank(path, SynthSpec(site=path.stem, patients=patients, cancers=("BRCA", "LUAD"), patches=60,
                                           seed=seed, feature_dim=16, genomic_features=8, signal_fraction=0.2))


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bank, the same patients without survival data, and `cmoe-train`'s run folder on the first."""
    root = tmp_path_factory.mktemp("trained")
    bank = synth(root / "site.h5")
    result = run_cli("cancermoe.cli.train", str(bank), "--out", str(root / "run"), *TINY,
                     "--set", "test_time_dps_passes=1")
    assert result.returncode == 0, result.stderr
    return {"bank": bank, "new": copy_bank(bank, root / "new.h5", unlabelled=True), "run": root / "run"}


# --------------------------------------------------------------------------- risk groups, survival


def test_risk_groups_are_tertiles_per_cancer_and_high_is_at_or_above_the_upper_threshold() -> None:
    risk = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0, 20.0, 30.0, 40.0])
    cancers = np.array(["A"] * 6 + ["B"] * 4, dtype=object)
    groups = risk_groups_from_risks(risk, cancers, "test")
    np.testing.assert_allclose(groups.thresholds["A"], np.quantile(risk[:6], [1 / 3, 2 / 3]))
    assert [groups.group("A", r) for r in (1.0, 3.0, 5.0, 6.0)] == ["low", "intermediate", "high", "high"]
    assert groups.group("A", groups.thresholds["A"][1]) == "high"
    assert groups.group("C", 1.0) == ""  # a cancer the model has no thresholds for
    assert RiskGroups.from_dict(groups.to_dict()) == groups
    few = risk_groups_from_risks(np.array([1.0, 2.0]), np.array(["A", "A"], dtype=object), "test")
    assert few.thresholds == {}  # fewer patients than groups: no thresholds


def test_survival_per_bin_is_the_product_of_one_minus_hazards_and_sums_to_minus_the_risk() -> None:
    logits = np.array([[0.0, 1.0, -1.0], [2.0, -3.0, 0.5]])
    hazards = 1 / (1 + np.exp(-logits))
    survival = survival_per_bin(logits)
    np.testing.assert_allclose(survival, np.cumprod(1 - hazards, axis=1))
    assert np.all(np.diff(survival, axis=1) <= 0)
    np.testing.assert_allclose(-survival.sum(axis=1), risk_from_hazard_logits(logits), rtol=1e-6)
    assert bin_labels([0.0, 12.5, np.inf]) == ["survival_0_0-12.5m", "survival_1_12.5-infm"]


# --------------------------------------------------------------------------- heatmap files


def _slide(bank: Path) -> SlidePatches:
    with open_bank(bank) as opened:
        slide_id = opened.patients[0].slide_ids[0]
        coords = opened.read_coords(slide_id)[:5].astype(np.int64)
        return SlidePatches(slide_id, opened.patients[0].case_id, open_bank(bank), coords,
                            np.linspace(0.1, 0.5, 5), ["key", "neighbour", "neighbour", "unseen", "unseen"], 256)


def test_heatmap_geojson_loads_back_as_tiles_of_the_patch_size_at_level0_coords(trained, tmp_path) -> None:
    slide = _slide(trained["bank"])
    loaded = json.loads(write_geojson(slide, tmp_path / "s.geojson").read_text())
    assert loaded["type"] == "FeatureCollection" and len(loaded["features"]) == 5
    for feature, (x, y), score in zip(loaded["features"], slide.coords.tolist(), slide.score, strict=True):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()  # a closed ring
        assert ring[:, 0].min() == x and ring[:, 1].min() == y
        assert ring[:, 0].max() - x == 256 and ring[:, 1].max() - y == 256
        properties = feature["properties"]
        assert properties["score"] == pytest.approx(score) and properties["measurements"]["score"] == properties[
            "score"]
        assert properties["classification"]["name"] == properties["role"] and properties["name"]
    assert loaded == geojson(slide)


def test_heatmap_csv_and_png_per_slide(trained, tmp_path) -> None:
    slide = _slide(trained["bank"])
    table = pd.read_csv(write_patch_csv(slide, tmp_path / "s.csv"))
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), slide.coords)
    assert table["is_key"].tolist() == [True, False, False, False, False]
    written = write_heatmaps([slide], tmp_path / "maps")
    assert sorted(p.suffix for p in written) == [".csv", ".geojson", ".png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert not [p for p in (tmp_path / "maps").iterdir() if p.name.startswith(".")]  # no temporary file left


# --------------------------------------------------------------------------- unlabelled patients


def test_a_table_without_survival_imports_unlabelled_patients_and_training_skips_them(tmp_path) -> None:
    rows = pd.DataFrame({"case_id": ["TCGA-AA-0001", "TCGA-AA-0002"], "slide_id": ["s1.svs", "s2.svs"],
                         "oncotree_code": ["BLCA", "BLCA"], "age": [60, 70], "TP53_mut": [0.0, 1.0],
                         "MYC_cnv": [1.0, 2.0]})
    rows.to_csv(tmp_path / "tcga_blca_new.csv", index=False)  # no survival_months, no censorship
    table = read_survival_table(tmp_path / "tcga_blca_new.csv")
    assert [p.labelled for p in table.patients] == [False, False]
    assert all(np.isnan(p.survival_months) and p.censorship == UNLABELLED for p in table.patients)
    rows.assign(survival_months=[10.0, np.nan], censorship=[0, np.nan]).to_csv(tmp_path / "tcga_blca_mixed.csv",
                                                                               index=False)
    mixed = read_survival_table(tmp_path / "tcga_blca_mixed.csv")
    assert [p.labelled for p in mixed.patients] == [True, False]
    bank = tmp_path / "mixed.h5"
    with BankWriter(bank, feature_dim=4, source="test") as writer:
        writer.set_genomic_features("BLCA", ["TP53_mut", "MYC_cnv"])
        for p in mixed.patients:
            writer.add_patient(p.case_id, p.cancer, p.survival_months, p.censorship, genomics=p.genomics)
    notes: list[str] = []
    cohort = labelled_patients(open_cohort([bank]), "training", notes.append)
    assert len(cohort) == 1 and notes == [f"{bank}: 1 patient(s) without survival data skipped for training "
                                          "(they can be predicted with cmoe-predict)"]


@pytest.mark.bad_input
def test_half_a_label_is_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="survival time 3.0 given for an unlabelled patient"):
        with BankWriter(tmp_path / "a.h5", feature_dim=4, source="test") as writer:
            writer.add_patient("c", "X", 3.0, UNLABELLED)


# --------------------------------------------------------------------------- the CLI, centralized


def test_train_then_predict_a_labelled_and_an_unlabelled_bank(trained, tmp_path) -> None:
    model = load_checkpoint(trained["run"] / "model.pt")
    assert model["risk_groups"]["source"].startswith("predicted risks of the")  # fixed when the model was saved
    result = run_cli("cancermoe.cli.predict", str(trained["run"]), str(trained["bank"]), "--out",
                     str(tmp_path / "p"), "--device", "cpu", "--heatmaps", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(table) == 24 and table["labelled"].all()
    assert set(table["risk_group"]) <= {"low", "intermediate", "high"}
    survival = table.filter(like="survival_").drop(columns="survival_months").to_numpy()
    np.testing.assert_allclose(-survival.sum(axis=1), table["risk"], rtol=1e-5)
    # The c-index printed is that of the risks written, per cancer.
    cohort = open_cohort([trained["bank"]])
    prediction = predict_cohort(model, cohort, patches=False)
    np.testing.assert_allclose(prediction.risk, table["risk"], rtol=1e-6)
    assert summary["cindex"]["all"]["cindex"] == pytest.approx(prediction.evaluation().cindex)
    assert summary["test_time_dps_passes"] == 1
    km = pd.read_csv(tmp_path / "p" / "km_by_risk_group.csv")
    assert set(km["cancer"]) == {"BRCA", "LUAD"} and (tmp_path / "p" / "km_by_risk_group.png").stat().st_size > 0
    slides = sum(len(p.slide_ids) for p in open_bank(trained["bank"]).patients)
    assert len(list((tmp_path / "p" / "heatmaps").glob("*.geojson"))) == slides

    new = run_cli("cancermoe.cli.predict", str(trained["run"] / "model.pt"), str(trained["new"]), "--out",
                  str(tmp_path / "q"), "--device", "cpu")
    assert new.returncode == 0, new.stderr
    unlabelled = pd.read_csv(tmp_path / "q" / "predictions.csv")
    assert len(unlabelled) == 24 and not unlabelled["labelled"].any() and "c-index" not in new.stdout
    np.testing.assert_allclose(unlabelled["risk"], table["risk"], rtol=1e-6)  # same patients, same risks
    assert not (tmp_path / "q" / "km_by_risk_group.csv").exists()


@pytest.mark.bad_input
def test_bad_inputs_are_one_line(trained, tmp_path) -> None:
    missing = tmp_path / "absent.pt"
    result = run_cli("cancermoe.cli.predict", str(missing), str(trained["bank"]), "--out", str(tmp_path / "p"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: {missing}: no such model file or folder"

    not_model = tmp_path / "junk.pt"
    not_model.write_text("not a model")
    result = run_cli("cancermoe.cli.predict", str(not_model), str(trained["bank"]), "--out", str(tmp_path / "p"))
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {not_model}: not a CancerMoE model")

    wide = synthesize_bank(tmp_path / "wide.h5", SynthSpec(site="w", patients=4, patches=20, feature_dim=8,
                                                           genomic_features=8))
    result = run_cli("cancermoe.cli.predict", str(trained["run"]), str(wide), "--out", str(tmp_path / "p"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {wide}: feature dimension 8, but the model expects 16"
    assert not (tmp_path / "p").exists()  # nothing written

    torch.save({"config": {}}, tmp_path / "partial.pt")
    with pytest.raises(InputError, match="no config, time bins and weights"):
        load_model_state(tmp_path / "partial.pt")
    (tmp_path / "folds" / "fold-0").mkdir(parents=True)
    torch.save({}, tmp_path / "folds" / "fold-0" / "model.pt")
    with pytest.raises(InputError, match="holds 1 fold models, not one"):
        resolve_model_file(tmp_path / "folds")
