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

#: Level-0 px per cell of the tissue map the renderer samples (16 µm at 0.25 µm/px).
_CELL = 64
#: Fraction of the slide covered by tissue at ``tissue_scale=1`` (×4 must still fit in 1).
_BASE_TISSUE = 0.2
#: Bump when the generated pixels change, so cached slides are regenerated.
_VERSION = 1
_TILE = 256


def _tissue_map(size: int, tissue_scale: float, seed: int) -> np.ndarray:
    """Bool map (one cell per ``_CELL`` level-0 px) of smooth random blobs covering a set fraction.

    Thresholding one smooth random field at a quantile makes the tissue area
    proportional to ``tissue_scale`` exactly (up to cell rounding), and the
    tissue of a larger scale contains that of a smaller one.
    """
    from scipy import ndimage

    frac = _BASE_TISSUE * tissue_scale
    if not 0 < frac <= 1:
        raise ValueError(f"tissue_scale must be in (0, {1 / _BASE_TISSUE:g}], got {tissue_scale}")
    cells = -(-size // _CELL)
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal((96, 96)), sigma=4, mode="wrap")
    field = ndimage.zoom(coarse, cells / 96, order=1, grid_mode=True, mode="grid-wrap")[:cells, :cells]
    # Keep a blank margin (glass around the section), as on real slides.
    margin = max(1, cells // 40)
    inner = field[margin:-margin, margin:-margin]
    out = np.zeros((cells, cells), bool)
    q = min(frac * cells * cells / inner.size, 1.0)  # so the whole slide's fraction is ``frac``
    out[margin:-margin, margin:-margin] = inner > np.quantile(inner, 1 - q)
    return out


def _texture(seed: int) -> np.ndarray:
    """A 256² H&E-ish tile: pink stroma with purple nuclei, mild noise (cheap to JPEG-encode)."""
    rng = np.random.default_rng(seed + 1)
    tex = np.empty((_TILE, _TILE, 3), np.float32)
    tex[:] = (226, 150, 196)
    yy, xx = np.mgrid[:_TILE, :_TILE]
    for cx, cy in rng.integers(0, _TILE, (40, 2)):
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        tex[d2 < 36] = (120, 70, 150)
    tex += rng.normal(0, 6, tex.shape)
    return np.clip(tex, 0, 255).astype(np.uint8)


def make_bench_slide(
    path: str | os.PathLike, size: int, mpp: float = 0.25, tissue_scale: float = 1.0, seed: int = 0
) -> Path:
    """Write a ``size``² px pyramidal JPEG TIFF at ``mpp`` with tissue blobs on white glass.

    ``tissue_scale`` scales the tissue *area* (1.0 ≈ 20 % of the slide, up to 5.0).
    Rendering is per 256² tile from a coarse tissue map: tiles entirely on glass or
    entirely in tissue are cached arrays, only boundary tiles are composed per pixel.
    """
    from preprocessing.tiffwrite import write_pyramidal_tiff

    path = Path(path)
    tmap = _tissue_map(size, tissue_scale, seed)
    cells = tmap.shape[0]
    tex = _texture(seed)
    white = np.full((_TILE, _TILE, 3), 255, np.uint8)

    def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        # Map cell of each output pixel's centre; sample the map block this tile covers.
        cx = np.minimum(((x + np.arange(w) + 0.5) * ds // _CELL).astype(np.intp), cells - 1)
        cy = np.minimum(((y + np.arange(h) + 0.5) * ds // _CELL).astype(np.intp), cells - 1)
        block = tmap[cy[0] : cy[-1] + 1, cx[0] : cx[-1] + 1]
        if not block.any():
            return white[:h, :w]
        if block.all():
            return tex[:h, :w]
        sub = tmap[np.ix_(cy, cx)]
        return np.where(sub[..., None], tex[:h, :w], white[:h, :w])

    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(path, size, size, render, mpp=mpp, tile=_TILE)
    return path


def cached_slide(
    cache_dir: Path, size: int, mpp: float = 0.25, tissue_scale: float = 1.0, seed: int = 0
) -> Path:
    """The benchmark slide for these parameters, generated on first use."""
    path = cache_dir / f"bench-v{_VERSION}-{size}-mpp{mpp:g}-ts{tissue_scale:g}-s{seed}.tiff"
    if not path.exists():
        t = time.perf_counter()
        print(f"generating {path.name} ...", file=sys.stderr, flush=True)
        make_bench_slide(path, size, mpp=mpp, tissue_scale=tissue_scale, seed=seed)
        print(f"  written in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return path


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
