"""Synthetic cohorts: reproducible, with the planted signal where the design puts it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from cancermoe.bank import open_bank, validate_bank
from cancermoe.cli.bank import app
from cancermoe.cli.common import run_app
from cancermoe.errors import InputError
from cancermoe.summary import summarize_bank
from cancermoe.synthetic import (
    PATCH_STEP_PX,
    SynthSpec,
    draw_biology,
    draw_cohort,
    draw_slide_layout,
    draw_world,
    synthesize_bank,
)

SMALL = dict(feature_dim=32, patches=200, genomic_features=16)


def _datasets(path: Path) -> dict[str, bytes | list]:
    """Every dataset of an HDF5 file by name: raw bytes, or a list for strings (stored as pointers)."""
    out: dict[str, bytes | list] = {}

    def take(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset):
            values = obj[()]
            out[name] = values.tolist() if values.dtype == object else values.tobytes()

    with h5py.File(path, "r") as h5:
        h5.visititems(take)
    return out


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize("bad", [
    dict(cancers=()),
    dict(cancers=("BRCA", "BRCA")),
    dict(cancers=("BR/CA",)),
    dict(site=""),
    dict(patients=0),
    dict(event_rate=0.0),
    dict(signal_fraction=1.5),
    dict(genomic_features=2),
    dict(feature_dtype="int8"),
    dict(seed=-1),
    dict(risk_sd=-1.0),
])
@pytest.mark.bad_input
def test_nonsense_spec_is_a_one_line_error_naming_the_output(tmp_path, bad):
    out = tmp_path / "bank.h5"
    with pytest.raises(InputError) as err:
        synthesize_bank(out, SynthSpec(**{**SMALL, **bad}))
    assert err.value.where == str(out)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- determinism and the world


def test_same_spec_gives_byte_identical_bank(tmp_path):
    spec = SynthSpec(patients=12, **SMALL)
    first = _datasets(synthesize_bank(tmp_path / "a.h5", spec))
    second = _datasets(synthesize_bank(tmp_path / "b.h5", spec))
    assert first.keys() == second.keys()
    assert any(name.endswith("/features") for name in first)
    for name in first:
        assert first[name] == second[name], name


def test_another_seed_draws_other_patients_in_the_same_world(tmp_path):
    site_a = SynthSpec(patients=12, seed=1, **SMALL)
    site_b = SynthSpec(patients=12, seed=2, **SMALL)
    with open_bank(synthesize_bank(tmp_path / "a.h5", site_a)) as a, \
            open_bank(synthesize_bank(tmp_path / "b.h5", site_b)) as b:
        assert not np.allclose(a.oracle_risk, b.oracle_risk)
        assert not np.allclose(a.survival_months(), b.survival_months())
        assert [p.cancer for p in a.patients] != [p.cancer for p in b.patients]
    world_a, world_b = draw_world(site_a), draw_world(site_b)
    for cancer in site_a.cancers:
        for field in ("background_prototypes", "tumour_prototype", "pattern", "genomic_effect_index"):
            np.testing.assert_array_equal(getattr(world_a[cancer], field), getattr(world_b[cancer], field))
        assert world_a[cancer].baseline_log_hazard == world_b[cancer].baseline_log_hazard


def test_world_seed_fixes_each_cancer_whatever_the_cancer_mix():
    luad_alone = draw_world(SynthSpec(cancers=("LUAD",), world_seed=3))["LUAD"]
    luad_in_mix = draw_world(SynthSpec(cancers=("BRCA", "KIRC", "LUAD"), world_seed=3))["LUAD"]
    np.testing.assert_array_equal(luad_alone.pattern, luad_in_mix.pattern)
    np.testing.assert_array_equal(luad_alone.tumour_prototype, luad_in_mix.tumour_prototype)
    other_world = draw_world(SynthSpec(cancers=("LUAD",), world_seed=4))["LUAD"]
    assert not np.allclose(luad_alone.pattern, other_world.pattern)


def test_cancers_carry_different_patterns_and_genes():
    brca = draw_biology("BRCA", world_seed=0, feature_dim=1024, genomic_features=64)
    luad = draw_biology("LUAD", world_seed=0, feature_dim=1024, genomic_features=64)
    assert np.linalg.norm(brca.pattern) == pytest.approx(1.0, abs=1e-5)
    # Random unit vectors in 1024 dimensions have |cos| ~ 0.03: the patterns are unrelated.
    assert abs(float(brca.pattern @ luad.pattern)) < 0.15
    assert not np.array_equal(brca.genomic_effect_index, luad.genomic_effect_index)


# --------------------------------------------------------------------------- survival


@pytest.mark.parametrize("event_rate", [0.2, 0.5, 0.9])
def test_event_fraction_follows_event_rate_and_times_look_clinical(event_rate):
    cohort = draw_cohort(SynthSpec(patients=500, event_rate=event_rate, **SMALL))
    events = np.array([p.censorship == 0 for p in cohort])
    months = np.array([p.survival_months for p in cohort])
    assert abs(events.mean() - event_rate) <= 0.02
    assert (months > 0).all()
    assert 3 < np.median(months) < 120


def test_oracle_cindex_is_high(tmp_path):
    # Within a cancer the log-hazard has SD 1, so a random pair differs by d ~ N(0, 2) and, with exponential
    # times, the earlier death is the higher risk with probability E[sigmoid(|d|)] ~ 0.725 (a little more
    # across cancers, whose baselines differ). 800 patients put the c-index's standard error near 0.01.
    spec = SynthSpec(patients=800, patches=32, feature_dim=8, genomic_features=16)
    path = synthesize_bank(tmp_path / "bank.h5", spec)
    with open_bank(path) as bank:
        summary = summarize_bank(bank)
    assert summary["oracle_cindex"] > 0.7


def test_risk_sd_scales_the_true_log_hazard_and_raises_the_oracle_cindex(tmp_path):
    # Same seed, same latents: the log-hazard around each cancer's baseline is exactly twice as wide, and a
    # wider spread of hazards orders more pairs correctly (E[sigmoid(|d|)] with d ~ N(0, 8): ~0.82).
    small = dict(patients=800, patches=32, feature_dim=8, genomic_features=16)
    base, strong = draw_cohort(SynthSpec(**small)), draw_cohort(SynthSpec(risk_sd=2.0, **small))
    world = draw_world(SynthSpec(**small))
    baseline = [world[p.cancer].baseline_log_hazard for p in base]
    spread = [(s.oracle_risk - b0) / (b.oracle_risk - b0) for b, s, b0 in zip(base, strong, baseline, strict=True)]
    assert np.allclose(spread, 2.0)
    path = synthesize_bank(tmp_path / "strong.h5", SynthSpec(risk_sd=2.0, **small))
    with open_bank(path) as bank:
        assert summarize_bank(bank)["oracle_cindex"] > 0.78


# --------------------------------------------------------------------------- slides and the planted region


def test_prognostic_region_is_contiguous_sized_and_carries_the_risk(tmp_path):
    spec = SynthSpec(**{**SMALL, "patches": 400}, patients=150, cancers=("LUAD",), signal_fraction=0.05)
    biology = draw_world(spec)["LUAD"]
    cohort = draw_cohort(spec)
    path = synthesize_bank(tmp_path / "bank.h5", spec)
    region_score, background_score, risk = [], [], []
    with open_bank(path) as bank:
        for patient in cohort:
            for s, n in enumerate(patient.slide_patches):
                slide_id = patient.slide_id(s)
                layout = draw_slide_layout(spec, patient.index, s, n)
                source = bank.source_rows(slide_id)
                np.testing.assert_array_equal(bank.read_coords(slide_id), layout.coords[source])
                assert (layout.coords % PATCH_STEP_PX == 0).all()
                assert len(np.unique(layout.coords, axis=0)) == n
                region = layout.region
                assert region.sum() == round(spec.signal_fraction * n)
                cells = layout.coords // PATCH_STEP_PX
                grid = np.zeros(cells.max(axis=0) + 1, dtype=bool)
                grid[cells[region, 0], cells[region, 1]] = True
                assert ndimage.label(grid)[1] == 1  # one 4-connected piece
                in_region = region[source]  # bank row -> is it a region patch
                projection = bank.read_features(slide_id, np.arange(n)) @ biology.pattern
                region_score.append(projection[in_region].mean())
                background_score.append(projection[~in_region].mean())
                risk.append(patient.oracle_risk)
    # One cancer: risk = const + 0.8 z_img + 0.6 z_gen, and a region's mean projection is const + 1.5 z_img plus
    # noise of SD 1/sqrt(20), so it correlates with the risk at ~0.8; the background carries no z_img.
    assert len(risk) > 100
    assert np.corrcoef(region_score, risk)[0, 1] > 0.6
    assert abs(np.corrcoef(background_score, risk)[0, 1]) < 0.3


def test_patients_without_slides_or_genomics_exist_and_bank_validates(tmp_path):
    spec = SynthSpec(patients=300, patches=40, feature_dim=8, genomic_features=16)
    path = synthesize_bank(tmp_path / "bank.h5", spec)
    with open_bank(path) as bank:
        validate_bank(bank)
        patients = bank.patients
        assert any(not p.has_slides for p in patients)
        assert any(not p.has_genomics for p in patients)
        assert all(p.has_slides or p.has_genomics for p in patients)
        assert any(len(p.slide_ids) == 2 for p in patients)
        assert max(len(p.slide_ids) for p in patients) == 2
        sizes = np.array([bank.n_patches(s) for s in bank.slide_ids()])
        assert sizes.min() >= 20 and sizes.max() <= 60
        assert len(np.unique(sizes)) > 10  # slides vary in size
        for p in patients:
            if p.has_genomics:
                assert bank.genomics(p).shape == (16,)
        assert bank.attrs["source"] == "synthetic"
        assert bank.attrs["site"] == "A"
        assert (bank.attrs["seed"], bank.attrs["world_seed"]) == (1, 0)
        assert SynthSpec(**{**json.loads(bank.attrs["synth_spec"]), "cancers": ("BRCA", "LUAD")}) == spec


# --------------------------------------------------------------------------- memory


_ONE_BIG_SLIDE = textwrap.dedent("""
    import dataclasses, resource, sys
    from cancermoe.bank import BankWriter
    from cancermoe.synthetic import SynthSpec, add_synthetic_slide, draw_cohort, draw_world

    spec = SynthSpec(patients=1, cancers=("BRCA",), feature_dim=1024)
    world = draw_world(spec)
    patient = draw_cohort(spec, world)[0]
    small = dataclasses.replace(patient, index=1, case_id="warm-up", slide_patches=(5000,))
    big = dataclasses.replace(patient, slide_patches=(200_000,))
    with BankWriter(sys.argv[1], feature_dim=1024, source="synthetic") as writer:
        add_synthetic_slide(writer, spec, world["BRCA"], small, 0)  # warm-up: imports, HDF5 buffers
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        slide_id = add_synthetic_slide(writer, spec, world["BRCA"], big, 0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        writer.add_patient("P", "BRCA", 10.0, 0, slide_ids=[slide_id])
    print(after - before, slide_id)  # KiB
""")


@pytest.mark.process
def test_a_200k_patch_slide_is_generated_without_holding_it(tmp_path):
    out = tmp_path / "big.h5"
    result = subprocess.run([sys.executable, "-c", _ONE_BIG_SLIDE, str(out)], capture_output=True, text=True,
                            check=True)
    growth_kib, slide_id = result.stdout.split()
    growth_mb = int(growth_kib) / 1024
    slide_mb = 200_000 * 1024 * 2 / 2**20  # ~390 MiB of float16
    assert growth_mb < slide_mb / 4
    with open_bank(out) as bank:
        assert bank.n_patches(slide_id) == 200_000


# --------------------------------------------------------------------------- command line


def _cmoe_bank(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cancermoe.cli.bank", *args], capture_output=True, text=True)


@pytest.mark.process
@pytest.mark.bad_input
def test_cli_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "site.h5"
    made = _cmoe_bank("synth", str(out), "--site", "B", "--patients", "30", "--cancers", "KIRC,LUAD",
                      "--patches", "50", "--feature-dim", "16", "--genomic-features", "16", "--seed", "7")
    assert made.returncode == 0, made.stderr
    inspected = _cmoe_bank("inspect", "--json", str(out))
    assert inspected.returncode == 0, inspected.stderr
    summary = json.loads(inspected.stdout)
    assert summary["patients"] == 30
    assert set(summary["cancers"]) <= {"KIRC", "LUAD"} and sum(summary["cancers"].values()) == 30
    assert summary["site"] == "B"
    assert 0.5 < summary["oracle_cindex"] <= 1.0

    # The same command again, in-process (the entry point's code path without another interpreter start).
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(SystemExit) as exit_:
        run_app(app, ["synth", str(out), "--patients", "5", "--patches", "20", "--feature-dim", "4"])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and str(out) in stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
