"""Patch-score heatmaps of one slide, from what a prediction looked at (`cancermoe.predict.SlidePatches`).

Three files per slide, each written atomically:

- CSV: one row per patch the model looked at: level-0 top-left ``x``, ``y``, ``patch_size``, ``score`` (the DPS
  token score of the final pass, ``config.dps_score``), ``role`` and ``is_key``;
- GeoJSON for QuPath (File > Import objects): a FeatureCollection of square Polygon tiles, the patch size at
  level-0 pixel coords (QuPath's image space: x right, y down), each with ``objectType`` "tile", a ``name``,
  the ``score``, a QuPath ``classification`` (its DPS role: keys stand out) and ``measurements`` {"score"};
- PNG thumbnail: a raster of patch cells, every patch of the slide in light grey, the ones looked at coloured
  by score, keys outlined in red; drawn from the coords alone (no slide image needed).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cancermoe.files import atomic_path, write_text_atomically
from cancermoe.predict import SlidePatches

# QuPath draws an object in its classification's colour (packed RGB in its own files; [r, g, b] is accepted).
ROLE_COLOURS = {"key": [220, 40, 40], "neighbour": [240, 160, 40], "unseen": [60, 120, 220],
                "whole": [120, 120, 120], "random": [60, 160, 90]}


def file_stem(slide_id: str) -> str:
    """A slide id as a file name (characters other than letters, digits, ``.-_`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", slide_id) or "slide"


def patch_table(slide: SlidePatches) -> pd.DataFrame:
    return pd.DataFrame({"slide_id": slide.slide_id, "case_id": slide.case_id,
                         "x": slide.coords[:, 0], "y": slide.coords[:, 1], "patch_size": slide.patch_size,
                         "score": slide.score, "role": slide.role, "is_key": slide.is_key})


def write_patch_csv(slide: SlidePatches, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        patch_table(slide).to_csv(tmp, index=False)
    return Path(path)


def tile_polygon(x: int, y: int, size: int) -> list[list[list[int]]]:
    """The closed ring of a square tile with top-left (x, y), as GeoJSON Polygon coordinates."""
    return [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]


def geojson(slide: SlidePatches) -> dict[str, Any]:
    """The slide's patches as a GeoJSON FeatureCollection QuPath imports (one tile per patch)."""
    features = []
    for (x, y), score, role in zip(slide.coords.tolist(), slide.score.tolist(), slide.role, strict=True):
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": tile_polygon(int(x), int(y), slide.patch_size)},
            "properties": {
                "objectType": "tile",
                "name": f"{slide.slide_id} ({x}, {y})",
                "score": float(score),
                "role": role,
                "classification": {"name": role, "color": ROLE_COLOURS.get(role, [0, 0, 0])},
                "measurements": {"score": float(score)},
                "isLocked": False,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(slide: SlidePatches, path: str | os.PathLike[str]) -> Path:
    return write_text_atomically(path, json.dumps(geojson(slide)))


def write_thumbnail(slide: SlidePatches, path: str | os.PathLike[str], *, max_cells: int = 1024) -> Path:
    """The slide as a raster of patch cells: every patch in light grey, the ones looked at coloured by score,
    keys outlined in red. One cell per patch-size step of the coords (coarser when the slide spans more than
    ``max_cells`` steps, a cell then showing the highest score in it)."""
    every = slide.bank.read_coords(slide.slide_id).astype(np.int64)
    origin = every.min(axis=0) if len(every) else np.zeros(2, dtype=np.int64)
    step = slide.patch_size
    span = ((every.max(axis=0) - origin) // step + 1) if len(every) else np.ones(2, dtype=np.int64)
    step *= max(1, int(np.ceil(span.max() / max_cells)))
    width, height = ((every.max(axis=0) - origin) // step + 1) if len(every) else (1, 1)
    tissue = np.zeros((height, width))
    cells = (every - origin) // step
    tissue[cells[:, 1], cells[:, 0]] = 1.0
    scores = np.full((height, width), np.nan)
    looked = (slide.coords - origin) // step
    for (x, y), value in zip(looked.tolist(), slide.score.tolist(), strict=True):
        scores[y, x] = value if np.isnan(scores[y, x]) else max(scores[y, x], value)
    inches = 6.0 / max(width, height)
    figure = Figure(figsize=(max(2.0, width * inches) + 1.4, max(2.0, height * inches) + 0.4), layout="constrained")
    ax = figure.subplots()
    ax.imshow(np.where(tissue > 0, 0.88, 1.0), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    image = ax.imshow(np.ma.masked_invalid(scores), cmap="viridis", interpolation="nearest")
    for x, y in looked[slide.is_key].tolist():
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_title(f"{slide.slide_id} ({slide.case_id}); keys in red", fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])
    figure.colorbar(image, ax=ax, label="score", shrink=0.8)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return Path(path)


def write_heatmaps(slides: list[SlidePatches], folder: str | os.PathLike[str]) -> list[Path]:
    """``<slide>.csv``, ``<slide>.geojson`` and ``<slide>.png`` of every slide in ``folder``."""
    folder = Path(folder)
    written = []
    for slide in slides:
        stem = file_stem(slide.slide_id)
        written += [write_patch_csv(slide, folder / f"{stem}.csv"), write_geojson(slide, folder / f"{stem}.geojson"),
                    write_thumbnail(slide, folder / f"{stem}.png")]
    return written
