"""Benchmark tissue detection + tile planning on large synthetic slides.

Goals: ≤ 0.6 s for a 50,000² px slide, ≤ 2 s for a 100,000² px slide (0.25 µm/px,
tiles of 224 px at 0.5 µm/px), peak RSS ≤ 1 GB. Each slide is measured in a fresh
subprocess so its peak RSS is its own; the timed part is ``open_slide`` +
``compute_tissue_mask`` + ``tile_coordinates`` (imports and a warm-up on a tiny
array are excluded and reported separately). The slides are generated once with
:func:`make_bench_slide` and cached, so the file is usually in the OS page cache.

    python scripts/bench_tissue.py [--quick] [--repeat N] [--cache-dir /tmp/wsi-fl-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wsi_fl.benchmarks.slides import cached_slide


def run_one(path: str, user_mpp: float | None) -> dict:
    """Measure one slide in this process (called in a fresh subprocess)."""
    t = time.perf_counter()
    from preprocessing.slide import open_slide
    from preprocessing.tiling import TilingParams, tile_coordinates
    from preprocessing.tissue import TissueParams, compute_tissue_mask, detect_tissue

    params = TissueParams()
    detect_tissue(np.full((16, 16, 3), 255, np.uint8), params, params.mask_mpp)  # load lazy modules
    import_s = time.perf_counter() - t

    t = time.perf_counter()
    with open_slide(path, user_mpp=user_mpp) as slide:
        mask = compute_tissue_mask(slide, params)
        t_mask = time.perf_counter() - t
        grid = tile_coordinates(slide, mask, TilingParams(target_mpp=0.5, tile_size=224))
        dims = slide.dimensions
    wall = time.perf_counter() - t
    return {
        "slide": Path(path).name,
        "dims": dims,
        "wall_s": wall,
        "mask_s": t_mask,
        "import_s": import_s,
        "tiles": len(grid),
        "tissue_fraction": mask.tissue_fraction,
        "mask_shape": mask.mask.shape,
        "read_level": grid.read_level,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _measure(path: Path, repeat: int = 1, user_mpp: float | None = None) -> dict:
    """Best (min wall) of ``repeat`` fresh-subprocess runs, plus the median wall and max peak RSS.

    The best of a few runs is the least noisy figure on a shared machine; the
    median says how typical it is.
    """
    cmd = [sys.executable, __file__, "--run-one", str(path)]
    if user_mpp is not None:
        cmd += ["--mpp", str(user_mpp)]
    runs = []
    for _ in range(max(1, repeat)):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["wall_s"])
    best["median_wall_s"] = float(np.median([r["wall_s"] for r in runs]))
    best["maxrss_mb"] = max(r["maxrss_mb"] for r in runs)
    return best


def _row(r: dict) -> str:
    return (
        f"{r['slide']:<40} {r['wall_s']:7.2f} {r['median_wall_s']:7.2f} {r['mask_s']:7.2f} {r['tiles']:7d} "
        f"{r['tissue_fraction']:7.3f} {r['maxrss_mb']:7.0f}"
    )


def _default_cmu() -> Path:
    root = Path(os.environ.get("WSI_FL_TESTDATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return root / "slides" / "cmu-1-small-region.svs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/wsi-fl-bench"))
    ap.add_argument("--quick", action="store_true", help="only the 50k slide (and cmu-1-small-region)")
    ap.add_argument("--repeat", type=int, default=0, help="runs per slide (default 3, --quick 1)")
    ap.add_argument("--cmu", type=Path, default=_default_cmu(), help="path of cmu-1-small-region.svs")
    ap.add_argument("--run-one", metavar="SLIDE", help=argparse.SUPPRESS)
    ap.add_argument("--mpp", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_one:
        print(json.dumps(run_one(args.run_one, args.mpp)))
        return 0

    sizes = [50_000] if args.quick else [50_000, 100_000]
    repeat = args.repeat or (1 if args.quick else 3)
    goals = {50_000: 0.6, 100_000: 2.0}
    print(f"best of {repeat} fresh-process runs; wall = open_slide + compute_tissue_mask + tile_coordinates")
    print(f"{'slide':<40} {'wall s':>7} {'median':>7} {'mask s':>7} {'tiles':>7} {'tissue':>7} {'RSS MB':>7}")
    ok = True
    for size in sizes:
        r = _measure(cached_slide(args.cache_dir, size), repeat)
        passed = r["wall_s"] <= goals[size] and r["maxrss_mb"] <= 1024
        ok &= passed
        print(
            f"{_row(r)}  goal ≤{goals[size]} s, ≤1024 MB: {'ok' if passed else 'MISSED'}"
            f"  (imports {r['import_s']:.2f} s, mask {r['mask_shape']})"
        )
    if args.cmu.exists():
        r = _measure(args.cmu, repeat)
        print(f"{_row(r)}  default params, mask {r['mask_shape']}")
    else:
        print(f"skipped cmu-1-small-region: {args.cmu} not found", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
