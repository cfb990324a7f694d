"""Synthetic cohorts with a planted prognostic signal and a known answer.

A synthetic bank looks like an imported one (slides of patch features on a
256-pixel grid, a patient table, per-cancer genomics) but every patient's true
log-hazard is known and stored as its oracle risk, so a model trained on it can
be scored against the best possible c-index.

Two seeds, two roles:

* ``world_seed`` fixes the shared biology of each cancer (`CancerBiology`):
  a handful of background tissue prototypes, a tumour prototype with a
  prognostic direction ("pattern") in feature space, a few prognostic genomic
  features and a baseline hazard. Each cancer's biology is drawn from
  (world_seed, cancer code) alone, so banks of several sites built with the
  same world seed share it whatever their cancer mix.
* ``seed`` draws this site's patients: latents, modalities, slides, features
  and survival. Sites differ in patients (and, through ``cancers`` and
  ``patients``, in mix and size: non-IID federations).

The model of one patient of cancer c, with independent latents
z_img, z_gen ~ N(0, 1)::

    oracle_risk = log-hazard per month
                = baseline_log_hazard[c] + risk_sd * (IMAGE_RISK_WEIGHT * z_img + GENOMIC_RISK_WEIGHT * z_gen)

* each slide has a spatially contiguous tumour region of about
  ``signal_fraction`` of its patches (a disc grown on the patch grid from a
  random centre); its patches are tumour_prototype[c] + PATTERN_GAIN * z_img *
  pattern[c] + noise, the other patches background_prototype[c, k] + noise,
  with k a spatially coherent tissue compartment;
* genomic feature j of the cancer's prognostic ones is loading[c, j] * z_gen +
  noise, the others noise;
* survival is exponential with hazard exp(oracle_risk) (months); censoring
  times are uniform on [0, follow_up], independent of survival, with the
  follow-up length set so the fraction of observed deaths is ``event_rate``.

Every random draw comes from a `numpy.random.SeedSequence` keyed by
(seed, purpose, patient, slide, block), so the same spec gives byte-identical
features and identical tables, and any block can be regenerated alone.
Slides are generated block by block in curve order (see `cancermoe.bank`):
a slide of a million patches never sits in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cancermoe.bank import FEATURE_DTYPES, BankWriter, curve_order
from cancermoe.errors import InputError

PATCH_STEP_PX = 256  # patch grid step, level-0 pixels (CLAM's default 256-pixel patches)
BLOCK_ROWS = 4096  # feature rows generated at once; part of the random keying, so changing it changes features
MIN_PATCHES = 16

BACKGROUND_TISSUES = 5  # background tissue prototypes per cancer
# Patch noise is standard normal per feature dimension: it is the unit of feature space.
PROTOTYPE_SD = 1.0  # per dimension, of the prototypes: clusters lie ~sqrt(2 D) apart, far beyond the noise
PATTERN_GAIN = 1.5  # shift of a tumour patch along the pattern per unit z_img, in noise SDs

IMAGE_RISK_WEIGHT = 0.8  # log-hazard per unit z_img
GENOMIC_RISK_WEIGHT = 0.6  # log-hazard per unit z_gen; with the above, the risk SD within a cancer is 1
GENOMIC_EFFECTS = 4  # prognostic genomic features per cancer
GENOMIC_LOADING = 1.0  # |value shift| of a prognostic genomic feature per unit z_gen, in noise SDs
MEDIAN_SURVIVAL_MONTHS = (24.0, 72.0)  # range of a cancer's median survival at z = 0

P_NO_SLIDE = 0.05
P_NO_GENOMICS = 0.05  # never both: every patient has at least one modality
P_TWO_SLIDES = 0.2  # among patients with slides

# First element of each random key: which draw it is for, so no two draws share a stream.
_COHORT, _SLIDE_LAYOUT, _FEATURES = 0, 1, 2

_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SynthSpec:
    """Everything that defines a synthetic bank; the same spec gives the same bank."""

    site: str = "A"
    patients: int = 200
    cancers: tuple[str, ...] = ("BRCA", "LUAD")
    patches: int = 5000  # typical patches per slide; each slide draws uniformly in [0.5, 1.5] x this
    seed: int = 1  # draws this site's patients
    world_seed: int = 0  # fixes the biology shared by all sites
    feature_dim: int = 1024
    event_rate: float = 0.5  # fraction of patients with an observed death
    signal_fraction: float = 0.01  # fraction of a slide's patches in its prognostic region
    genomic_features: int = 64
    feature_dtype: str = "float16"
    # SD of the true log-hazard within a cancer: 1 gives an oracle c-index near 0.73, 2 near 0.82. Both
    # latents scale alike, so the image and genomic shares of the risk stay 64% / 36% of its variance.
    risk_sd: float = 1.0
    # Share of each cancer among this site's patients, in `cancers` order (a site's non-IID mix, e.g. a
    # Dirichlet draw); empty: every cancer equally likely (the draw banks made before this field used).
    cancer_mix: tuple[float, ...] = ()

    def check(self, where: str | os.PathLike[str]) -> None:
        """Raise `InputError` (naming ``where``) for the first value that makes no cohort."""
        problems = [
            (not _CODE.match(self.site), f"site {self.site!r} must be letters, digits, '_', '.', '-'"),
            (self.patients < 1, f"patients {self.patients} must be at least 1"),
            (len(self.cancers) == 0, "no cancers given"),
            (any(not _CODE.match(c) for c in self.cancers), f"cancer codes {list(self.cancers)} must be "
                                                            "letters, digits, '_', '.', '-'"),
            (len(set(self.cancers)) != len(self.cancers), f"cancer codes {list(self.cancers)} repeat"),
            (self.patches < 1, f"patches {self.patches} must be at least 1"),
            (self.seed < 0 or self.world_seed < 0, f"seeds ({self.seed}, {self.world_seed}) must be >= 0"),
            (self.feature_dim < 1, f"feature dim {self.feature_dim} must be at least 1"),
            (not 0.0 < self.event_rate <= 1.0, f"event rate {self.event_rate} must be in (0, 1]"),
            (not 0.0 <= self.signal_fraction <= 1.0, f"signal fraction {self.signal_fraction} must be in [0, 1]"),
            (not 0.0 <= self.risk_sd <= 10.0, f"risk SD {self.risk_sd} must be in [0, 10]"),
            (self.genomic_features < GENOMIC_EFFECTS,
             f"genomic features {self.genomic_features} must be at least {GENOMIC_EFFECTS}"),
            (self.feature_dtype not in FEATURE_DTYPES,
             f"feature dtype {self.feature_dtype!r} not one of {FEATURE_DTYPES}"),
            (bool(self.cancer_mix) and (len(self.cancer_mix) != len(self.cancers)
                                        or any(not w >= 0 for w in self.cancer_mix) or sum(self.cancer_mix) <= 0),
             f"cancer mix {list(self.cancer_mix)} must give one share >= 0 per cancer, not all 0"),
        ]
        for bad, problem in problems:
            if bad:
                raise InputError(where, problem)

    def to_json(self) -> str:
        spec = dataclasses.asdict(self)
        if not self.cancer_mix:  # the spec of a uniform mix reads as it did before the field existed
            del spec["cancer_mix"]
        return json.dumps(spec, sort_keys=True)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for ``key`` (purpose, patient, slide, ...) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class CancerBiology:
    """What one cancer looks like, shared by every site of one world. Feature vectors are float32 [D]."""

    cancer: str
    background_prototypes: np.ndarray  # [BACKGROUND_TISSUES, D]
    tumour_prototype: np.ndarray  # [D]
    pattern: np.ndarray  # [D], unit length: the direction along which tumour patches carry z_img
    genomic_effect_index: np.ndarray  # [GENOMIC_EFFECTS] columns of the genomic vector that carry z_gen
    genomic_effect_loading: np.ndarray  # [GENOMIC_EFFECTS] shift per unit z_gen (signed)
    baseline_log_hazard: float  # log(deaths per month) at z_img = z_gen = 0

    @property
    def prototypes(self) -> np.ndarray:
        """Background prototypes, then the tumour prototype: row k is tissue label k."""
        return np.vstack([self.background_prototypes, self.tumour_prototype[None]])


TUMOUR = BACKGROUND_TISSUES  # tissue label of the prognostic region's patches


def draw_biology(cancer: str, world_seed: int, feature_dim: int, genomic_features: int) -> CancerBiology:
    """One cancer's biology, a function of (world_seed, cancer code) and the dimensions only."""
    # A stable hash of the code (Python's hash() is salted per process).
    code_key = int.from_bytes(hashlib.sha256(cancer.encode()).digest()[:8], "little")
    rng = np.random.default_rng(np.random.SeedSequence([world_seed, code_key]))
    prototypes = (PROTOTYPE_SD * rng.standard_normal((BACKGROUND_TISSUES + 1, feature_dim))).astype(np.float32)
    pattern = rng.standard_normal(feature_dim)
    pattern = (pattern / np.linalg.norm(pattern)).astype(np.float32)
    effect_index = np.sort(rng.choice(genomic_features, size=GENOMIC_EFFECTS, replace=False))
    effect_loading = GENOMIC_LOADING * rng.choice([-1.0, 1.0], size=GENOMIC_EFFECTS)
    median_months = rng.uniform(*MEDIAN_SURVIVAL_MONTHS)
    return CancerBiology(
        cancer=cancer,
        background_prototypes=prototypes[:BACKGROUND_TISSUES],
        tumour_prototype=prototypes[BACKGROUND_TISSUES],
        pattern=pattern,
        genomic_effect_index=effect_index,
        genomic_effect_loading=effect_loading,
        baseline_log_hazard=float(np.log(np.log(2.0) / median_months)),
    )


def draw_world(spec: SynthSpec) -> dict[str, CancerBiology]:
    return {c: draw_biology(c, spec.world_seed, spec.feature_dim, spec.genomic_features) for c in spec.cancers}


def genomic_feature_names(genomic_features: int) -> list[str]:
    return [f"gene{j:04d}" for j in range(genomic_features)]


# --------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class SynthPatient:
    """One drawn patient. ``slide_patches`` has one entry per slide (empty: no slide)."""

    index: int
    case_id: str
    cancer: str
    image_latent: float  # z_img: carried by the slides' tumour regions
    genomic_latent: float  # z_gen: carried by the prognostic genomic features
    oracle_risk: float  # the true log-hazard per month
    survival_months: float
    censorship: int  # 1 = censored, 0 = death observed
    slide_patches: tuple[int, ...]
    genomics: np.ndarray | None  # float32 [genomic_features], None: no genomics

    def slide_id(self, slide_index: int) -> str:
        return f"{self.case_id}-S{slide_index + 1}"


def draw_cohort(spec: SynthSpec, world: dict[str, CancerBiology] | None = None) -> list[SynthPatient]:
    """This site's patients: latents, oracle risk, survival, modalities, slide sizes and genomics."""
    world = world if world is not None else draw_world(spec)
    n = spec.patients
    rng = _rng(spec.seed, _COHORT)
    # Every draw is made for every patient, in a fixed order, so each column depends on the seed only.
    if spec.cancer_mix:
        mix = np.asarray(spec.cancer_mix, dtype=np.float64)
        cancer_index = rng.choice(len(spec.cancers), size=n, p=mix / mix.sum())
    else:
        cancer_index = rng.integers(len(spec.cancers), size=n)
    image_latent, genomic_latent = rng.standard_normal((2, n))
    modality = rng.choice(3, size=n, p=[1 - P_NO_SLIDE - P_NO_GENOMICS, P_NO_SLIDE, P_NO_GENOMICS])
    two_slides = rng.random(n) < P_TWO_SLIDES
    slide_scale = rng.uniform(0.5, 1.5, size=(n, 2))
    genomic_noise = rng.standard_normal((n, spec.genomic_features)).astype(np.float32)
    death_draw = rng.standard_exponential(n)
    censor_draw = rng.random(n)

    cancers = [spec.cancers[i] for i in cancer_index]
    baseline = np.array([world[c].baseline_log_hazard for c in cancers])
    oracle_risk = baseline + spec.risk_sd * (IMAGE_RISK_WEIGHT * image_latent + GENOMIC_RISK_WEIGHT * genomic_latent)
    months, censorship = survival_times(oracle_risk, death_draw, censor_draw, spec.event_rate)
    patches = np.maximum(MIN_PATCHES, np.rint(slide_scale * spec.patches)).astype(int)

    cohort = []
    for i in range(n):
        n_slides = 0 if modality[i] == 1 else 1 + int(two_slides[i])
        genomics = None
        if modality[i] != 2:
            biology = world[cancers[i]]
            genomics = genomic_noise[i].copy()
            genomics[biology.genomic_effect_index] += biology.genomic_effect_loading * genomic_latent[i]
        cohort.append(SynthPatient(
            index=i,
            case_id=f"SYN-{spec.site}-{i:05d}",
            cancer=cancers[i],
            image_latent=float(image_latent[i]),
            genomic_latent=float(genomic_latent[i]),
            oracle_risk=float(oracle_risk[i]),
            survival_months=float(months[i]),
            censorship=int(censorship[i]),
            slide_patches=tuple(int(p) for p in patches[i, :n_slides]),
            genomics=genomics,
        ))
    return cohort


def survival_times(oracle_risk: np.ndarray, death_draw: np.ndarray, censor_draw: np.ndarray,
                   event_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Observed (months, censorship) under hazard exp(oracle_risk) per month and uniform censoring.

    ``death_draw`` are standard exponential draws (death time = draw / hazard),
    ``censor_draw`` uniform on [0, 1) (censoring time = draw x follow-up).
    The follow-up length is the one that makes exactly round(event_rate x n)
    deaths observed (at least one); censoring stays independent of each
    patient's death time.
    """
    death = death_draw * np.exp(-oracle_risk)
    # Death i is observed when death_i <= follow_up * censor_draw_i, i.e. when death_i / censor_draw_i <= follow_up.
    ratio = death / np.maximum(censor_draw, 1e-12)
    n_events = max(1, round(event_rate * len(ratio)))
    follow_up = np.sort(ratio)[n_events - 1]
    observed = ratio <= follow_up
    months = np.where(observed, death, follow_up * censor_draw)
    return months, (~observed).astype(np.int8)


# --------------------------------------------------------------------------- slide geometry


@dataclass(frozen=True)
class SlideLayout:
    """Where a slide's patches lie and what tissue each shows, in generation (source) order."""

    coords: np.ndarray  # [n, 2] int32, patch top-left in level-0 pixels, on a PATCH_STEP_PX grid
    tissue: np.ndarray  # [n] int8, 0..BACKGROUND_TISSUES-1 background compartment, TUMOUR in the region

    @property
    def region(self) -> np.ndarray:
        """Boolean mask of the prognostic region's patches."""
        return self.tissue == TUMOUR


def draw_slide_layout(spec: SynthSpec, patient_index: int, slide_index: int, n_patches: int) -> SlideLayout:
    """A blob of tissue on the patch grid, split in background compartments, with one tumour region."""
    rng = _rng(spec.seed, _SLIDE_LAYOUT, patient_index, slide_index)
    cells = _tissue_blob(rng, n_patches)
    tissue = _background_compartments(rng, cells)
    region_size = round(spec.signal_fraction * n_patches)
    if spec.signal_fraction > 0:
        region_size = max(1, region_size)
    centre = int(rng.integers(n_patches))
    tissue[_grow_region(cells, centre, region_size)] = TUMOUR
    margin = rng.integers(4, 40, size=2)  # where the tissue starts on the glass, in patches
    coords = ((cells + margin) * PATCH_STEP_PX).astype(np.int32)
    return SlideLayout(coords=coords, tissue=tissue)


def _tissue_blob(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` grid cells [n, 2] (non-negative) forming a wobbly ellipse: star-shaped, so one piece."""
    aspect = np.sqrt(rng.uniform(0.6, 1.6))
    amplitude = rng.uniform(0.0, 0.1, size=3)
    phase = rng.uniform(0.0, 2 * np.pi, size=3)
    # The n cells with the lowest score fill a disc of radius ~sqrt(n/pi) stretched and wobbled by at most
    # 1 + sum(amplitude) < 1.3; the box below holds it with room to spare.
    reach = 1.3 * np.sqrt(n / np.pi) + 3
    half_x, half_y = int(np.ceil(reach * aspect)), int(np.ceil(reach / aspect))
    gx, gy = np.meshgrid(np.arange(-half_x, half_x + 1), np.arange(-half_y, half_y + 1), indexing="ij")
    gx, gy = gx.ravel(), gy.ravel()
    angle = np.arctan2(gy, gx)
    wobble = 1 + sum(a * np.cos(k * angle + p) for a, k, p in zip(amplitude, (2, 3, 5), phase, strict=True))
    score = np.hypot(gx / aspect, gy * aspect) / wobble
    keep = np.argsort(score, kind="stable")[:n]
    cells = np.stack([gx[keep], gy[keep]], axis=1)
    return cells - cells.min(axis=0)


def _background_compartments(rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
    """Label each cell with the tissue of its nearest of a few random centres: patches of one kind cluster."""
    centres = cells[rng.integers(len(cells), size=2 * BACKGROUND_TISSUES)]
    kinds = rng.integers(BACKGROUND_TISSUES, size=len(centres)).astype(np.int8)
    nearest = np.zeros(len(cells), dtype=np.intp)
    best = np.full(len(cells), np.inf)
    for k, centre in enumerate(centres):  # one centre at a time: memory stays O(n)
        d = ((cells - centre) ** 2).sum(axis=1)
        closer = d < best
        nearest[closer], best[closer] = k, d[closer]
    return kinds[nearest]


def _grow_region(cells: np.ndarray, centre: int, size: int) -> np.ndarray:
    """Rows of ``size`` cells grown from ``centre`` nearest-first over 4-neighbours: a disc clipped to the tissue.

    Growing over neighbours (rather than taking the nearest cells) keeps the
    region in one piece even where the tissue outline is concave.
    """
    extent = cells.max(axis=0) + 1
    grid = np.full(extent, -1, dtype=np.int64)
    grid[cells[:, 0], cells[:, 1]] = np.arange(len(cells))
    cx, cy = (int(v) for v in cells[centre])
    frontier = [(0, centre)]
    seen = {centre}
    region: list[int] = []
    while frontier and len(region) < size:
        _, row = heapq.heappop(frontier)
        region.append(row)
        x, y = (int(v) for v in cells[row])
        for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if 0 <= nx < extent[0] and 0 <= ny < extent[1]:
                neighbour = int(grid[nx, ny])
                if neighbour >= 0 and neighbour not in seen:
                    seen.add(neighbour)
                    heapq.heappush(frontier, ((nx - cx) ** 2 + (ny - cy) ** 2, neighbour))
    return np.asarray(region, dtype=np.int64)


# --------------------------------------------------------------------------- features


def slide_feature_blocks(spec: SynthSpec, biology: CancerBiology, patient: SynthPatient, slide_index: int,
                         layout: SlideLayout, order: np.ndarray) -> Iterator[np.ndarray]:
    """A slide's features, BLOCK_ROWS rows at a time, in the row order ``order`` (source rows).

    Block b is a function of (world, seed, patient, slide, b) only, so a
    block can be regenerated without the ones before it.
    """
    prototypes = biology.prototypes
    tumour_shift = (PATTERN_GAIN * patient.image_latent * biology.pattern).astype(np.float32)
    for block, start in enumerate(range(0, len(order), BLOCK_ROWS)):
        tissue = layout.tissue[order[start:start + BLOCK_ROWS]]
        rng = _rng(spec.seed, _FEATURES, patient.index, slide_index, block)
        features = rng.standard_normal((len(tissue), spec.feature_dim), dtype=np.float32)
        features += prototypes[tissue]
        features[tissue == TUMOUR] += tumour_shift
        yield features.astype(spec.feature_dtype, copy=False)


def add_synthetic_slide(writer: BankWriter, spec: SynthSpec, biology: CancerBiology, patient: SynthPatient,
                        slide_index: int, progress: Callable[[int], object] | None = None) -> str:
    """Generate one slide of ``patient`` and stream it into ``writer`` in curve order; returns its id."""
    layout = draw_slide_layout(spec, patient.index, slide_index, patient.slide_patches[slide_index])
    order = curve_order(layout.coords)
    blocks = slide_feature_blocks(spec, biology, patient, slide_index, layout, order)
    if progress is not None:
        blocks = _counting(blocks, progress)
    slide_id = patient.slide_id(slide_index)
    writer.add_slide_blocks(slide_id, layout.coords[order], blocks, source_row=order)
    return slide_id


def _counting(blocks: Iterator[np.ndarray], progress: Callable[[int], object]) -> Iterator[np.ndarray]:
    for block in blocks:
        yield block
        progress(len(block))


# --------------------------------------------------------------------------- the bank


def synthesize_bank(out: str | os.PathLike[str], spec: SynthSpec, *, force: bool = False,
                    show_progress: bool = False) -> Path:
    """Write the synthetic bank of ``spec`` to ``out`` (atomically); returns its path.

    Raises `InputError` naming ``out`` for a nonsense spec or an existing file
    without ``force``; ``out`` is then left as it was.
    """
    out = Path(out)
    spec.check(out)
    world = draw_world(spec)
    cohort = draw_cohort(spec, world)
    attrs = dict(site=spec.site, world_seed=spec.world_seed, seed=spec.seed, signal_fraction=spec.signal_fraction,
                 event_rate=spec.event_rate, synth_spec=spec.to_json())
    with BankWriter(out, feature_dim=spec.feature_dim, source="synthetic", feature_dtype=spec.feature_dtype,
                    overwrite=force, attrs=attrs) as writer:
        names = genomic_feature_names(spec.genomic_features)
        for cancer in spec.cancers:
            writer.set_genomic_features(cancer, names)
        advance, close = _progress(sum(sum(p.slide_patches) for p in cohort), out, show_progress)
        try:
            for patient in cohort:
                slide_ids = [add_synthetic_slide(writer, spec, world[patient.cancer], patient, s, advance)
                             for s in range(len(patient.slide_patches))]
                writer.add_patient(patient.case_id, patient.cancer, patient.survival_months, patient.censorship,
                                   slide_ids=slide_ids, genomics=patient.genomics, oracle_risk=patient.oracle_risk)
        finally:
            close()
    return out


def _progress(total: int, out: Path, enabled: bool) -> tuple[Callable[[int], object], Callable[[], None]]:
    if not enabled:
        return (lambda n: None), (lambda: None)
    from cancermoe.progress import progress_bar

    return progress_bar(total, f"synthesizing {out.name}")
