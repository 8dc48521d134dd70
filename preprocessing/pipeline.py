"""Preprocess slides into feature files: the batch a hospital engineer runs, and its per-slide step.

Per slide: open → MPP → tissue mask → tile coordinates → per-tile QC and stain
normalisation (:mod:`.tileprep`) → features streamed into the HDF5 file (see
:mod:`.h5format`) → QC image. Each step is a function of its own module; this
module only sequences them and implements batch policy:

* the whole batch is one stream (:func:`.extract.extract_slides`): a planning
  generator opens each slide, detects tissue and tiles it while the previous
  slide is embedded; each slide's feature file is opened on its first batch,
  committed on its last and discarded on an error;

* a bad slide is recorded as ``failed`` with a one-line reason and the batch
  goes on; the caller's exit code says whether anything failed;
* a slide with no tile (no tissue, or smaller than a tile) is ``empty``, with
  the reason: its feature file exists but holds nothing to learn from, so
  training, labels templates and evaluation leave it out;
* a re-run skips a slide whose output is complete and was made with the same
  parameters from the same file, and redoes partial or stale ones;
* ``shard=(i, n)`` takes every n-th slide of the sorted list, so job-array
  tasks split a site's slides with no coordination;
* the manifest is rewritten atomically after every slide, so an interrupted
  run still leaves an accurate record of what is done;
* :func:`merge_manifests` joins a finished job array's shard manifests into
  ``manifest.csv``, refusing a mix of arrays or a missing shard.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from wsi_fl import __version__

from .artifacts import REASONS, SlideReference, reason_names
from .encoders import Encoder, create_encoder
from .errors import InputError, SlideError  # noqa: F401  (InputError: where callers have always imported it)
from .extract import extract_slides
from .h5format import FeatureFileError, FeatureWriter, check_feature_file, remove_stale_partials, stale_reason
from .manifest import (  # noqa: F401  (re-exported: where callers have always imported them)
    SlideResult,
    SlideTask,
    Status,
    discover_slides,
    empty_reason,
    features_path,
    manifest_path,
    merge_manifests,
    plan_tasks,
    qc_path,
    read_manifest,
    write_manifest,
)
from .params import QCParams, StainParams
from .qc import render_qc, save_qc
from .runtime import pick_device
from .shards import parse_shard  # noqa: F401  (where callers have always imported it)
from .slide import Slide, content_fingerprint, open_slide
from .stain import SlideStain, provenance_record, stain_reference
from .tileprep import TilePrep, sample_indices
from .tilestream import SlideBatch, SlideJob, TileDataset
from .tiling import TileGrid, TilingParams, tile_coordinates
from .tissue import TissueMask, TissueParams, compute_tissue_mask

#: Tiles read per slide, spread over it, before extraction: the slide's median sharpness (relative
#: blur threshold) and its stain estimate are measured on them.
SAMPLE_TILES = 32
#: Errors that fail one slide (recorded, the batch goes on); anything else is a bug and stops the batch.
SLIDE_ERRORS = (SlideError, FeatureFileError, ValueError, OSError, RuntimeError)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides what a preprocessing run writes."""

    out_dir: Path
    tiling: TilingParams = field(default_factory=TilingParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    tile_qc: QCParams = field(default_factory=QCParams)  # per-tile QC thresholds (``tile_qc.enabled``)
    stain: StainParams = field(default_factory=StainParams)  # stain normalisation / augmentation
    encoder: str = "resnet50_trunc"
    weights: Path | None = None  # a weight file or folder (snapshot, hub cache)
    weights_dir: Path | None = None  # the site's weights catalogue (None: $WSI_FL_WEIGHTS_DIR)
    random_init: bool = False
    feature_dtype: Literal["float32", "float16"] = "float32"
    batch_size: int | None = None  # None: chosen by the tool for the encoder and device
    num_workers: int | None = None  # None: chosen by the tool for the machine
    device: str = "auto"
    precision: str | None = None  # None: the card's for the device; "bf16": the fast CPU option (AVX512-BF16/AMX)
    mpp_table: Mapping[str, float] = field(default_factory=dict)  # per-slide MPP from the user, by slide id
    default_mpp: float | None = None  # for slides whose file has no MPP
    overwrite: bool = False
    qc: bool = True  # write QC images
    progress: bool = True


_stop = threading.Event()


def request_stop() -> None:
    """Ask a running batch to stop (signal handlers call this as well as raising KeyboardInterrupt).

    An exception raised from a signal handler is swallowed when it lands in a
    ``__del__`` or a GC callback; the flag is checked after every batch and
    slide, so the stop still happens, at the next safe point.
    """
    _stop.set()


def _check_stop() -> None:
    if _stop.is_set():
        raise KeyboardInterrupt("stop requested")


def expected_attrs(slide_path: Path, slide_id: str, mpp: float, mpp_source: str, cfg: PreprocessConfig,
                   encoder: Encoder, stain: Mapping[str, object] | None = None) -> dict[str, object]:
    """The provenance attributes of a feature file made from this slide with this configuration.

    ``stain`` is :func:`.stain.provenance_record` of the run's reference (computed once per run);
    None computes it here.
    """
    if stain is None:
        stain = provenance_record(cfg.stain, stain_reference(cfg.stain))
    return {
        "slide_id": slide_id,
        "source_file": slide_path.name,
        "source_size": slide_path.stat().st_size,
        "source_fingerprint": content_fingerprint(slide_path),
        "mpp": mpp,
        "mpp_source": mpp_source,
        "target_mpp": cfg.tiling.target_mpp,
        "tile_size": cfg.tiling.tile_size,
        "stride": cfg.tiling.stride or cfg.tiling.tile_size,
        "min_tissue": cfg.tiling.min_tissue,
        "tissue_params": asdict(cfg.tissue),
        "qc_params": asdict(cfg.tile_qc),
        **stain,
        "encoder": encoder.name,
        "weights": encoder.weights,
        # what ran, for the record (not in the provenance check: fp16 on a GPU and fp32 on a CPU are one
        # feature space, and the transform follows from the encoder and the tile size, which are checked)
        "precision": encoder.precision_on(pick_device(cfg.device)),
        "transform": json.dumps(encoder.transform, sort_keys=True),
        "feature_dtype": cfg.feature_dtype,
        "package_version": __version__,
    }


@dataclass
class SlidePlan:
    """A slide ready to embed (``grid``), or already finished at planning (``result``: skipped, failed...)."""

    task: SlideTask
    start: float
    result: SlideResult | None = None
    attrs: dict[str, object] = field(default_factory=dict)
    mask: TissueMask | None = None
    grid: TileGrid | None = None
    dims: tuple[int, int] = (0, 0)


def plan_slide(task: SlideTask, cfg: PreprocessConfig, encoder: Encoder, stain: Mapping[str, object],
               reference: object = None) -> tuple[SlidePlan, TilePrep | None]:
    """Open the slide, reuse a valid output, else detect tissue, tile, and prepare its tiles' QC and stain.

    Raises what a bad slide raises (:data:`SLIDE_ERRORS`); the caller records it.
    """
    start = time.perf_counter()
    out = features_path(cfg.out_dir, task.slide_id)
    remove_stale_partials(out.parent, out.name)
    with open_slide(task.path, user_mpp=cfg.mpp_table.get(task.slide_id), default_mpp=cfg.default_mpp,
                    slide_id=task.slide_id) as slide:
        mpp = slide.mpp  # raises a clear SlideError if missing or implausible
        attrs = expected_attrs(task.path, task.slide_id, mpp, str(slide.info.mpp_source), cfg, encoder, stain)
        plan = SlidePlan(task, start, attrs=attrs, dims=slide.info.dimensions)
        reusable = not cfg.overwrite and out.exists() and (qc_path(cfg.out_dir, task.slide_id).exists() or not cfg.qc)
        if reusable and stale_reason(out, attrs) is None:
            info = check_feature_file(out)
            if info.n_tiles == 0:  # done before, and still nothing to learn from: say so again
                note = empty_reason(plan.dims, float(info.attrs.get("tile_size_level0", 0)), info.attrs)
                plan.result = _result(plan, "empty", 0, note)
            else:
                plan.result = _result(plan, "skipped", info.n_tiles)
            return plan, None
        plan.mask = compute_tissue_mask(slide, cfg.tissue)
        plan.grid = tile_coordinates(slide, plan.mask, cfg.tiling)
        prep = _tile_prep(task, slide, plan, cfg, reference)
    plan.attrs.update(tile_size_level0=float(plan.grid.tile_size_level0), read_level=int(plan.grid.read_level))
    if prep.reference is not None:
        plan.attrs["qc_sharpness"] = prep.reference.sharpness
    return plan, prep


def _tile_prep(task: SlideTask, slide: Slide, plan: SlidePlan, cfg: PreprocessConfig, reference: object) -> TilePrep:
    """QC reference and stain estimate of the slide, from its mask and a sample of its tiles."""
    grid, mask = plan.grid, plan.mask
    assert grid is not None and mask is not None
    if not len(grid.coords):
        return TilePrep(task.slide_id)
    reader = TileDataset(task.path, grid.coords[sample_indices(len(grid.coords), SAMPLE_TILES)],
                         read_level=grid.read_level, read_size=grid.read_size, tile_size=grid.tile_size)
    try:
        sample = np.stack([reader.read_tile(i) for i in range(len(reader))])
    finally:
        reader.close()
    ref = SlideReference.from_mask(mask.thumbnail, mask.mask).with_sharpness(sample, cfg.tissue.white_level)
    stain = SlideStain.fit(reference, sample) if reference is not None else None  # type: ignore[arg-type]
    return TilePrep(task.slide_id, ref, cfg.tissue, cfg.tile_qc, stain, cfg.stain.hed_jitter, cfg.stain.seed)


def _result(plan: SlidePlan, status: Status, n_tiles: int, error: str = "") -> SlideResult:
    return SlideResult(plan.task.slide_id, status, n_tiles, time.perf_counter() - plan.start, error,
                       str(plan.task.path))


def _failure(task: SlideTask, start: float, err: BaseException) -> SlideResult:
    message = str(err) if isinstance(err, SlideError) else f"{task.path.name}: {type(err).__name__}: {err}"
    return SlideResult(task.slide_id, "failed", 0, time.perf_counter() - start, " ".join(message.split()),
                       str(task.path))


class _SlideOutput:
    """One slide's feature file while its batches arrive: opened on the first, committed on the last."""

    def __init__(self, plan: SlidePlan, cfg: PreprocessConfig, encoder: Encoder):
        self.plan, self.cfg = plan, cfg
        self.out = features_path(cfg.out_dir, plan.task.slide_id)
        self.excluded: list[tuple[np.ndarray, np.ndarray]] = []
        self.kept: list[np.ndarray] = []
        self.counts = dict.fromkeys(REASONS, 0)
        self.plan.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._stack = contextlib.ExitStack()
        self.writer = self._stack.enter_context(
            FeatureWriter(self.out, encoder.dim, plan.attrs, dtype=cfg.feature_dtype))

    def add(self, batch: SlideBatch) -> None:
        qc = batch.qc
        self.kept.append(batch.coords)
        if qc is None:
            self.writer.append(batch.coords, batch.features)
            return
        keep = qc.keep
        if len(batch.coords):
            self.writer.append(batch.coords, batch.features, {k: v[keep] for k, v in qc.measures.items()})
        if not keep.all():
            drop = ~keep
            self.writer.exclude(qc.coords[drop], qc.reasons[drop], {k: v[drop] for k, v in qc.measures.items()})
            self.excluded.append((qc.coords[drop], qc.reasons[drop]))
            for bits in qc.reasons[drop]:
                for name in reason_names(int(bits)):
                    self.counts[name] += 1

    def commit(self) -> SlideResult:
        plan = self.plan
        self.writer.update_attrs(qc_excluded=self.counts)
        n = self.writer.n
        self.writer.commit()
        self.close()
        if self.cfg.qc:
            assert plan.mask is not None and plan.grid is not None
            coords, reasons = _concat(self.excluded)
            kept = np.concatenate(self.kept) if self.kept else np.zeros((0, 2), np.int64)
            image = render_qc(plan.mask.thumbnail, plan.mask.mask, plan.mask.downsample, kept,
                              plan.grid.tile_size_level0, coords, reasons)
            save_qc(image, qc_path(self.cfg.out_dir, plan.task.slide_id))
        if not n:
            assert plan.grid is not None
            note = empty_reason(plan.dims, plan.grid.tile_size_level0, {"qc_excluded": json.dumps(self.counts)})
            return _result(plan, "empty", 0, note)
        return _result(plan, "ok", n)

    def close(self) -> None:
        """Leave the writer's block: after :meth:`commit` a no-op, otherwise the partial file is deleted."""
        self._stack.close()


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.uint8)
    return np.concatenate([c for c, _ in parts]), np.concatenate([r for _, r in parts])


def preprocess_slide(task: SlideTask, cfg: PreprocessConfig, encoder: Encoder) -> SlideResult:
    """Run one slide end to end (a batch of one). Raises :class:`SlideError` (and others) on failure."""
    results: list[SlideResult] = []
    for result in _stream([task], cfg, encoder, log=lambda _: None, on_error="raise"):
        results.append(result)
    return results[0]


def _stream(tasks: Sequence[SlideTask], cfg: PreprocessConfig, encoder: Encoder, log: Callable[[str], None],
            on_error: Literal["record", "raise"] = "record",
            current: list[SlidePlan] | None = None) -> Iterator[SlideResult]:
    """Results of ``tasks``, in order, through one extraction stream; ``current``[0]: the slide being written."""
    reference = stain_reference(cfg.stain)  # InputError for a bad --stain-reference, before any slide
    stain = provenance_record(cfg.stain, reference)

    def jobs() -> Iterator[SlideJob]:
        for task in tasks:
            _check_stop()
            start = time.perf_counter()
            try:
                plan, prep = plan_slide(task, cfg, encoder, stain, reference)
            except SLIDE_ERRORS as err:
                if on_error == "raise":
                    raise
                plan, prep = SlidePlan(task, start, _failure(task, start, err)), None
            if plan.grid is None:  # finished at planning: an empty job carries the result through the stream
                yield SlideJob(task.path, np.zeros((0, 2), np.int64), 0, 1, 1, key=plan)
            else:
                g = plan.grid
                yield SlideJob(task.path, g.coords, g.read_level, g.read_size, g.tile_size, key=plan, prep=prep)

    output: _SlideOutput | None = None
    failed: SlidePlan | None = None
    batches = extract_slides(jobs(), encoder=encoder, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                             device=cfg.device, progress=cfg.progress)
    try:
        for batch in batches:
            plan: SlidePlan = batch.job.key
            if plan is failed:  # the rest of a slide that failed mid-way
                continue
            if current is not None:
                current[:] = [plan]
            try:
                if batch.error is not None:
                    raise batch.error
                if plan.result is None and output is None:
                    output = _SlideOutput(plan, cfg, encoder)
                if output is not None:
                    output.add(batch)
                if batch.last:
                    result = plan.result if output is None else output.commit()
                    output = None
                    if current is not None:
                        current[:] = []
                    if result.status == "failed":  # failed at planning (no MPP, unreadable...): said as it happens
                        log(f"FAILED {result.error}")
                    yield result
            except SLIDE_ERRORS as err:
                if output is not None:
                    output.close()
                    output = None
                if on_error == "raise":
                    raise
                result = _failure(plan.task, plan.start, err)
                log(f"FAILED {result.error}")
                failed = plan if not batch.last else None
                if current is not None:
                    current[:] = []
                yield result
            _check_stop()
    finally:
        if output is not None:
            output.close()
        batches.close()


def run_preprocess(
    slides: Sequence[Path], cfg: PreprocessConfig, shard: tuple[int, int] | None = None,
    encoder: Encoder | None = None, log: Callable[[str], None] = tqdm.write,
) -> list[SlideResult]:
    """Preprocess a batch; returns one result per slide of this shard and writes the manifest.

    ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM turned into it by the CLI) stops
    the batch after the manifest is written with the slide in progress marked
    ``failed: interrupted``; that slide leaves no output.
    """
    tasks = plan_tasks(slides, shard)
    if encoder is None:
        encoder = create_encoder(cfg.encoder, weights=cfg.weights, random_init=cfg.random_init,
                                 weights_dir=cfg.weights_dir, device=pick_device(cfg.device), precision=cfg.precision)
    manifest = manifest_path(cfg.out_dir, shard)
    results: list[SlideResult] = []
    current: list[SlidePlan] = []  # the slide whose batches are arriving, set by the stream
    bar = tqdm(total=len(tasks), desc="slides", unit="slide", disable=not cfg.progress)
    try:
        for result in _stream(tasks, cfg, encoder, log, current=current):
            results.append(result)
            write_manifest(manifest, results)
            bar.update(1)
            bar.set_postfix_str(result.slide_id)
    except KeyboardInterrupt:
        if current:
            results.append(_result(current[0], "failed", 0, "interrupted before completion"))
        raise
    finally:  # also after an interrupt (even one landing between slides), so the record is complete
        write_manifest(manifest, results)
        bar.close()
    return results
