"""Tiles of many slides as one stream of batches: jobs, the chunks workers read, and the lazy schedule.

Split from :mod:`.extract` (which runs the model over the stream) because this
part is about reading: which tiles, in which order, opened where. The design
(one loader for all slides, the next slide scheduled and planned while the
current one finishes) is explained in :mod:`.extract`.

Every chunk sent to a worker is self-contained (path, coordinates, read
geometry), so the workers never need the list of jobs: jobs can be produced
while the loader runs, by a caller's generator that detects tissue and tiles
one slide after another.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import SlideError
from .slide import Slide, open_slide

__all__ = ["ChunkQC", "ChunkReader", "ReadFailure", "Schedule", "SlideBatch", "SlideJob", "TileDataset", "job_problem"]


@dataclass(frozen=True)
class SlideJob:
    """One slide's tiles to embed: where they are, how to read them, and the caller's own ``key``.

    Tile ``i`` is the ``read_size`` square at ``read_level`` whose level-0
    top-left corner is ``coords[i]``, resized to ``tile_size`` if different.
    """

    path: Path
    coords: np.ndarray
    read_level: int
    read_size: int
    tile_size: int
    key: Any = None  #: anything the caller wants back with the job's batches (its task, its writer...)
    #: Applied to every chunk of tiles where it is read, before the encoder (picklable; ``prep(coords,
    #: tiles)`` returns a :class:`~.tileprep.PrepResult`: QC exclusion, stain normalisation, jitter).
    prep: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "coords", _check_coords(self.coords))
        for name in ("read_level", "read_size", "tile_size"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.read_size < 1 or self.tile_size < 1:
            raise ValueError(f"read_size and tile_size must be positive, got {self.read_size} and {self.tile_size}")


@dataclass(frozen=True)
class SlideBatch:
    """Consecutive features of one job, in tile order; ``last`` marks the job's final batch.

    Every job ends with exactly one ``last`` batch: a job without tiles yields
    one empty batch, and a failed job one empty batch whose ``error`` says why
    (batches of it yielded before the failure are then to be discarded).
    """

    job: SlideJob
    coords: np.ndarray  #: (b, 2) int64, level 0
    features: np.ndarray  #: (b, dim)
    last: bool
    error: SlideError | None = None
    #: With a ``prep``: the QC of every tile read for this batch, kept or not (``features`` has the kept).
    qc: ChunkQC | None = None


@dataclass(frozen=True)
class ChunkQC:
    """QC of every tile of a chunk, carried from the reader: what was read, why tiles were dropped."""

    coords: np.ndarray  #: (n, 2) int64, every tile read
    reasons: np.ndarray  #: (n,) uint8 exclusion bits (0: kept)
    measures: dict[str, np.ndarray]  #: (n,) float32 per measure

    @property
    def keep(self) -> np.ndarray:
        return self.reasons == 0


@dataclass(frozen=True)
class _Chunk:
    """One batch to read, sent to a worker: self-contained, so jobs can be added while workers run."""

    job: int
    path: Path
    coords: np.ndarray
    read: tuple[int, int, int]  # read_level, read_size, tile_size
    last: bool
    problem: str | None = None  # the job failed before reading (cannot open the slide, no such level)
    prep: Any = None  # the job's prep (see SlideJob)


@dataclass(frozen=True)
class ReadFailure:
    """A read error carried from a worker to the main process as data (picklable)."""

    job: int
    path: str
    problem: str


class TileDataset(Dataset):
    """Tiles of one slide as uint8 ``(tile_size, tile_size, 3)`` tensors, with their index.

    Item ``i`` is the ``read_size`` square at level ``read_level`` whose level-0
    top-left corner is ``coords[i]``, resized to ``tile_size`` with PIL (BOX when
    shrinking, BILINEAR when enlarging) if the sizes differ. The slide is opened
    lazily, once per process, so every DataLoader worker has its own handle.
    :meth:`read_batch` and :meth:`read_coords` read with ``read_threads``
    threads (OpenSlide is thread-safe and decodes without the GIL), for reading
    in the main process.
    """

    def __init__(self, slide_path: str | os.PathLike, coords: np.ndarray, *, read_level: int,
                 read_size: int, tile_size: int, read_threads: int = 1):
        self.slide_path = Path(slide_path)
        self.coords = _check_coords(coords)
        self.read_level = int(read_level)
        self.read_size = int(read_size)
        self.tile_size = int(tile_size)
        if self.read_size < 1 or self.tile_size < 1:
            raise ValueError(f"read_size and tile_size must be positive, got {read_size} and {tile_size}")
        self.read_threads = max(1, int(read_threads))
        self._slide: Slide | None = None
        self._pid: int | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_slide"] = state["_pid"] = state["_pool"] = None  # handles and threads stay in their process
        return state

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # a forked child opens its own
            self._slide, self._pid, self._pool = open_slide(self.slide_path), os.getpid(), None
        return self._slide

    def read_tile(self, i: int) -> np.ndarray:
        """Tile ``i`` as an RGB uint8 array; SlideError names the slide and the tile on failure."""
        return self._read_at(*(int(v) for v in self.coords[i]))

    def _read_at(self, x: int, y: int) -> np.ndarray:
        try:
            pixels = self._handle().read_region((x, y), self.read_level, (self.read_size, self.read_size))
        except SlideError as err:
            raise SlideError(self.slide_path, f"tile at ({x}, {y}), level {self.read_level}: {err.problem}") from err
        if self.read_size != self.tile_size:
            method = Image.Resampling.BOX if self.read_size > self.tile_size else Image.Resampling.BILINEAR
            pixels = np.asarray(Image.fromarray(pixels).resize((self.tile_size, self.tile_size), method))
        return pixels

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return int(i), torch.from_numpy(np.require(self.read_tile(int(i)), requirements=["C", "W"]))

    def read_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices int64 (b,), tiles uint8 (b, t, t, 3))`` filled in place, no per-tile tensors."""
        return torch.as_tensor(indices, dtype=torch.int64), self.read_coords(self.coords[indices])

    def read_coords(self, coords: np.ndarray) -> torch.Tensor:
        """Tiles at level-0 ``coords`` (any, not only this dataset's) as uint8 ``(b, t, t, 3)``."""
        tiles = np.empty((len(coords), self.tile_size, self.tile_size, 3), np.uint8)

        def fill(k: int) -> None:
            tiles[k] = self._read_at(int(coords[k][0]), int(coords[k][1]))

        self._handle()  # open once, before any thread needs it
        if self.read_threads == 1 or len(coords) <= 1:
            for k in range(len(coords)):
                fill(k)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="tile-reader")
            for _ in self._pool.map(fill, range(len(coords))):  # re-raises the first SlideError
                pass
        return torch.from_numpy(tiles)

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._pool is not None:
                self._pool.shutdown()
            if self._slide is not None:
                self._slide.close()
        self._slide = self._pid = self._pool = None


class ChunkReader(Dataset):
    """``reader[chunk]`` -> ``(job, last, tiles, qc)``, or a :class:`ReadFailure` instead of raising.

    ``qc`` is None without a ``prep``; with one, ``tiles`` are the prepared, kept tiles and ``qc``
    a :class:`ChunkQC` of all the tiles read.

    Keeps the last few slides open in each process (a worker reads the end of
    one slide and the start of the next).
    """

    def __init__(self, read_threads: int = 1, keep_open: int = 3):
        self.read_threads, self.keep_open = read_threads, keep_open
        self._open: OrderedDict[tuple[Path, tuple[int, int, int]], TileDataset] = OrderedDict()

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_open": OrderedDict()}

    def __getitem__(self, chunk: _Chunk) -> tuple[int, bool, torch.Tensor, ChunkQC | None] | ReadFailure:
        if chunk.problem is not None:
            return ReadFailure(chunk.job, str(chunk.path), chunk.problem)
        key = (chunk.path, chunk.read)
        if key not in self._open:
            level, read_size, tile_size = chunk.read
            self._open[key] = TileDataset(chunk.path, np.zeros((0, 2), np.int64), read_level=level,
                                          read_size=read_size, tile_size=tile_size, read_threads=self.read_threads)
            while len(self._open) > self.keep_open:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(key)
        try:
            tiles = self._open[key].read_coords(chunk.coords)
        except SlideError as err:
            return ReadFailure(chunk.job, str(err.path), err.problem)
        if chunk.prep is None or not len(chunk.coords):
            return chunk.job, chunk.last, tiles, None
        try:
            done = chunk.prep(chunk.coords, tiles.numpy())
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as err:
            return ReadFailure(chunk.job, str(chunk.path), f"tile preparation (QC/stain) failed: {err}")
        qc = ChunkQC(chunk.coords, done.reasons, done.measures)
        return chunk.job, chunk.last, torch.from_numpy(done.tiles), qc

    def __len__(self) -> int:  # only the sampler decides what is read
        raise TypeError("a stream of chunks has no length")

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def job_problem(job: SlideJob) -> str | None:
    """Why the job cannot be read at all (checked once per job, before any of its tiles is scheduled), or None."""
    if len(job.coords) == 0:
        return None
    try:
        with open_slide(job.path) as slide:
            if not 0 <= job.read_level < slide.level_count:
                return f"read level {job.read_level} does not exist ({slide.level_count} levels)"
    except SlideError as err:
        return err.problem
    return None


class Schedule:
    """The loader's sampler: chunks of each job in turn, pulled lazily, so the loader
    schedules the next slide while the current one's last batches are still running.

    ``ahead > 0`` takes jobs from ``jobs`` (and checks them) in a background
    thread, up to ``ahead`` jobs before they are needed.
    """

    def __init__(self, jobs: Iterable[SlideJob], batch_size: int, ahead: int):
        self.source, self.batch_size, self.ahead = jobs, batch_size, ahead
        self.jobs: dict[int, SlideJob] = {}
        self._stop = threading.Event()

    def _checked(self) -> Iterator[tuple[SlideJob, str | None]]:
        for job in self.source:
            if not isinstance(job, SlideJob):
                raise TypeError(f"extract_slides takes SlideJob items, got {type(job).__name__}")
            yield job, job_problem(job)

    def __iter__(self) -> Iterator[_Chunk]:
        jobs = _in_background(self._checked(), self.ahead, self._stop) if self.ahead > 0 else self._checked()
        for n, (job, problem) in enumerate(jobs):
            self.jobs[n] = job
            chunks = range(0, len(job.coords), self.batch_size)
            read = (job.read_level, job.read_size, job.tile_size)
            if problem is not None or not chunks:
                yield _Chunk(n, job.path, job.coords[:0], read, True, problem)
                continue
            for start in chunks:
                stop = start + self.batch_size
                yield _Chunk(n, job.path, job.coords[start:stop], read, stop >= len(job.coords), prep=job.prep)

    def close(self) -> None:
        self._stop.set()


def _in_background(items: Iterator[Any], ahead: int, stop: threading.Event) -> Iterator[Any]:
    """``items``, produced by a daemon thread up to ``ahead`` items early; its exceptions re-raised here."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=ahead)

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                q.put((kind, value), timeout=0.1)
                return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put("error", err)

    threading.Thread(target=produce, name="slide-planner", daemon=True).start()
    while True:
        kind, value = q.get()
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.size == 0:
        return np.zeros((0, 2), np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"coords must be an integer (n, 2) array, got {coords.dtype} {coords.shape}")
    return coords.astype(np.int64, copy=False)
