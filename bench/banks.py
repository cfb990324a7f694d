"""Synthetic banks that benchmarks reuse between runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cancermoe.synthetic import SynthSpec, synthesize_bank


def cached_bank(workdir: Path, spec: SynthSpec) -> Path:
    """The bank of ``spec``, generated on first use; named by the spec, so any change makes a new one."""
    digest = hashlib.sha256(spec.to_json().encode()).hexdigest()[:12]
    path = workdir / "banks" / f"{spec.site}-{digest}.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synthesize_bank(path, spec)
    return path
