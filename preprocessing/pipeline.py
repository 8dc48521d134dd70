"""Preprocess slides into feature files: the batch a hospital engineer runs, and its per-slide step.

Per slide: open → MPP → tissue mask → tile coordinates → QC image → features
streamed into the HDF5 file (see :mod:`.h5format`). Each step is a function of
its own module; this module only sequences them and implements batch policy:

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

import csv
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from wsi_fl import __version__

from .atomic import write_csv_atomic
from .encoders import Encoder, create_encoder
from .errors import InputError, SlideError
from .extract import extract_features
from .h5format import FeatureFileError, FeatureWriter, check_feature_file, remove_stale_partials, stale_reason
from .qc import render_qc, save_qc
from .runtime import pick_device
from .shards import parse_shard  # noqa: F401  (where callers have always imported it)
from .slide import content_fingerprint, open_slide, slide_id_for
from .tiling import TilingParams, tile_coordinates
from .tissue import TissueParams, compute_tissue_mask

#: File suffixes picked up when a directory is given (OpenSlide's formats and plain TIFF).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)
MANIFEST_FIELDS = ("slide_id", "status", "n_tiles", "seconds", "error", "source")

Status = Literal["ok", "skipped", "empty", "failed"]
#: Statuses of slides whose feature file has tiles: what training and ``wsi-fl labels init`` use.
USABLE = ("ok", "skipped")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides what a preprocessing run writes."""

    out_dir: Path
    tiling: TilingParams = field(default_factory=TilingParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    encoder: str = "resnet50_trunc"
    weights: Path | None = None  # a weight file or folder (snapshot, hub cache)
    weights_dir: Path | None = None  # the site's weights catalogue (None: $WSI_FL_WEIGHTS_DIR)
    random_init: bool = False
    feature_dtype: Literal["float32", "float16"] = "float32"
    batch_size: int | None = None  # None: chosen by the tool for the encoder and device
    num_workers: int | None = None  # None: chosen by the tool for the machine
    device: str = "auto"
    mpp_table: Mapping[str, float] = field(default_factory=dict)  # per-slide MPP from the user, by slide id
    default_mpp: float | None = None  # for slides whose file has no MPP
    overwrite: bool = False
    qc: bool = True
    progress: bool = True


@dataclass(frozen=True)
class SlideTask:
    slide_id: str
    path: Path


@dataclass
class SlideResult:
    slide_id: str
    status: Status
    n_tiles: int
    seconds: float
    error: str
    source: str


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


def features_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "features" / f"{slide_id}.h5"


def qc_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "qc" / f"{slide_id}.png"


def discover_slides(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories searched recursively for :data:`SLIDE_SUFFIXES`.

    A DICOM slide is a directory of ``.dcm`` files that OpenSlide opens from any
    one of them (and is named after it: :func:`~.slide.slide_id_for`), so a
    directory contributes only its first ``.dcm`` file, whether found or given.
    """
    found: list[Path] = []
    dicom_dirs: set[Path] = set()

    def add(f: Path) -> None:
        if f.suffix.lower() == ".dcm":
            if f.absolute().parent in dicom_dirs:
                return
            dicom_dirs.add(f.absolute().parent)
        found.append(f)

    for p in map(Path, paths):
        if not p.is_dir():
            add(p)
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES and not f.name.startswith("."):
                add(f)
    return found


def plan_tasks(slides: Sequence[Path], shard: tuple[int, int] | None = None) -> list[SlideTask]:
    """Slide ids, sorted, checked unique, then this shard's share (every n-th from i)."""
    tasks = sorted((SlideTask(slide_id_for(p), Path(p)) for p in slides), key=lambda t: (t.slide_id, str(t.path)))
    seen: dict[str, Path] = {}
    for t in tasks:
        if t.slide_id in seen:
            raise InputError(f"two slides share the id {t.slide_id!r}: {seen[t.slide_id]} and {t.path}")
        seen[t.slide_id] = t.path
    if shard is not None:
        i, n = shard
        tasks = tasks[i::n]
    return tasks


def manifest_path(out_dir: Path, shard: tuple[int, int] | None) -> Path:
    """``manifest.csv``; each shard of a job array writes its own, so they never overwrite each other."""
    if shard is None or shard[1] == 1:
        return Path(out_dir) / "manifest.csv"
    return Path(out_dir) / f"manifest.shard-{shard[0]}-of-{shard[1]}.csv"


def write_manifest(path: Path, results: Sequence[SlideResult]) -> None:
    rows = [asdict(r) | {"seconds": f"{r.seconds:.2f}"} for r in results]
    write_csv_atomic(path, MANIFEST_FIELDS, ([row[k] for k in MANIFEST_FIELDS] for row in rows))


_SHARD_MANIFEST = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.csv")


def _few(items: Sequence[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (" ..." if len(items) > k else "")


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a manifest written by :func:`write_manifest` (all values as text)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
            raise InputError(f"{path}: not a preprocessing manifest (header {','.join(reader.fieldnames or [])})")
        return list(reader)


def merge_manifests(out_dir: str | os.PathLike, slides: Sequence[Path] | None = None) -> Path:
    """Join the shard manifests of a finished job array into ``OUT/manifest.csv`` (atomically); returns its path.

    Rows are sorted by slide id, as an unsharded run writes them. Raises
    ValueError (one line) when there is no shard manifest, when manifests of
    arrays with different shard counts are mixed (one left by an earlier run),
    when a shard's manifest is missing or a slide appears twice, and, if
    ``slides`` is given, when any of its slides has no row (a task that did not
    finish) or a row names a slide not among them.
    """
    out_dir = Path(out_dir)
    by_count: dict[int, dict[int, Path]] = {}
    for p in sorted(out_dir.glob("manifest.shard-*-of-*.csv")):
        if m := _SHARD_MANIFEST.fullmatch(p.name):
            by_count.setdefault(int(m[2]), {})[int(m[1])] = p
    if not by_count:
        raise InputError(f"no shard manifests (manifest.shard-I-of-N.csv) in {out_dir}"
                         " (a run of one shard writes manifest.csv itself)")
    if len(by_count) > 1:
        kinds = ", ".join(f"{len(found)} of n={n}" for n, found in sorted(by_count.items()))
        raise InputError(f"shard manifests of job arrays with different shard counts in {out_dir} ({kinds}):"
                         " remove those of the older run")
    ((n, found),) = by_count.items()
    missing = [manifest_path(out_dir, (i, n)).name for i in range(n) if i not in found]
    if missing or max(found) >= n:
        what = f"missing {_few(missing)}" if missing else f"index {max(found)} out of range"
        raise InputError(f"{len(found)} of {n} shard manifests in {out_dir} ({what}): did every array task run?")
    rows: dict[str, dict[str, str]] = {}
    origin: dict[str, str] = {}
    for i in range(n):
        for row in read_manifest(found[i]):
            sid = row["slide_id"]
            if sid in rows:
                raise InputError(f"slide {sid!r} is in both {origin[sid]} and {found[i].name}")
            rows[sid], origin[sid] = row, found[i].name
    if slides is not None:
        expected = {t.slide_id for t in plan_tasks(slides)}
        lacking, unknown = sorted(expected - rows.keys()), sorted(rows.keys() - expected)
        problems = [f"{len(lacking)} slide(s) with no row ({_few(lacking)}): a task did not finish; resubmit it"
                    " (finished slides are skipped)"] if lacking else []
        if unknown:
            problems.append(f"{len(unknown)} row(s) for slides not given ({_few(unknown)})")
        if problems:
            raise InputError(f"shard manifests in {out_dir} do not match the slides: {'; '.join(problems)}")
    merged = [rows[sid] for sid in sorted(rows)]
    path = out_dir / "manifest.csv"
    return write_csv_atomic(path, MANIFEST_FIELDS, ([row[k] for k in MANIFEST_FIELDS] for row in merged))


def expected_attrs(slide_path: Path, slide_id: str, mpp: float, mpp_source: str, cfg: PreprocessConfig,
                   encoder: Encoder) -> dict[str, object]:
    """The provenance attributes of a feature file made from this slide with this configuration."""
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
        "encoder": encoder.name,
        "weights": encoder.weights,
        # what ran, for the record (not in the provenance check: fp16 on a GPU and fp32 on a CPU are one
        # feature space, and the transform follows from the encoder and the tile size, which are checked)
        "precision": encoder.precision_on(pick_device(cfg.device)),
        "transform": json.dumps(encoder.transform, sort_keys=True),
        "feature_dtype": cfg.feature_dtype,
        "package_version": __version__,
    }


def preprocess_slide(task: SlideTask, cfg: PreprocessConfig, encoder: Encoder) -> SlideResult:
    """Run one slide end to end. Raises :class:`SlideError` (and others) on failure."""
    start = time.perf_counter()
    out = features_path(cfg.out_dir, task.slide_id)
    remove_stale_partials(out.parent, out.name)
    with open_slide(task.path, user_mpp=cfg.mpp_table.get(task.slide_id), default_mpp=cfg.default_mpp,
                    slide_id=task.slide_id) as slide:
        mpp = slide.mpp  # raises a clear SlideError if missing or implausible
        attrs = expected_attrs(task.path, task.slide_id, mpp, str(slide.info.mpp_source), cfg, encoder)
        qc_file = qc_path(cfg.out_dir, task.slide_id)
        reusable = not cfg.overwrite and out.exists() and (qc_file.exists() or not cfg.qc)
        if reusable and stale_reason(out, attrs) is None:
            info = check_feature_file(out)
            if info.n_tiles == 0:  # done before, and still nothing to learn from: say so again
                note = _no_tiles_reason(slide.info.dimensions, float(info.attrs.get("tile_size_level0", 0)))
                return SlideResult(task.slide_id, "empty", 0, time.perf_counter() - start, note, str(task.path))
            return SlideResult(task.slide_id, "skipped", info.n_tiles, time.perf_counter() - start, "",
                               str(task.path))
        mask = compute_tissue_mask(slide, cfg.tissue)
        grid = tile_coordinates(slide, mask, cfg.tiling)
    if cfg.qc:
        save_qc(render_qc(mask.thumbnail, mask.mask, mask.downsample, grid.coords, grid.tile_size_level0), qc_file)
    attrs.update(
        tile_size_level0=float(grid.tile_size_level0),
        read_level=int(grid.read_level),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with FeatureWriter(out, encoder.dim, attrs, dtype=cfg.feature_dtype) as writer:
        batches = extract_features(
            task.path, grid.coords, read_level=grid.read_level, read_size=grid.read_size,
            tile_size=grid.tile_size, encoder=encoder, batch_size=cfg.batch_size,
            num_workers=cfg.num_workers, device=cfg.device, progress=cfg.progress,
        )
        for coords, feats in batches:
            writer.append(coords, feats)
            _check_stop()
        writer.commit()
    if not len(grid.coords):
        note = _no_tiles_reason(slide.info.dimensions, grid.tile_size_level0)
        return SlideResult(task.slide_id, "empty", 0, time.perf_counter() - start, note, str(task.path))
    return SlideResult(task.slide_id, "ok", len(grid.coords), time.perf_counter() - start, "", str(task.path))


def _no_tiles_reason(dims: tuple[int, int], tile_level0: float) -> str:
    if min(dims) < tile_level0:
        return f"no tiles: slide {dims[0]}x{dims[1]} px is smaller than one tile ({tile_level0:.0f} px at level 0)"
    return "no tiles: no tile reaches the minimum tissue fraction (see the QC image)"


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
                                 weights_dir=cfg.weights_dir)
    manifest = manifest_path(cfg.out_dir, shard)
    results: list[SlideResult] = []
    bar = tqdm(tasks, desc="slides", unit="slide", disable=not cfg.progress)
    try:
        for task in bar:
            _check_stop()
            bar.set_postfix_str(task.slide_id)
            start = time.perf_counter()
            try:
                result = preprocess_slide(task, cfg, encoder)
            except (SlideError, FeatureFileError, ValueError, OSError, RuntimeError) as err:
                message = str(err) if isinstance(err, SlideError) else f"{task.path.name}: {type(err).__name__}: {err}"
                message = " ".join(message.split())
                result = SlideResult(task.slide_id, "failed", 0, time.perf_counter() - start, message, str(task.path))
                log(f"FAILED {message}")
            except KeyboardInterrupt:
                elapsed = time.perf_counter() - start
                results.append(SlideResult(task.slide_id, "failed", 0, elapsed, "interrupted before completion",
                                           str(task.path)))
                raise
            results.append(result)
            write_manifest(manifest, results)
    finally:  # also after an interrupt (even one landing between slides), so the record is complete
        write_manifest(manifest, results)
        bar.close()
    return results
