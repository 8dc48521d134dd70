"""Patch features of one slide, streamed batch by batch: tiles are read in workers while the model runs.

Design, and why:

* **Streaming.** :func:`extract_features` is a generator of ``(coords, features)``
  batches in tile order; the caller appends each to HDF5, so memory is bounded by
  a few batches whatever the slide size.
* **Overlap where it pays.** DataLoader workers read and decode the next batches
  (each opens its own OpenSlide handle: handles must not be shared across
  processes) while the main process runs the model. On a CPU with few cores a
  worker would stall the model's threads for longer than reading takes, so
  there tiles are read in the main process between forwards (``num_workers=0``;
  measurements in :mod:`.runtime`). Tiles travel as uint8 NHWC (a quarter of
  float32's bytes); conversion and normalisation happen on the model's device
  (:meth:`.encoders.Encoder.preprocess`).
* **Tuned without options.** Threads, workers and batch size come from
  :mod:`.runtime`; the glibc allocator is tuned in place (a ~2x CPU speed-up, see
  :mod:`.runtime`). On CUDA, batches are pinned, copied asynchronously, and the
  next batch is launched before the previous one's features are fetched.
* **Errors propagate.** A worker that fails to read a tile returns the failure as
  data (DataLoader would turn a :class:`SlideError` into a ``RuntimeError``), and
  the main process raises :class:`SlideError` naming the slide and the tile; the
  workers are then shut down, never left hanging.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from .encoders import Encoder
from .errors import SlideError
from .runtime import auto_batch_size, auto_num_workers, configure_threads, pick_device, tune_malloc
from .slide import Slide, open_slide, slide_id_for

__all__ = ["ExtractSettings", "TileDataset", "choose_settings", "extract_features"]


@dataclass(frozen=True)
class _Failure:
    """A read error carried from a worker to the main process as data (picklable)."""

    path: str
    problem: str


class TileDataset(Dataset):
    """Tiles of one slide as uint8 ``(tile_size, tile_size, 3)`` tensors, with their index.

    Item ``i`` is the ``read_size`` square at level ``read_level`` whose level-0
    top-left corner is ``coords[i]``, resized to ``tile_size`` with PIL (BOX when
    shrinking, BILINEAR when enlarging) if the sizes differ. The slide is opened
    lazily, once per process, so every DataLoader worker has its own handle.
    :meth:`read_batch` reads with ``read_threads`` threads (OpenSlide is
    thread-safe and decodes without the GIL), for reading in the main process.
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
        x, y = (int(v) for v in self.coords[i])
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
        tiles = np.empty((len(indices), self.tile_size, self.tile_size, 3), np.uint8)

        def fill(k: int) -> None:
            tiles[k] = self.read_tile(indices[k])

        self._handle()  # open once, before any thread needs it
        if self.read_threads == 1 or len(indices) == 1:
            for k in range(len(indices)):
                fill(k)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="tile-reader")
            for _ in self._pool.map(fill, range(len(indices))):  # re-raises the first SlideError
                pass
        return torch.as_tensor(indices, dtype=torch.int64), torch.from_numpy(tiles)

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._pool is not None:
                self._pool.shutdown()
            if self._slide is not None:
                self._slide.close()
        self._slide = self._pid = self._pool = None


class _Batches(Dataset):
    """``dataset[list_of_indices]`` -> one batch, or a :class:`_Failure` instead of raising."""

    def __init__(self, tiles: TileDataset):
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | _Failure:
        try:
            return self.tiles.read_batch(indices)
        except SlideError as err:
            return _Failure(str(err.path), err.problem)


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.size == 0:
        return np.zeros((0, 2), np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"coords must be an integer (n, 2) array, got {coords.dtype} {coords.shape}")
    return coords.astype(np.int64, copy=False)


@dataclass(frozen=True)
class ExtractSettings:
    """What :func:`extract_features` runs with (also what the benchmark's forward-only run uses)."""

    device: torch.device
    batch_size: int
    num_workers: int
    threads: int


def choose_settings(encoder: Encoder, device: str | torch.device = "auto", batch_size: int | None = None,
                    num_workers: int | None = None) -> ExtractSettings:
    """Resolve ``auto``/None settings and apply them to this process (threads, allocator, model device)."""
    dev = pick_device(str(device))
    if encoder.device != dev:
        encoder.to(dev)
    if dev.type == "cpu":
        tune_malloc()
    workers = auto_num_workers(dev) if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {workers}")
    size = auto_batch_size(encoder, dev) if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return ExtractSettings(dev, size, workers, configure_threads(workers, dev))


def extract_features(
    slide_path: str | os.PathLike,
    coords: np.ndarray,
    *,
    read_level: int,
    read_size: int,
    tile_size: int,
    encoder: Encoder,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    progress: bool = True,
    dtype: np.dtype | type = np.float32,
    autocast: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(coords (b, 2) int64, features (b, dim) dtype)`` for consecutive batches, in tile order.

    ``batch_size``/``num_workers`` None and ``device="auto"`` are chosen by
    :func:`choose_settings`. ``autocast`` (CUDA only; bf16 where supported, else
    fp16) is off by default: features should not depend on the hospital's hardware.
    The encoder is moved to the chosen device; torch's thread count is set for
    the run and restored after. Raises :class:`SlideError` for an unreadable
    slide or tile.
    """
    slide_path = Path(slide_path)
    coords = _check_coords(coords)
    if len(coords) == 0:
        return
    with open_slide(slide_path) as slide:  # fail fast, in this process, before workers start
        if not 0 <= int(read_level) < slide.level_count:
            raise SlideError(slide_path, f"read level {read_level} does not exist ({slide.level_count} levels)")
    previous_threads = torch.get_num_threads()
    settings = choose_settings(encoder, device, batch_size, num_workers)
    # Read in the main process between forwards: with all the model's cores, while they are free.
    inline_threads = settings.threads if settings.num_workers == 0 and settings.device.type == "cpu" else 1
    dataset = TileDataset(slide_path, coords, read_level=read_level, read_size=read_size, tile_size=tile_size,
                          read_threads=inline_threads)
    dev, cuda = settings.device, settings.device.type == "cuda"
    loader = DataLoader(
        _Batches(dataset),
        batch_size=None,  # the sampler yields whole batches of indices
        sampler=BatchSampler(SequentialSampler(range(len(coords))), settings.batch_size, drop_last=False),
        num_workers=settings.num_workers,
        pin_memory=cuda,
        prefetch_factor=2 if settings.num_workers else None,
    )
    amp = _autocast(autocast and cuda)
    batches = iter(loader)
    bar = tqdm(total=len(coords), desc=slide_id_for(slide_path), unit="tile", leave=False, disable=not progress)
    pending: tuple[np.ndarray, torch.Tensor, torch.cuda.Event | None] | None = None
    try:
        for item in batches:
            if isinstance(item, _Failure):
                raise SlideError(item.path, item.problem)
            index, tiles = item
            with torch.inference_mode(), amp:  # not held across ``yield``: the caller's mode is its own
                feats = encoder.model(encoder.preprocess(tiles.to(dev, non_blocking=cuda)))
                result = _start_fetch(feats, cuda)
            if pending is not None:
                yield _finish(pending, coords, dtype)
            pending = (index.numpy(), *result)
            bar.update(len(index))
        if pending is not None:
            yield _finish(pending, coords, dtype)
    finally:
        bar.close()
        del batches  # shuts the workers down now, also when we stop early on an error
        dataset.close()
        torch.set_num_threads(previous_threads)


def _autocast(enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def _start_fetch(feats: torch.Tensor, cuda: bool) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying features to the host; on CUDA asynchronously, into pinned memory."""
    if not cuda:
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _finish(pending: tuple[np.ndarray, torch.Tensor, torch.cuda.Event | None], coords: np.ndarray,
            dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
    index, host, event = pending
    if event is not None:
        event.synchronize()
    feats = host.float().numpy().astype(dtype, copy=False)
    return coords[index], feats
