"""Preprocessing throughput per CPU core: one process on one core, two shards side by side, one process on two.

What a site's engineer needs to size a job array: is it better to give each task
more cores or to run more tasks? Three configurations of the real ``wsi-fl
preprocess`` command (default settings, ``resnet50_trunc`` with random weights
so nothing is downloaded), each in fresh processes started as a user starts
them, on the same batch of real slides:

(a) one process pinned to 1 core (CPU affinity: the tool then runs torch on
    1 thread and reads tiles inline);
(b) ``--shard 0/2`` and ``--shard 1/2`` at the same time, each pinned to a core
    of its own (a 2-task job array on one 2-core node);
(c) one process on 2 cores.

The batch: the shared real slides with tiles at 0.5 µm/px, ``cmu-1-small-region``
(45 tiles) and ``tcga-cr-7395-01a-01-ts1`` (47 tiles with a user MPP of 0.25,
as the file has none), each linked ``--replicas`` times under its own name in a
temporary directory, so the batch has several slides to share out (default 4:
8 slides, 368 tiles). Printed per configuration: tiles/s over the wall time
(process start, imports and model set-up included) and over the slides'
own time (the manifest's seconds: opening, tissue, tiling, QC, extraction,
writing), both also per core, and slides/hour: for these small slides as
measured, and for a 10,000-tile slide (a typical resection at 20×) at the
measured tiles/s. The configurations run ``--repeat`` times, interleaved, and
the best of each is reported (other jobs on a shared machine only ever slow a
run down); the ratios compare figures of the same run.

    python scripts/bench_shards.py [--quick] [--replicas 4] [--repeat 2] [--encoder resnet50_trunc]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLIDES = {"cmu-1-small-region.svs": None, "tcga-cr-7395-01a-01-ts1.svs": 0.25}  # file -> user MPP (None: the file's)
TILES_PER_WSI = 10_000


@dataclass
class Result:
    tiles: int
    slides: int
    wall: float  # first process start to last process end
    slide_time: float  # the slowest process's sum of per-slide seconds (manifest)
    cores: int

    def rate(self, seconds: float) -> float:
        return self.tiles / seconds


def _testdata() -> Path:
    return Path(os.environ.get("WSI_FL_TESTDATA", ROOT.parent / "shared" / "data")).resolve()


def make_batch(work: Path, replicas: int) -> tuple[Path, Path]:
    """A directory of links to the shared slides (``replicas`` names each) and the MPP CSV for them."""
    slides, rows = work / "slides", ["slide_id,mpp"]
    slides.mkdir()
    for name, mpp in SLIDES.items():
        src = _testdata() / "slides" / name
        if not src.exists():
            raise SystemExit(f"missing {src} (set WSI_FL_TESTDATA)")
        for r in range(replicas):
            link = slides / f"{Path(name).stem}-r{r}{Path(name).suffix}"
            link.symlink_to(src)
            if mpp is not None:
                rows.append(f"{link.stem},{mpp}")
    mpp_csv = work / "mpp.csv"
    mpp_csv.write_text("\n".join(rows) + "\n")
    return slides, mpp_csv


def run_config(slides: Path, mpp_csv: Path, out: Path, encoder: str, cpu_sets: list[set[int]]) -> Result:
    """One ``wsi-fl preprocess`` per CPU set, all at once; shard i/n when there are n > 1."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "WSI_FL_NO_REEXEC")}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "JOB_COMPLETION_INDEX"))}
    procs = []
    start = time.perf_counter()
    for i, cpus in enumerate(cpu_sets):
        cmd = [sys.executable, "-m", "wsi_fl", "preprocess", "--slides", str(slides), "--out", str(out),
               "--mpp-csv", str(mpp_csv), "--encoder", encoder, "--random-init", "--quiet"]
        if len(cpu_sets) > 1:
            cmd += ["--shard", f"{i}/{len(cpu_sets)}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      preexec_fn=lambda c=cpus: os.sched_setaffinity(0, c)))
    for p in procs:
        output = p.communicate()[0]
        if p.returncode != 0:
            raise SystemExit(f"wsi-fl preprocess failed ({p.returncode}):\n{output}")
    wall = time.perf_counter() - start
    tiles = slides_done = 0
    slide_time = 0.0
    for manifest in out.glob("manifest*.csv"):
        with manifest.open() as f:
            rows = list(csv.DictReader(f))
        assert all(r["status"] == "ok" for r in rows), rows
        tiles += sum(int(r["n_tiles"]) for r in rows)
        slides_done += len(rows)
        slide_time = max(slide_time, sum(float(r["seconds"]) for r in rows))
    return Result(tiles, slides_done, wall, slide_time, sum(len(c) for c in cpu_sets))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, help="names per shared slide in the batch (default 4; --quick: 1)")
    p.add_argument("--repeat", type=int, help="runs of each configuration, best reported (default 2; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="2 slides, one run: a smoke test, not a measurement")
    p.add_argument("--encoder", default="resnet50_trunc")
    args = p.parse_args()
    replicas = args.replicas or (1 if args.quick else 4)
    repeat = args.repeat or (1 if args.quick else 2)
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("needs 2 CPUs")
    c0, c1 = allowed[:2]
    configs = {
        "(a) 1 process x 1 core": [{c0}],
        "(b) 2 shards x 1 core": [{c0}, {c1}],
        "(c) 1 process x 2 cores": [{c0, c1}],
    }
    best: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="wsi-fl-bench-shards-") as tmp:
        slides, mpp_csv = make_batch(Path(tmp), replicas)
        print(f"{args.encoder}, default settings; batch: {len(SLIDES) * replicas} slides ({replicas} names each of"
              f" {', '.join(Path(s).stem for s in SLIDES)}); CPUs {c0},{c1} of {len(allowed)};"
              f" load average {os.getloadavg()[0]:.2f} at start", flush=True)
        for r in range(repeat):
            for name, cpu_sets in configs.items():
                res = run_config(slides, mpp_csv, Path(tmp) / f"out-{r}-{name[1]}", args.encoder, cpu_sets)
                print(f"  run {r + 1}/{repeat} {name}: {res.tiles} tiles, {res.wall:.1f} s wall,"
                      f" {res.slide_time:.1f} s slide time", flush=True)
                if name not in best or res.wall < best[name].wall:
                    best[name] = res
    print(f"\n{'configuration':<26}{'cores':>6}{'tiles':>7}{'wall s':>8}{'tiles/s':>9}{'/core':>7}"
          f"{'slide-time tiles/s':>20}{'/core':>7}{'slides/h':>10}{'10k-tile slides/h':>19}")
    for name, res in best.items():
        wall_rate, own_rate = res.rate(res.wall), res.rate(res.slide_time)
        print(f"{name:<26}{res.cores:>6}{res.tiles:>7}{res.wall:>8.1f}{wall_rate:>9.2f}{wall_rate / res.cores:>7.2f}"
              f"{own_rate:>20.2f}{own_rate / res.cores:>7.2f}{res.slides / res.wall * 3600:>10.0f}"
              f"{wall_rate * 3600 / TILES_PER_WSI:>19.1f}")
    a, b, c = (best[k] for k in configs)

    def per_core(x: Result, wall: bool = True) -> float:
        return x.rate(x.wall if wall else x.slide_time) / x.cores

    print(f"\nper-core throughput relative to (a), wall (slide time): 2 shards {per_core(b) / per_core(a):.2f}"
          f" ({per_core(b, False) / per_core(a, False):.2f}), 2 threads {per_core(c) / per_core(a):.2f}"
          f" ({per_core(c, False) / per_core(a, False):.2f}); 2 shards vs 2 threads on 2 cores:"
          f" {b.rate(b.wall) / c.rate(c.wall):.2f} ({b.rate(b.slide_time) / c.rate(c.slide_time):.2f})")
    print(f"best of {repeat}; load average {os.getloadavg()[0]:.2f} at end (other processes on the machine skew"
          " figures); wall includes each process's start (imports, model set-up)")


if __name__ == "__main__":
    main()
