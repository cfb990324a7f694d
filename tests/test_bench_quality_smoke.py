"""bench/quality.py still runs: every section once at tiny sizes, and its region finder points at the planted region.

Not a measurement (one epoch on a few dozen patients means nothing); the full-size
command is in the script's docstring.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cancermoe.bank import open_bank
from cancermoe.synthetic import TUMOUR, SynthSpec, draw_biology, synthesize_bank
from tests.conftest import TCGA_DIR

pytestmark = pytest.mark.process  # each benchmark runs as its own Python process

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--epochs", "1", "--threads", "1", "--world-seeds", "0", "--train-seeds", "0", "--patients", "24",
        "--dps-patients", "16", "--dps-patches", "300", "--studies", "kirc", "--max-folds", "1",
        "--cox-inner-folds", "2", "--tcga-dir", str(TCGA_DIR)]
HEADERS = {
    "world": "| world seed | train / eval patients | oracle c-index | CancerMoE c-index [95% interval] |",
    "ablation": "| variant | BRCA | LUAD | mean | sd over seeds | params |",
    "dps-vs-random": "| selection | c-index site C (unseen) | c-index training patients | region tokens epoch 1 |",
    "tcga": "| study | patients (deaths) | genomic values / tokens | CancerMoE, one model |",
}


def run_quality(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "quality.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_all_sections_print_their_tables(tmp_path) -> None:
    done = run_quality("all", "--workdir", str(tmp_path), *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for header in HEADERS.values():
        assert out.count(header) == 2, header  # once as the section ends, once in the closing summary
    for row in ("CancerMoE", "w/o DPS", "w/o ACS", "w/o SMoE", "w/o genomic profiles", "Random Select", "oracle"):
        assert re.search(rf"^\| {row} \| \d\.\d{{3}} \|", out, re.MULTILINE), row
    # The region is 1% of each slide (3 of ~300 patches): what a uniform draw of tokens lands in.
    share = re.search(r"^\| DPS \(CancerMoE\) \|.* \| (\d+\.\d)% \|$", out, re.MULTILINE)
    assert share and 0.5 <= float(share.group(1)) <= 2.0, out
    assert re.search(r"^\| KIRC \| 345 \(92\) \| 2503 / 313 \| \d\.\d{3} \|", out, re.MULTILINE), out
    for section in HEADERS:
        assert re.search(rf"^\| {section} \| \d+\.\d \|$", out, re.MULTILINE), section


def test_the_default_world_section_prints_its_table_at_tiny_sizes(tmp_path) -> None:
    done = run_quality("default-world", "--workdir", str(tmp_path), "--default-world-patients", "20",
                       "--default-world-patches", "20", "--default-world-feature-dim", "8",
                       "--default-world-epochs", "1", "--default-world-tokens", "8", "--train-seeds", "0", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| training seed | CancerMoE c-index [95% interval] |") == 1
    assert re.search(r"^\| mean \+- sd \| \d\.\d{3} ± \d\.\d{3} \|", done.stdout, re.MULTILINE), done.stdout
    # The linear references on the same patients, the one told where the planted region is included.
    assert re.search(r"^\| elastic-net Cox, genomics \| \d\.\d{3} \[", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^\| elastic-net Cox, told the region: [^|]+\| \d\.\d{3} \[", done.stdout, re.MULTILINE)


def test_the_tcga_section_prints_an_ensemble_beside_its_members(tmp_path) -> None:
    done = run_quality("tcga", "--workdir", str(tmp_path), *TINY, "--set", "ensemble_size=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("| study | patients (deaths) | genomic values / tokens | CancerMoE, one model (mean over the 2 members) "
            "| CancerMoE, ensemble of 2 | CancerMoE on training folds |") in done.stdout
    assert "| ensemble - Cox (paired by fold) | one model - Cox (paired by fold) |" in done.stdout
    assert re.search(r"^\| KIRC \| 345 \(92\) \| 2503 / 313 \| \d\.\d{3} \| \d\.\d{3} \|", done.stdout, re.MULTILINE)
    assert "2 models from seeds 0-1" in done.stdout


def test_the_tcga_section_names_what_inner_cross_validation_chose_per_fold(tmp_path) -> None:
    done = run_quality("tcga", "--workdir", str(tmp_path), *TINY, "--set", "inner_cv_grid=dropout=0.1,0.3",
                       "--set", "inner_cv_folds=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^KIRC chosen by inner cross-validation of each training fold \(dropout=0.1,0.3\): "
                     r"fold 0: dropout=0\.[13] \(inner c-index \d\.\d{3} / \d\.\d{3}\)\.", done.stdout,
                     re.MULTILINE), done.stdout


@pytest.mark.bad_input
def test_a_missing_tcga_folder_is_one_line_error(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    done = run_quality("tcga", "--workdir", str(tmp_path), "--tcga-dir", str(missing))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {missing / 'tcga_blca_all_clean.csv.zip'}: no such file "
                                   "(set --tcga-dir to the folder of the TCGA tables)")


@pytest.fixture(scope="module")
def quality_module():
    sys.path.insert(0, str(BENCH))
    try:
        import quality

        yield quality
    finally:
        sys.path.remove(str(BENCH))


def test_region_masks_mark_the_tumour_patches_in_bank_row_order(quality_module, tmp_path) -> None:
    """The masks follow the bank's curve order: the rows they mark hold tumour-prototype features."""
    spec = SynthSpec(site="R", patients=4, cancers=("BRCA",), patches=400, seed=5, feature_dim=32,
                     genomic_features=8, signal_fraction=0.05, feature_dtype="float32")
    path = synthesize_bank(tmp_path / "r.h5", spec)
    masks = quality_module.region_masks(path, spec)
    biology = draw_biology("BRCA", spec.world_seed, spec.feature_dim, spec.genomic_features)
    with open_bank(path) as bank:
        assert set(masks) == set(bank.slide_ids())
        for slide_id, mask in masks.items():
            features = bank.read_features(slide_id, np.arange(bank.n_patches(slide_id)))
            nearest = np.argmin(((features[:, None, :] - biology.prototypes[None]) ** 2).sum(-1), axis=1)
            assert mask.sum() == round(0.05 * mask.size)
            np.testing.assert_array_equal(nearest == TUMOUR, mask)
