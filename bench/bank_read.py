"""Bank read cost: does reading N rows cost the same on a 10k- and a 1M-patch slide?

Measured side by side in one run:
1. time and peak memory (RSS high-water mark, in a fresh process per case) to
   read N random rows from a 10k-patch and a 1M-patch slide; the ratio
   1M / 10k should be near 1 (cost grows with rows read, not slide size).
   Both with the file in the OS page cache ("warm") and with its pages dropped
   before every read ("cold": every scattered row is then a disk seek, while
   3072 of 10k rows is most of a small file);
2. chunks touched by N rows that form spatial neighbourhoods (b key patches and
   their nearest neighbours), rows stored in curve (Morton) order vs the
   original row-major order of the feature extractor.

    python bench/bank_read.py [--rows 3072] [--feature-dim 1024] [--workdir DIR]

The 1M-patch slide is ~2 GB on disk at D = 1024 (float16); it is generated
once per workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from cancermoe.bank import BankWriter, chunks_touched, curve_order, open_bank

SIZES = {"10k": 10_000, "1M": 1_000_000}


def grid_coords(n: int, step: int = 256) -> np.ndarray:
    width = int(np.ceil(np.sqrt(n)))
    rows = np.arange(n)
    return (np.stack([rows % width, rows // width], axis=1) * step).astype(np.int32)


def make_bank(path: Path, n_patches: int, feature_dim: int) -> None:
    """One slide of ``n_patches`` on a square grid, random float16 features, streamed."""
    coords = grid_coords(n_patches)
    order = curve_order(coords)
    rng = np.random.default_rng(0)
    blocks = (rng.standard_normal((min(65536, n_patches - i), feature_dim), dtype=np.float32)
              for i in range(0, n_patches, 65536))
    with BankWriter(path, feature_dim=feature_dim, source="bench", overwrite=True) as writer:
        writer.add_slide_blocks("slide", coords[order], blocks, source_row=order)
        writer.add_patient("case", "BENCH", 10.0, 0, ["slide"])


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def set_page_cache(path: str, cache: str) -> None:
    """``warm``: the whole file read through the OS once; ``cold``: its pages dropped (posix_fadvise DONTNEED)."""
    with open(path, "rb") as f:
        if cache == "cold":
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            while f.read(64 << 20):
                pass


def measure_read(path: str, n_rows: int, repeats: int, cache: str) -> dict:
    """Runs in a child process: seconds per read and peak RSS growth during reads."""
    set_page_cache(path, cache)
    with open_bank(path) as bank:
        n = bank.n_patches("slide")
        rng = np.random.default_rng(1)
        bank.read_features("slide", rng.choice(n, n_rows, replace=False))  # warm-up (metadata, B-tree)
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        base = _rss_kib("VmRSS")
        times = []
        for _ in range(repeats):
            rows = rng.choice(n, n_rows, replace=False)
            if cache == "cold":
                set_page_cache(path, cache)
            start = time.perf_counter()
            features = bank.read_features("slide", rows)
            times.append(time.perf_counter() - start)
            assert features.shape == (n_rows, bank.feature_dim)
        peak = _rss_kib("VmHWM")
    return {"seconds": float(np.median(times)), "peak_mib": (peak - base) / 1024}


def neighbourhood_chunks(n_patches: int, n_rows: int, key_tokens: int = 4) -> tuple[int, int]:
    """Chunks touched by ``key_tokens`` spatial neighbourhoods totalling ``n_rows`` patches."""
    coords = grid_coords(n_patches)
    order = curve_order(coords)
    stored_row = np.empty_like(order)
    stored_row[order] = np.arange(order.size)
    tree = cKDTree(coords)
    rng = np.random.default_rng(2)
    keys = rng.choice(n_patches, key_tokens, replace=False)
    _, neighbours = tree.query(coords[keys], k=n_rows // key_tokens)
    original_rows = np.unique(neighbours.ravel())
    return chunks_touched(original_rows), chunks_touched(stored_row[original_rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3072)
    parser.add_argument("--feature-dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-bench-bank")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_read(args.child[0], int(args.child[1]), args.repeats, args.child[2])))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"read {args.rows} random rows (D = {args.feature_dim}, float16 on disk, median of {args.repeats});")
    print("warm: the file is in the OS page cache; cold: its pages are dropped before every read (disk seeks)")
    print(f"{'slide':>8} {'cache':>6} {'seconds':>10} {'peak MiB':>10}")
    paths = {}
    for label, n in SIZES.items():
        paths[label] = args.workdir / f"slide-{label}-d{args.feature_dim}.h5"
        if not paths[label].exists():
            print(f"writing {paths[label]} ({n} patches x {args.feature_dim})", file=sys.stderr)
            make_bank(paths[label], n, args.feature_dim)
    for cache in ("warm", "cold"):
        results = {}
        for label in SIZES:
            out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--child",
                                  str(paths[label]), str(args.rows), cache],
                                 check=True, capture_output=True, text=True).stdout
            results[label] = json.loads(out)
            print(f"{label:>8} {cache:>6} {results[label]['seconds']:>10.4f} {results[label]['peak_mib']:>10.1f}")
        small, large = results["10k"], results["1M"]
        print(f"ratio 1M/10k ({cache}): time {large['seconds'] / small['seconds']:.2f}, "
              f"peak memory {large['peak_mib'] / max(small['peak_mib'], 1e-9):.2f}")

    original, curve = neighbourhood_chunks(SIZES["1M"], args.rows)
    print(f"chunks touched by {args.rows} rows in 4 spatial neighbourhoods of a 1M-patch slide: "
          f"original order {original}, curve order {curve} (ratio {original / curve:.1f}x fewer)")


if __name__ == "__main__":
    main()
