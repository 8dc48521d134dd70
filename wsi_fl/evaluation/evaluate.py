"""Evaluate a trained checkpoint on a feature directory: metrics, report files, attention maps.

The checkpoint's feature provenance (encoder, weights, resolution, tile size)
is checked against the feature files before anything runs, so a model is never
silently applied to another feature space.

Written to ``out_dir``: ``predictions.csv``, ``metrics.json``, ``roc.png``,
``calibration.png`` and, when slides are given, ``heatmaps/<slide>.png`` with
``heatmaps/<slide>.geojson`` (tile-level attention that QuPath imports).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from models.checkpoint import load_checkpoint
from preprocessing.atomic import write_text_atomic
from preprocessing.h5format import COORDS
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.heldout import select_slides
from wsi_fl.evaluation.metrics import classification_metrics
from wsi_fl.evaluation.options import EvalOptions  # stdlib-only, for the CLI; importable from here too
from wsi_fl.mil.config import SplitRecord
from wsi_fl.mil.data import BagRecord, FeatureBagDataset, read_labels
from wsi_fl.mil.splits import drop_empty_slides
from wsi_fl.mil.training import Predictions, predict


def write_predictions(path: Path, preds: Predictions, records: Sequence[BagRecord], classes: Sequence[str]) -> None:
    by_id = {r.slide_id: r for r in records}
    rows = ["slide_id,patient_id,label,predicted," + ",".join(f"prob_{c}" for c in classes)]
    for slide_id, target, prob in zip(preds.slide_ids, preds.targets, preds.probs, strict=True):
        rec = by_id[slide_id]
        probs = ",".join(f"{p:.6f}" for p in prob)
        rows.append(f"{slide_id},{rec.patient_id},{classes[target]},{classes[int(prob.argmax())]},{probs}")
    write_text_atomic(path, "\n".join(rows) + "\n")


def write_report(out_dir: Path, preds: Predictions, records: Sequence[BagRecord], classes: Sequence[str],
                 opts: EvalOptions = EvalOptions(), title: str = "", extra: Mapping | None = None) -> dict:
    """predictions.csv, metrics.json (the metrics and ``extra``), roc.png, calibration.png; returns the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(preds.targets, preds.probs, classes=classes, threshold=opts.threshold,
                                      n_bootstrap=opts.n_bootstrap, seed=opts.seed)
    metrics.update(extra or {})
    write_predictions(out_dir / "predictions.csv", preds, records, classes)
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    from wsi_fl.evaluation.plots import plot_calibration, plot_roc  # matplotlib: imported only when a report is drawn

    plot_roc(preds.targets, preds.probs, out_dir / "roc.png", classes=classes, title=title)
    plot_calibration(preds.targets, preds.probs, out_dir / "calibration.png", title=title)
    return metrics


def find_slide(slide_dirs: Sequence[Path], file_name: str) -> Path | None:
    """The slide file called ``file_name`` under any of ``slide_dirs`` (searched recursively)."""
    for d in slide_dirs:
        direct = Path(d) / file_name
        if direct.is_file():
            return direct
        found = next(Path(d).rglob(file_name), None)
        if found is not None:
            return found
    return None


def heatmap_targets(preds: Predictions, opts: EvalOptions) -> list[int]:
    """Indices of the slides to draw: the chosen ids, then the top-k by P(last class)."""
    index = {s: i for i, s in enumerate(preds.slide_ids)}
    unknown = [s for s in opts.heatmap_slides if s not in index]
    if unknown:
        raise ConfigError(f"--heatmap-slides: not in the evaluation set: {', '.join(unknown)}")
    chosen = [index[s] for s in opts.heatmap_slides]
    if opts.heatmap_top_k:
        order = np.argsort(-preds.probs[:, -1], kind="stable")
        chosen += [int(i) for i in order[: opts.heatmap_top_k] if int(i) not in chosen]
    return chosen


def write_heatmaps(out_dir: Path, preds: Predictions, feature_paths: Mapping[str, Path], slide_dirs: Sequence[Path],
                   opts: EvalOptions, log=print) -> list[Path]:
    """Attention PNG (over the slide thumbnail) and QuPath GeoJSON for each slide chosen by ``opts``."""
    from wsi_fl.evaluation.heatmap import (  # OpenSlide, matplotlib: on use
        attention_geojson,
        attention_heatmap,
        write_geojson,
    )

    written: list[Path] = []
    for i in heatmap_targets(preds, opts):
        slide_id, attention = preds.slide_ids[i], preds.attention[i]
        if attention is None:
            log(f"no heatmap for {slide_id}: this model has no attention scores")
            continue
        with h5py.File(feature_paths[slide_id], "r") as f:
            coords = f[COORDS][()]
            source, tile0 = str(f.attrs["source_file"]), float(f.attrs["tile_size_level0"])
        heat_dir = out_dir / "heatmaps"
        heat_dir.mkdir(parents=True, exist_ok=True)
        geo = attention_geojson(coords, attention, tile0, slide_id=slide_id, top_k=opts.top_tiles)
        written.append(write_geojson(geo, heat_dir / f"{slide_id}.geojson"))
        slide_path = find_slide(slide_dirs, source)
        if slide_path is None:
            log(f"no heatmap image for {slide_id}: {source} not found under {', '.join(map(str, slide_dirs))}")
            continue
        written.append(attention_heatmap(slide_path, coords, attention, tile0, heat_dir / f"{slide_id}.png"))
    return written


def evaluate_checkpoint(checkpoint: str | Path, features_dir: str | Path, labels: str | Path, out_dir: str | Path,
                        *, label_col: str | None = None, split: str | None = None, slide_dirs: Sequence[Path] = (),
                        opts: EvalOptions = EvalOptions(), site_col: str | None = None, log=print) -> dict:
    """Evaluate the slides :func:`~wsi_fl.evaluation.heldout.select_slides` picks for ``split`` (None: the
    held-out test split of the model's training); returns the metrics dict (also written to
    ``out_dir/metrics.json``, with ``evaluated``: which split, how many slides scored and left out).

    ``label_col``: the outcome column; None takes the one the model was trained on. ``site_col``: the column
    naming each slide's site (None: ``site`` if the labels have one): every site is then also scored on its own
    (``per_site`` in metrics.json, ``per_site.csv``) and its split redrawn on its own (:mod:`.persite`).
    """
    out_dir = Path(out_dir)
    model, ckpt = load_checkpoint(checkpoint)
    if ckpt.meta.get("task") == "survival":  # time-to-event model: its own report (C-indices, Kaplan-Meier)
        from wsi_fl.evaluation.survival_report import evaluate_survival_checkpoint

        return evaluate_survival_checkpoint(checkpoint, model, ckpt, features_dir, labels, out_dir, split=split,
                                            opts=opts, log=log)
    record = SplitRecord.from_meta(ckpt.meta)
    trained_col = record.label_col if record else ckpt.meta.get("label_col", "label")
    label_col = label_col or trained_col
    if label_col != trained_col and split != "all":
        raise ConfigError(f"the model was trained on column {trained_col!r} and its split drawn on it: "
                          f"--label-col {label_col} needs --split all")
    table = read_labels(labels, label_col=label_col, classes=ckpt.classes)
    features_dir = Path(features_dir)
    given = drop_empty_slides(table.records, features_dir, log)
    # every given slide's feature file is checked first (existence, feature space): a refusal names the real cause
    FeatureBagDataset(given, features_dir, expected_provenance=ckpt.provenance)
    from wsi_fl.evaluation.persite import per_site_metrics, read_sites, select_per_site, write_per_site_csv

    site_of = read_sites(labels, site_col)
    chosen = (select_per_site(ckpt.meta, given, split, site_of, str(checkpoint)) if site_of
              else select_slides(ckpt.meta, given, split, str(checkpoint)))
    log(chosen.line())
    for note in chosen.notes:
        log(f"note: {note}")
    dataset = FeatureBagDataset(chosen.records, features_dir, expected_provenance=ckpt.provenance)
    draw = bool(opts.heatmap_slides or opts.heatmap_top_k)
    preds = predict(model, dataset, keep_attention=draw)
    extra: dict = {"evaluated": chosen.summary()}
    if site_of:
        extra["per_site"] = per_site_metrics(preds.targets, preds.probs, preds.slide_ids, site_of, ckpt.classes, opts)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_per_site_csv(out_dir / "per_site.csv", extra["per_site"])
    metrics = write_report(out_dir, preds, chosen.records, ckpt.classes, opts, title=Path(checkpoint).stem,
                           extra=extra)
    if draw:
        paths = {r.slide_id: p for r, p in zip(dataset.records, dataset.paths, strict=True)}
        write_heatmaps(out_dir, preds, paths, slide_dirs, opts, log=log)
    return metrics
