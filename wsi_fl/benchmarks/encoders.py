"""Patch-encoder throughput: the tool's extraction against its own forward pass and a naive loop (CPU), and
many slides streamed through a GPU (tiles/s, how busy the GPU is, and the gaps between slides).

CPU protocol (:func:`cpu_part`; each part is meant to run in a fresh process, so allocator and thread
settings are clean):

* ``naive``: what a user would write. A default process (no ``GLIBC_TUNABLES``, torch's default
  threads) builds the card's network and runs ``model(x)`` under ``torch.inference_mode()`` on an
  in-memory float batch of :data:`NAIVE_BATCH`.
* ``tool``, two measurements alternated in one process with the tool's settings
  (:func:`preprocessing.extract.choose_settings`): ``forward``, the compute alone (the slide's tiles,
  read beforehand, as uint8 through ``Encoder.preprocess`` and the model), the upper bound of
  ``extract``, :func:`preprocessing.extract.extract_features` over real OpenSlide reads of the slide
  (decoding, resizing, everything).

Each measurement runs one warm-up batch, then times ``n`` tiles. Goals: ``extract/forward`` ≥ 0.95 and
``forward/naive`` ≥ 1.3 for a ViT-S and a ViT-B card.

Stream protocol (:func:`stream_run`, GPU; on CPU only as a smoke test): synthetic slides are planned as
the pipeline plans them (tissue mask, tile grid) by a generator, and embedded either through one
stream (:func:`preprocessing.extract.extract_slides`: the next slide is planned and decoded while the
current one finishes) or one loader per slide (:func:`preprocessing.extract.extract_features`, the
way with idle valleys). Reported: tiles/s over the whole run, the fraction of wall time the device
computes (CUDA events around every forward), and the longest idle gap of the device between two
forwards, at slide boundaries and elsewhere.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

CPU_CARDS = ("kaiko-vits16", "kaiko-vitb16")  # a ViT-S/16 and a ViT-B/16 card (timm)
GPU_CARDS = ("uni_v1", "hoptimus1")  # ViT-L/16 and ViT-g/14 with 4 registers
NAIVE_BATCH = 32


# -- CPU parts ---------------------------------------------------------------------------------


def slide_coords(slide: Path, tile: int, n: int) -> np.ndarray:
    """``n`` level-0 corners of ``tile`` px squares on a half-overlapping grid, repeated if the slide is small."""
    from preprocessing.slide import open_slide

    with open_slide(slide) as s:
        w, h = s.dimensions
    step = max(tile // 2, 1)
    grid = np.array([(x, y) for y in range(0, h - tile + 1, step) for x in range(0, w - tile + 1, step)], np.int64)
    if len(grid) == 0:
        raise ValueError(f"{slide.name} ({w}x{h} px) is smaller than one {tile} px tile")
    return np.resize(grid, (n, 2))


class OthersMeter:
    """Share of the machine's CPU time used by *other* processes while a measurement ran (Linux).

    On a shared machine every wall-clock figure is only as good as the quiet it
    was taken in; this says how quiet it was: 0 (alone) to 1 (every core busy
    with someone else). ``nan`` where ``/proc/stat`` is unreadable.
    """

    def __enter__(self) -> OthersMeter:
        self.share = float("nan")
        self._start = (self._busy_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, mine, wall = self._busy_s(), time.process_time(), time.perf_counter()
        b0, m0, w0 = self._start
        cores = os.cpu_count() or 1
        if busy == busy and b0 == b0 and wall > w0:
            # /proc/stat counts in clock ticks (10 ms): clamp what a short window rounds past the ends
            self.share = min(1.0, max(0.0, ((busy - b0) - (mine - m0)) / ((wall - w0) * cores)))

    @staticmethod
    def _busy_s() -> float:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return float("nan")
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _timed(step: Callable[[int], object], n: int, batch: int) -> dict:
    """tiles/s of ``step(b)`` over ``n`` tiles in batches of ``batch`` after one warm-up batch, and how busy
    the rest of the machine was meanwhile (:class:`OthersMeter`)."""
    step(min(batch, n))
    with OthersMeter() as others:
        start, done = time.perf_counter(), 0
        while done < n:
            b = min(batch, n - done)
            step(b)
            done += b
        rate = n / (time.perf_counter() - start)
    return {"tiles_per_s": rate, "others": others.share}


def cpu_part(part: str, card_name: str, n: int, slide: Path, rounds: int = 2, precision: str | None = None) -> dict:
    """One CPU measurement in this process: ``naive`` -> tiles/s and settings; ``tool`` -> ``{"forward": ...,
    "extract": ...}``, alternated ``rounds`` times in this one process (medians), so their ratio is free of
    the process-to-process spread (clock boost, memory placement: ±10 % here even on a quiet machine).
    ``precision`` runs the tool in another precision than the card's CPU default (``bf16``); naive is fp32."""
    from preprocessing.cards import get_card

    card = get_card(card_name)
    if part == "naive":
        from preprocessing.encoders import resnet_trunc
        from preprocessing.foundation import build_network

        torch.manual_seed(0)
        model = resnet_trunc(card.arch) if card.library == "torchvision" else build_network(card).eval()
        x = torch.randn(NAIVE_BATCH, 3, card.input_size, card.input_size)
        with torch.inference_mode():
            timed = _timed(lambda b: model(x[:b]), n, NAIVE_BATCH)
        return {**timed, "batch": NAIVE_BATCH, "threads": torch.get_num_threads()}
    if part != "tool":
        raise ValueError(f"unknown part {part!r}")

    from preprocessing.encoders import create_encoder
    from preprocessing.extract import TileDataset, choose_settings, extract_features
    from preprocessing.runtime import ensure_fast_allocator, fast_allocator_active

    ensure_fast_allocator()
    enc = create_encoder(card_name, random_init=True, precision=precision)
    s = choose_settings(enc, "cpu")
    info = {"precision": enc.precision, "batch": s.batch_size, "threads": s.threads, "workers": s.num_workers,
            "malloc": fast_allocator_active()}
    coords = slide_coords(slide, card.tile_size, n)
    reader = TileDataset(slide, coords, read_level=0, read_size=card.tile_size, tile_size=card.tile_size,
                         read_threads=s.threads)  # as extraction reads inline
    tiles = reader.read_coords(coords)  # forward-only runs on the very tiles extraction reads
    start = time.perf_counter()
    reader.read_coords(coords)
    read_rate = n / (time.perf_counter() - start)
    reader.close()
    kw = {"read_level": 0, "read_size": card.tile_size, "tile_size": card.tile_size, "encoder": enc,
          "device": "cpu", "progress": False}

    def forward() -> dict:
        with torch.inference_mode():
            return _timed(lambda b: enc.model(enc.preprocess(tiles[:b])), n, s.batch_size)

    def extract() -> dict:
        for _ in extract_features(slide, coords[: min(s.batch_size, n)], **kw):  # warm-up: one batch
            pass
        plain = enc.model
        enc.model = clock = BusyClock(plain, torch.device("cpu"))
        try:
            with OthersMeter() as others:
                start = time.perf_counter()
                done = sum(len(c) for c, _f in extract_features(slide, coords, **kw))
                wall = time.perf_counter() - start
        finally:
            enc.model = plain
        # The model's share of the wall time: the overhead of extraction measured within one run, so free
        # of the drift between runs that a ratio of two runs carries.
        busy = sum(clock.intervals_ms()[0]) / 1e3 / wall
        return {"tiles_per_s": done / wall, "others": others.share, "model_busy": busy}

    runs: dict[str, list[dict]] = {"forward": [], "extract": []}
    for _ in range(rounds):
        runs["forward"].append(forward())
        runs["extract"].append(extract())
    info["read_tiles_per_s"] = read_rate  # reading alone: extract/forward can reach 1 / (1 + forward/read)
    info["model_busy"] = statistics.median(r["model_busy"] for r in runs["extract"])
    return {part: {"tiles_per_s": statistics.median(r["tiles_per_s"] for r in rs),
                   "others": max(r["others"] for r in rs), **info} for part, rs in runs.items()}


def summarise_cpu(runs: dict[str, list[dict]], quiet: float = 0.1) -> dict[str, float]:
    """Median tiles/s of each part and the medians of the per-repeat ratios (repeats were interleaved,
    so a ratio compares runs made under the same load); ``quiet ...`` the same over the repeats in which
    other processes used at most ``quiet`` of the machine during every part (absent if none was)."""

    def medians(keep: list[int], prefix: str) -> dict[str, float]:
        rate = {part: [rs[i]["tiles_per_s"] for i in keep] for part, rs in runs.items()}
        out = {f"{prefix}{part}": statistics.median(v) for part, v in rate.items()}
        for top, bottom in (("forward", "naive"), ("extract", "forward")):
            if top in rate and bottom in rate:
                pairs = zip(rate[top], rate[bottom], strict=True)
                out[f"{prefix}{top}/{bottom}"] = statistics.median(t / b for t, b in pairs)
        return out

    repeats = min(len(rs) for rs in runs.values())
    calm = [i for i in range(repeats) if all(rs[i].get("others", 1.0) <= quiet for rs in runs.values())]
    out = medians(list(range(repeats)), "")
    if calm:
        out |= medians(calm, "quiet ") | {"quiet repeats": float(len(calm))}
    return out


# -- the stream over many slides (GPU) -------------------------------------------------------------


class BusyClock(nn.Module):
    """Wraps a model and records when the device starts and ends each forward.

    CUDA: events on the current stream, read after the run (reading them earlier
    would synchronise and change what is measured). CPU: the forward is
    synchronous, so host clocks are exact.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.inner, self.cuda = model, device.type == "cuda"
        self.marks: list[tuple[object, object]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = self._mark()
        out = self.inner(x)
        self.marks.append((start, self._mark()))
        return out

    def _mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def intervals_ms(self) -> tuple[list[float], list[float]]:
        """(busy ms of each forward, idle ms before each forward but the first)."""
        if self.cuda:
            torch.cuda.synchronize()

        def ms(a: object, b: object) -> float:
            return a.elapsed_time(b) if self.cuda else (b - a) * 1e3  # type: ignore[attr-defined, operator]

        busy = [ms(s, e) for s, e in self.marks]
        idle = [ms(self.marks[i - 1][1], self.marks[i][0]) for i in range(1, len(self.marks))]
        return busy, idle


def bench_slides(cache_dir: Path, count: int, size: int) -> list[Path]:
    """``count`` synthetic ``size``² px slides at 0.5 µm/px, mostly tissue (cached: written once)."""
    from wsi_fl.benchmarks.slides import cached_slide

    return [cached_slide(cache_dir, size, mpp=0.5, tissue_scale=4.0, seed=i) for i in range(count)]


def plan_jobs(paths: Sequence[Path], tile_size: int, mpp: float, log: list[tuple[str, float]]) -> Iterator:
    """Each slide's :class:`~preprocessing.extract.SlideJob`, planned as the pipeline plans it (tissue mask,
    tile grid); ``log`` gets ``(slide, seconds spent planning)``."""
    from preprocessing.extract import SlideJob
    from preprocessing.params import TilingParams
    from preprocessing.slide import open_slide
    from preprocessing.tiling import tile_coordinates
    from preprocessing.tissue import compute_tissue_mask

    for path in paths:
        start = time.perf_counter()
        with open_slide(path) as slide:
            grid = tile_coordinates(slide, compute_tissue_mask(slide), TilingParams(target_mpp=mpp,
                                                                                   tile_size=tile_size))
        log.append((path.name, time.perf_counter() - start))
        yield SlideJob(path, grid.coords, grid.read_level, grid.read_size, grid.tile_size, key=path.name)


def stream_run(encoder, paths: Sequence[Path], *, per_slide: bool, device: str, tile_size: int, mpp: float = 0.5,
               batch_size: int | None = None, num_workers: int | None = None) -> dict:
    """Embed every slide once; tiles/s, device busy fraction and idle gaps (see the module docstring)."""
    from preprocessing.extract import extract_features, extract_slides

    clock = BusyClock(encoder.model, torch.device(device))
    plain, encoder.model = encoder.model, clock
    log: list[tuple[str, float]] = []
    boundaries: list[int] = []  # index of the first forward of each slide after the first
    kw = {"encoder": encoder, "batch_size": batch_size, "num_workers": num_workers, "device": device,
          "progress": False, "dtype": np.float16}
    tiles = 0
    start = time.perf_counter()
    try:
        if per_slide:
            for job in plan_jobs(paths, tile_size, mpp, log):
                if tiles:
                    boundaries.append(len(clock.marks))  # the next forward is this slide's first
                for coords, _f in extract_features(job.path, job.coords, read_level=job.read_level,
                                                   read_size=job.read_size, tile_size=job.tile_size, **kw):
                    tiles += len(coords)
        else:
            previous, forwards = None, 0
            for batch in extract_slides(plan_jobs(paths, tile_size, mpp, log), **kw):
                if batch.error is not None:
                    raise batch.error
                if len(batch.coords):  # one forward each, yielded in forward order
                    if previous is not None and batch.job is not previous:
                        boundaries.append(forwards)  # this forward is the new slide's first
                    previous, forwards, tiles = batch.job, forwards + 1, tiles + len(batch.coords)
        wall = time.perf_counter() - start
    finally:
        encoder.model = plain
    busy, idle = clock.intervals_ms()
    at = set(boundaries)
    at_boundary = [idle[i - 1] for i in at if 0 < i <= len(idle)]
    elsewhere = [g for i, g in enumerate(idle, start=1) if i not in at]
    return {"mode": "per-slide" if per_slide else "stream", "slides": len(paths), "tiles": tiles,
            "seconds": wall, "tiles_per_s": tiles / wall, "busy": sum(busy) / 1e3 / wall,
            "max_gap_boundary_ms": max(at_boundary, default=0.0), "max_gap_other_ms": max(elsewhere, default=0.0),
            "median_gap_ms": statistics.median(idle) if idle else 0.0,
            "median_forward_ms": statistics.median(busy) if busy else 0.0,
            "plan_s": sum(s for _, s in log)}
