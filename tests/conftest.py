"""Shared test settings: where the real TCGA tables live."""

from __future__ import annotations

import os
from pathlib import Path

# The tables ship inside the repository (data/tcga, with their source); CMOE_TCGA_DIR overrides.
TCGA_DIR = Path(os.environ.get("CMOE_TCGA_DIR", Path(__file__).resolve().parents[1] / "data" / "tcga"))
