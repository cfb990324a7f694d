"""The virtual sites of a simulation and their patch banks.

A virtual site is what a hospital's SuperNode is told by ``cmoe-client``: a site name, a bank, a working
folder (`VirtualSite.node_config` gives the same node-config keys). They come from

- banks given by the user: one site per bank, named by the bank's ``site`` attribute (``cmoe-bank synth
  --site``), else its file name; or
- one synthetic world split into N sites (`WorldSplit`): every site shares the world's biology
  (``world_seed``) and draws its own patients (`cancermoe.synthetic`, what ``cmoe-bank synth`` writes), with
  a non-IID cancer mix drawn from a symmetric Dirichlet(``alpha``) (small alpha: most of a site's patients
  have one cancer; large: every site has the world's mix) and a size drawn from a log-normal around
  ``mean_patients`` (``size_sd``: the SD of log size), never below ``min_patients``.

Everything is seeded: the same split gives the same sites, sizes, mixes and patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cancermoe.bank import open_bank
from cancermoe.errors import InputError
from cancermoe.synthetic import SynthSpec, synthesize_bank

MAX_SITES = 99_999  # site i's patients are drawn with seed split_seed * 100_000 + i + 1
SEED_STRIDE = 100_000
_SPLIT_STREAM = 7  # spawn key of the split's own random stream (sizes and mixes), apart from any cohort draw


@dataclass(frozen=True)
class VirtualSite:
    name: str
    bank: Path
    workdir: Path  # the site's DPS caches and audit log, as cmoe-client's --workdir

    def node_config(self, device: str = "auto") -> dict[str, str]:
        """What `client.app` reads from ``context.node_config``: the keys cmoe-client gives its SuperNode."""
        return {"site": self.name, "bank": str(self.bank), "workdir": str(self.workdir), "device": device,
                "audit-log": str(self.workdir / "audit.jsonl")}


@dataclass(frozen=True)
class WorldSplit:
    """One synthetic world split into ``sites`` sites with non-IID cancer mixes and varying sizes."""

    sites: int
    cancers: tuple[str, ...] = ("BRCA", "KIRC", "LUAD")
    alpha: float = 0.5  # Dirichlet concentration of each site's cancer mix
    mean_patients: float = 40.0  # typical site size (the log-normal's mean)
    size_sd: float = 0.5  # SD of a site's log size (0: every site has mean_patients)
    min_patients: int = 12  # no site smaller (it must keep held-out patients with deaths)
    seed: int = 0  # draws the sizes and mixes and, with the site's index, the site's patients
    world_seed: int = 0  # the biology every site shares
    patches: int = 50  # typical patches per slide
    feature_dim: int = 16
    genomic_features: int = 16
    signal_fraction: float = 0.2
    risk_sd: float = 2.0
    event_rate: float = 0.5

    def check(self, where: str) -> None:
        problems = [
            (not 1 <= self.sites <= MAX_SITES, f"sites {self.sites} must be in [1, {MAX_SITES}]"),
            (not self.alpha > 0, f"alpha {self.alpha} must be > 0"),
            (self.min_patients < 2, f"min patients {self.min_patients} must be at least 2"),
            (not self.mean_patients >= self.min_patients,
             f"mean patients {self.mean_patients} must be at least min patients {self.min_patients}"),
            (not self.size_sd >= 0, f"size SD {self.size_sd} must be >= 0"),
            (self.seed < 0, f"seed {self.seed} must be >= 0"),
        ]
        for bad, problem in problems:
            if bad:
                raise InputError(where, problem)

    def site_names(self) -> list[str]:
        width = len(str(self.sites - 1))
        return [f"S{i:0{width}d}" for i in range(self.sites)]

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """(patients per site [sites], cancer mix per site [sites, cancers]), seeded by ``seed`` alone."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_SPLIT_STREAM,)))
        mixes = rng.dirichlet(np.full(len(self.cancers), self.alpha), size=self.sites)
        log_size = self.size_sd * rng.standard_normal(self.sites) - self.size_sd ** 2 / 2  # E[exp] = 1
        sizes = np.maximum(self.min_patients, np.rint(self.mean_patients * np.exp(log_size))).astype(int)
        return sizes, mixes

    def specs(self, where: str = "world split") -> list[SynthSpec]:
        """One `SynthSpec` per site: the world's biology, the site's size, mix and patients."""
        self.check(where)
        sizes, mixes = self.draw()
        specs = []
        for i, name in enumerate(self.site_names()):
            spec = SynthSpec(site=name, patients=int(sizes[i]), cancers=self.cancers, patches=self.patches,
                             seed=self.seed * SEED_STRIDE + i + 1, world_seed=self.world_seed,
                             feature_dim=self.feature_dim, event_rate=self.event_rate,
                             signal_fraction=self.signal_fraction, genomic_features=self.genomic_features,
                             risk_sd=self.risk_sd, cancer_mix=tuple(round(float(w), 6) for w in mixes[i]))
            spec.check(where)
            specs.append(spec)
        return specs


def write_world_banks(split: WorldSplit, folder: Path, workdir: Path, *, progress=None) -> list[VirtualSite]:
    """Each site's bank written into ``folder`` (`cancermoe.synthetic.synthesize_bank`, what ``cmoe-bank synth``
    writes); a bank already there from the same spec is reused, one from another spec is an error."""
    folder.mkdir(parents=True, exist_ok=True)
    sites = []
    for spec in split.specs():
        path = folder / f"{spec.site}.h5"
        if path.exists():
            with open_bank(path) as bank:
                if bank.attrs.get("synth_spec") != spec.to_json():
                    raise InputError(path, "holds another site's bank (a different world split); use another "
                                           "--workdir or --force")
        else:
            synthesize_bank(path, spec)
        if progress is not None:
            progress(spec)
        sites.append(VirtualSite(spec.site, path, workdir / "sites" / spec.site))
    return sites


def bank_sites(banks: Sequence[Path], workdir: Path) -> list[VirtualSite]:
    """One site per bank, named by its ``site`` attribute, else its file name; each bank opened once here so a
    missing or broken one is a one-line error before Ray starts."""
    sites, seen = [], {}
    for path in banks:
        path = Path(path).resolve()
        with open_bank(path) as bank:
            name = str(bank.attrs.get("site") or path.stem)
        if name in seen:
            raise InputError(path, f"is site {name!r} again (as {seen[name]}): one bank per site")
        seen[name] = path
        sites.append(VirtualSite(name, path, workdir / "sites" / name))
    return sites


def describe(sites: Sequence[VirtualSite]) -> list[dict]:
    """Per site: name, bank, patients per cancer (what sites.json records and the CLI summarises)."""
    rows = []
    for site in sites:
        with open_bank(site.bank) as bank:
            counts: dict[str, int] = {}
            for patient in bank.patients:
                counts[patient.cancer] = counts.get(patient.cancer, 0) + 1
            rows.append({"site": site.name, "bank": str(site.bank), "patients": dict(sorted(counts.items()))})
    return rows
