"""Patch-encoder throughput on CPU (the tool vs. its own forward pass and a naive loop) and on one GPU
(many slides streamed end to end: tiles/s, how busy the GPU is, the gaps between slides).

The protocols are in :mod:`wsi_fl.benchmarks.encoders`. CPU: the naive loop and the tool (forward-only
and extraction, alternated in one process) run in fresh processes, interleaved (naive, tool, naive, ...)
``--repeat`` times; medians of rates and of per-repeat ratios are printed (on a shared machine a ratio of
neighbouring runs is the robust figure), with the share of the CPU other processes took during each run.

    python scripts/bench_encoders.py [--cards kaiko-vits16 kaiko-vitb16] [--tiles 64] [--repeat 3]
    python scripts/bench_encoders.py --cards uni_v1 --parts forward extract --tiles 16 --repeat 1
    python scripts/bench_encoders.py --gpu [--slides 4] [--slide-size 12288] [--cards uni_v1 hoptimus1]
    python scripts/bench_encoders.py --smoke     # both paths on CPU in seconds: a test, not a measurement

``--gpu`` needs a CUDA device and builds every card with random init on it (nothing is downloaded); the
synthetic slides are written once to ``--cache`` (default: the temp directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wsi_fl.benchmarks.encoders import CPU_CARDS, GPU_CARDS

ROOT = Path(__file__).resolve().parent.parent

PARTS = ("naive", "forward", "extract")


def default_slide() -> Path:
    data = Path(os.environ.get("WSI_FL_TESTDATA", ROOT.parent / "shared" / "data"))
    return data / "slides" / "cmu-1-small-region.svs"


def run_part(part: str, card: str, n: int, slide: Path, precision: str | None = None) -> dict:
    """``naive`` or ``tool`` in a fresh process; ``naive`` in a default environment (no allocator tuning)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "WSI_FL_NO_REEXEC")}
    if part == "naive":
        env["WSI_FL_NO_REEXEC"] = "1"
    cmd = [sys.executable, __file__, "--part", part, "--cards", card, "--tiles", str(n), "--slide", str(slide)]
    if precision and part == "tool":
        cmd += ["--cpu-precision", precision]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{part} {card} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_main(cards: list[str], parts: list[str], n: int, repeat: int, slide: Path,
             precision: str | None = None) -> None:
    from wsi_fl.benchmarks.encoders import summarise_cpu

    print(f"slide {slide.name}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    for card in cards:
        runs: dict[str, list[dict]] = {p: [] for p in parts}
        for _ in range(repeat):  # naive, tool, naive, tool, ...: neighbours ran under the same load
            if "naive" in parts:
                runs["naive"].append(run_part("naive", card, n, slide))
            if "forward" in parts or "extract" in parts:
                tool = run_part("tool", card, n, slide, precision)
                for part in ("forward", "extract"):
                    if part in parts:
                        runs[part].append(tool[part])
        med = summarise_cpu(runs)
        rates = "  ".join(f"{p} {med[p]:.2f}" for p in parts)
        ratios = "  ".join(f"{k} {v:.2f}" for k, v in med.items() if "/" in k and not k.startswith("quiet"))
        tool = runs.get("forward", runs.get("extract", [{}]))[0]
        print(f"{card:<14} {n} tiles, median of {repeat}: tiles/s {rates} | {ratios}"
              f" | tool: {tool.get('precision')}, batch {tool.get('batch')}, {tool.get('threads')} threads,"
              f" {tool.get('workers')} workers,"
              f" fast malloc {tool.get('malloc')}", flush=True)
        if "read_tiles_per_s" in tool and "forward" in med and "extract" in runs:
            read = tool["read_tiles_per_s"]
            print(f"    reading alone {read:.0f} tiles/s: serial reading bounds extract/forward at"
                  f" {1 / (1 + med['forward'] / read):.3f}; during extraction the model computed"
                  f" {100 * statistics.median(r['model_busy'] for r in runs['extract']):.1f} % of the time"
                  f" (median of repeats)", flush=True)
        if "quiet repeats" in med:
            print(f"    quiet repeats (others <= 10 %): {med['quiet repeats']:.0f}; " + "  ".join(
                f"{k[6:]} {v:.2f}" for k, v in med.items() if k.startswith("quiet ") and k != "quiet repeats"))
        for part in parts:
            cells = (f"{r['tiles_per_s']:6.2f} ({100 * r['others']:2.0f} %)" for r in runs[part])
            print(f"    {part:<8} " + " ".join(cells),
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end; (%): share of the machine's CPU other processes used"
          " during that run")


def stream_main(cards: list[str], slides: int, size: int, device: str, cache: Path, num_workers: int | None,
                batch_size: int | None) -> None:
    import torch

    from preprocessing.cards import get_card
    from preprocessing.encoders import create_encoder
    from preprocessing.runtime import auto_batch_size, auto_num_workers, available_cores
    from wsi_fl.benchmarks.encoders import bench_slides, stream_run

    start = time.perf_counter()
    paths = bench_slides(cache, slides, size)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    workers = auto_num_workers(device) if num_workers is None else num_workers
    print(f"{name}; {available_cores()} cores, {workers} reader workers; {slides} slides of {size}² px"
          f" (ready in {time.perf_counter() - start:.0f} s)", flush=True)
    for card_name in cards:
        card = get_card(card_name)
        t = time.perf_counter()
        torch.manual_seed(0)
        enc = create_encoder(card_name, random_init=True, device=device)
        built = time.perf_counter() - t
        # Resolved once, before timing: the tool's CUDA choice runs a probe forward that would count as work.
        enc.to(device)
        batch = batch_size or auto_batch_size(enc, device)
        print(f"{card_name}: built in {built:.0f} s, {enc.precision}, tile {card.tile_size} px -> {card.input_size},"
              f" batch {batch}", flush=True)
        kw = {"device": device, "tile_size": card.tile_size, "mpp": card.mpp, "batch_size": batch,
              "num_workers": num_workers}
        stream_run(enc, paths[:1], per_slide=False, **kw)  # warm-up: kernels, allocator, page cache
        for per_slide in (False, True):
            r = stream_run(enc, paths, per_slide=per_slide, **kw)
            print(f"  {r['mode']:<9} {r['tiles']} tiles in {r['seconds']:.1f} s: {r['tiles_per_s']:.0f} tiles/s,"
                  f" device busy {100 * r['busy']:.0f} %; longest idle gap {r['max_gap_boundary_ms']:.0f} ms at a"
                  f" slide boundary, {r['max_gap_other_ms']:.0f} ms elsewhere (median {r['median_gap_ms']:.1f} ms);"
                  f" forward {r['median_forward_ms']:.0f} ms/batch; planning {r['plan_s']:.1f} s", flush=True)
        del enc
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cards", nargs="+", help=f"model cards (default CPU: {' '.join(CPU_CARDS)};"
                                              f" --gpu: {' '.join(GPU_CARDS)})")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="CPU parts to run")
    p.add_argument("--tiles", type=int, default=64, help="tiles per CPU measurement (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats of the CPU parts (default 3)")
    p.add_argument("--slide", type=Path, help="real slide for the CPU extract part (default: the shared CMU-1 crop)")
    p.add_argument("--gpu", action="store_true", help="stream synthetic slides through the CUDA device")
    p.add_argument("--slides", type=int, default=4, help="--gpu: synthetic slides (default 4)")
    p.add_argument("--slide-size", type=int, default=12288, help="--gpu: slide side in px at 0.5 µm/px")
    p.add_argument("--workers", type=int, help="--gpu: reader workers (default: the tool's choice)")
    p.add_argument("--batch", type=int, help="--gpu: tiles per forward (default: the tool's choice)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi-fl-bench-encoders")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of both paths (a test, not a measurement)")
    p.add_argument("--cpu-precision", choices=("fp32", "bf16"), help="CPU tool parts in this precision instead of"
                   " the card's (bf16: for CPUs with AVX512-BF16/AMX; naive stays fp32)")
    p.add_argument("--part", choices=("naive", "tool"), help=argparse.SUPPRESS)
    args = p.parse_args()

    slide = args.slide or default_slide()
    if args.part:  # a child process: measure one thing, print one JSON line
        from wsi_fl.benchmarks.encoders import cpu_part

        print(json.dumps(cpu_part(args.part, args.cards[0], args.tiles, slide, precision=args.cpu_precision)))
        return
    if args.smoke:
        cpu_main(args.cards or ["resnet18_trunc"], list(PARTS), 4, 1, slide)
        stream_main(args.cards or ["resnet18_trunc"], 2, 1024, "cpu", args.cache, 1, 8)
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device")
        stream_main(args.cards or list(GPU_CARDS), args.slides, args.slide_size, "cuda", args.cache, args.workers,
                    args.batch)
        return
    cpu_main(args.cards or list(CPU_CARDS), args.parts, args.tiles, args.repeat, slide, args.cpu_precision)


if __name__ == "__main__":
    main()
