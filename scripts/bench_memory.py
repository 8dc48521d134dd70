"""Peak memory of a full preprocess as the tissue area grows 4× (goal: RSS grows ≤ 15 %).

Two synthetic slides of the same size differ only in tissue area (``tissue_scale``
1 and 4, so about 4× the tiles). Each runs through the real ``wsi-fl preprocess``
command in a fresh process; the peak RSS of the whole process tree (main process
plus tile-reading workers, sampled every 20 ms from /proc) and the main
process's own peak (``ru_maxrss``) are printed with the tile counts.

    python scripts/bench_memory.py [--size 20000] [--encoder resnet18_trunc]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wsi_fl.benchmarks.slides import cached_slide

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (0 for processes that vanished)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        stack.extend(children.get(pid, []))
    return total


def run_preprocess(slide: Path, out: Path, encoder: str) -> dict:
    cmd = [sys.executable, "-m", "wsi_fl", "preprocess", "--slides", str(slide), "--out", str(out),
           "--encoder", encoder, "--random-init", "--quiet", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.02)
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess failed ({proc.returncode}): {output}")
    seconds = time.perf_counter() - start
    main_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # largest child so far
    manifest = (out / "manifest.csv").read_text().splitlines()[1].split(",")
    return {"tiles": int(manifest[2]), "seconds": round(seconds, 1), "peak_tree_rss_mb": round(peak / 2**20),
            "max_child_rss_mb": round(main_peak / 2**20)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20_000, help="slide side in level-0 px (0.25 µm/px)")
    ap.add_argument("--encoder", default="resnet18_trunc")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "wsi-fl-bench")
    args = ap.parse_args(argv)
    results = {}
    for scale in (1.0, 4.0):
        slide = cached_slide(args.cache_dir, args.size, tissue_scale=scale)
        with tempfile.TemporaryDirectory() as tmp:
            results[scale] = run_preprocess(slide, Path(tmp), args.encoder)
        print(json.dumps({"tissue_scale": scale, "size": args.size, **results[scale]}), flush=True)
    small, large = results[1.0], results[4.0]
    growth = large["peak_tree_rss_mb"] / small["peak_tree_rss_mb"] - 1
    print(json.dumps({
        "tiles_ratio": round(large["tiles"] / max(small["tiles"], 1), 2),
        "peak_rss_growth": f"{growth:+.1%}",
        "goal": "<= +15%", "met": growth <= 0.15,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
