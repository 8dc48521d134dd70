"""Local (one site) or pooled (several sites together) training from feature directories and labels files.

Pooled training is the centralised upper bound a federation is compared with;
local training is what one hospital could do alone. Both use patient-level
splits made site by site (so local, pooled and federated models are tested on
the same slides): a labels file's ``split`` column if every row has one,
otherwise a stratified, patient-disjoint train/val/test split of that site. Patient ids are prefixed
with the site name, because two hospitals' "P001" are different people.

Written to ``out_dir``: ``model.pt`` (weights, model config, classes and the
features' provenance), ``splits.csv``, ``history.csv``, and ``test/`` (the
evaluation report) when there is a test split.

Survival (``TrainConfig.task == "survival"``): labels ``slide_id,time,event[,patient_id][,split]``, splits
stratified by event status, each site its own Cox stratum in pooled training (a site's baseline hazard is its
own), and the checkpoint keeps the training times, events and risks its later evaluation needs
(:func:`wsi_fl.evaluation.survival_report.survival_meta`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models import MILConfig, create_model, list_models
from models.checkpoint import check_provenance, save_checkpoint
from preprocessing.atomic import write_csv_atomic
from wsi_fl import __version__
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.evaluate import EvalOptions, write_heatmaps, write_report
from wsi_fl.mil.config import SplitConfig, SplitRecord
from wsi_fl.mil.data import BagRecord, FeatureBagDataset, read_labels, sort_classes
from wsi_fl.mil.splits import assign_splits, drop_empty_slides, labels_digest
from wsi_fl.mil.survival_labels import read_survival_records
from wsi_fl.mil.training import TrainConfig, concat_datasets, predict, predict_risk, survival_outputs, train_model

_SPLIT = SplitConfig()  # the defaults of wsi-fl train's --label-col, --val-frac and --test-frac


@dataclass(frozen=True)
class Site:
    name: str
    features_dir: Path
    labels: Path


@dataclass(frozen=True)
class FitResult:
    checkpoint: Path
    best_epoch: int
    split_sizes: dict[str, int]
    test_metrics: dict | None


def load_site_records(sites: Sequence[Site], label_col: str, classes: Sequence[str] | None = None,
                      ) -> tuple[list[tuple[Site, BagRecord]], list[str]]:
    """All sites' records with one shared class mapping; patient ids made site-unique.

    ``classes`` fixes the mapping (a federation's, agreed by the server); by default it is the union of the
    sites' labels in :func:`~wsi_fl.mil.data.sort_classes` order. Slides without tiles are left out
    (:func:`drop_empty_slides`).
    """
    if classes is None:
        tables = [read_labels(s.labels, label_col=label_col) for s in sites]
        classes = sort_classes(sorted({c for t in tables for c in t.classes}))
    classes = list(classes)
    records = []
    for site in sites:
        table = read_labels(site.labels, label_col=label_col, classes=classes)
        for rec in drop_empty_slides(table.records, site.features_dir):
            records.append((site, replace(rec, patient_id=f"{site.name}:{rec.patient_id}")))
    return records, classes


def load_site_survival_records(sites: Sequence[Site], time_col: str, event_col: str
                               ) -> list[tuple[Site, BagRecord]]:
    """All sites' survival records (:func:`read_survival_records`), patient ids made site-unique, empty slides
    left out; a bad time or event is a one-line error naming the labels file and row."""
    records = []
    for site in sites:
        recs = read_survival_records(site.labels, time_col=time_col, event_col=event_col)
        for rec in drop_empty_slides(recs, site.features_dir):
            records.append((site, replace(rec, patient_id=f"{site.name}:{rec.patient_id}")))
    return records


def site_digests(pairs: Sequence[tuple[Site, BagRecord]]) -> tuple[dict, ...]:
    """Each site's name, slide count and :func:`labels_digest` (of its own patient ids, as its labels have them)."""
    by_site: dict[Site, list[BagRecord]] = {}
    for site, rec in pairs:
        by_site.setdefault(site, []).append(replace(rec, patient_id=rec.patient_id[len(site.name) + 1:]))
    return tuple({"name": s.name, "n_slides": len(recs), "labels_digest": labels_digest(recs)}
                 for s, recs in by_site.items())


def assign_site_splits(pairs: Sequence[tuple[Site, BagRecord]], val_frac: float, test_frac: float,
                       seed: int) -> dict[str, np.ndarray]:
    """Split every site on its own and concatenate: the held-out slides are then the same whether a model is
    trained locally, pooled or federated (a federation's sites can only split locally), and every site keeps
    its share of each split."""
    by_site: dict[str, list[int]] = {}
    for i, (site, _) in enumerate(pairs):
        by_site.setdefault(site.name, []).append(i)
    parts: dict[str, list[np.ndarray]] = {}
    for idx in by_site.values():
        idx_arr = np.asarray(idx)
        for name, sub in assign_splits([pairs[i][1] for i in idx], val_frac, test_frac, seed).items():
            parts.setdefault(name, []).append(idx_arr[sub])
    return {name: np.sort(np.concatenate(v)) for name, v in parts.items()}


def build_dataset(pairs: Sequence[tuple[Site, BagRecord]], indices: np.ndarray, *, max_instances: int | None,
                  seed: int) -> FeatureBagDataset | torch.utils.data.Dataset | None:
    """One bag dataset over the chosen records, spanning sites (one FeatureBagDataset per site, its stratum the
    site's index in ``pairs``, so that survival risk sets stay within a site)."""
    if len(indices) == 0:
        return None
    stratum = {site: k for k, site in enumerate(dict.fromkeys(site for site, _ in pairs))}
    per_site: dict[Site, list[BagRecord]] = {}
    for i in indices:
        site, rec = pairs[int(i)]
        per_site.setdefault(site, []).append(rec)
    parts = [FeatureBagDataset(recs, site.features_dir, max_instances=max_instances, seed=seed,
                               stratum=stratum[site]) for site, recs in per_site.items()]
    for site, part in list(zip(per_site, parts, strict=True))[1:]:
        check_provenance(parts[0].provenance, part.provenance, f"site {site.name}")
    if len(parts) == 1:
        return parts[0]
    pooled = concat_datasets(parts)
    pooled.provenance = parts[0].provenance  # type: ignore[attr-defined]
    pooled.feature_dim = parts[0].feature_dim  # type: ignore[attr-defined]
    return pooled


def fit(sites: Sequence[Site], out_dir: str | Path, *, model: MILConfig = MILConfig(),
        train: TrainConfig = TrainConfig(), label_col: str = _SPLIT.label_col, val_frac: float = _SPLIT.val_frac,
        test_frac: float = _SPLIT.test_frac, eval_opts: EvalOptions = EvalOptions(), slide_dirs: Sequence[Path] = (),
        progress: bool = True, time_col: str = _SPLIT.time_col, event_col: str = _SPLIT.event_col) -> FitResult:
    """Train on the sites' slides, save the checkpoint, and report on the test split (see the module doc).

    ``eval_opts`` with ``heatmap_top_k``/``heatmap_slides`` also draws attention
    maps of test slides (images need the slide files under ``slide_dirs``). ``time_col``/``event_col``: the
    survival labels' columns (``train.task == "survival"``; ``label_col`` is then unused).
    """
    if model.model not in list_models():
        raise ConfigError(f"unknown model {model.model!r}; registered: {', '.join(list_models())}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    survival = train.task == "survival"
    if survival:
        pairs, classes, label_col = load_site_survival_records(sites, time_col, event_col), ["0", "1"], event_col
    else:
        pairs, classes = load_site_records(sites, label_col)
    records = [rec for _, rec in pairs]
    splits = assign_site_splits(pairs, val_frac, test_frac, train.seed)
    train_ds = build_dataset(pairs, splits["train"], max_instances=train.max_instances, seed=train.seed)
    if train_ds is None:
        raise ConfigError("no training slides after splitting")
    val_ds = build_dataset(pairs, splits.get("val", np.zeros(0, int)), max_instances=None, seed=train.seed)
    test_ds = build_dataset(pairs, splits.get("test", np.zeros(0, int)), max_instances=None, seed=train.seed)
    for ds in (val_ds, test_ds):
        if ds is not None:
            check_provenance(train_ds.provenance, ds.provenance, "validation/test slides")
    if survival:  # the head's outputs: a log-risk (Cox) or one hazard per time bin; "classes" name them
        n_out, _ = survival_outputs(train_ds, train)
        classes = ["0", "log_risk"] if train.survival_loss == "cox" else [f"bin{k}" for k in range(n_out)]
    config = replace(model, in_dim=train_ds.feature_dim, n_classes=len(classes))
    torch.manual_seed(train.seed)
    result = train_model(create_model(config), train_ds, val_ds, train, progress=progress)

    split_of = {int(i): name for name, idx in splits.items() for i in idx}
    if survival:
        write_csv_atomic(out_dir / "splits.csv", ("site", "slide_id", "patient_id", "time", "event", "split"),
                         [(s.name, r.slide_id, r.patient_id, f"{r.time:g}", int(bool(r.event)), split_of[i])
                          for i, (s, r) in enumerate(pairs)])
    else:
        write_csv_atomic(out_dir / "splits.csv", ("site", "slide_id", "patient_id", "label", "split"),
                         [(s.name, r.slide_id, r.patient_id, r.label, split_of[i]) for i, (s, r) in enumerate(pairs)])
    keys = sorted({k for h in result.history for k in h})
    write_csv_atomic(out_dir / "history.csv", keys, [[h.get(k, "") for k in keys] for h in result.history])
    meta = {
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sites": [s.name for s in sites],
        "mode": "pooled" if len(sites) > 1 else "local",
        "train_config": train.to_dict(),
        "best_epoch": result.best_epoch,
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "label_col": label_col,
        "splits": SplitRecord(train.seed, val_frac, test_frac, label_col, sites=site_digests(pairs)).to_meta(),
    }
    if survival:
        return _finish_survival(out_dir, pairs, splits, train, result, meta, classes, train_ds.provenance,
                                test_ds, eval_opts, time_col, event_col)
    ckpt = save_checkpoint(out_dir / "model.pt", result.model, classes, dict(train_ds.provenance), meta)
    test_metrics = None
    if test_ds is not None:
        draw = bool(eval_opts.heatmap_top_k or eval_opts.heatmap_slides)
        preds = predict(result.model, test_ds, keep_attention=draw)
        test_records = [records[int(i)] for i in splits["test"]]
        test_metrics = write_report(out_dir / "test", preds, test_records, classes, eval_opts, title="test")
        if draw:
            test_pairs = [pairs[int(i)] for i in splits["test"]]
            paths = {r.slide_id: s.features_dir / f"{r.slide_id}.h5" for s, r in test_pairs}
            write_heatmaps(out_dir / "test", preds, paths, slide_dirs, eval_opts)
    return FitResult(ckpt, result.best_epoch, meta["split_sizes"], test_metrics)


def _finish_survival(out_dir: Path, pairs: Sequence[tuple[Site, BagRecord]], splits: dict[str, np.ndarray],
                     train: TrainConfig, result, meta: dict, classes: list[str], provenance, test_ds,
                     eval_opts: EvalOptions, time_col: str, event_col: str) -> FitResult:
    """Save a survival checkpoint with its training reference, and report on the test split."""
    from wsi_fl.evaluation.survival_report import survival_meta, write_survival_report

    # Whole training bags (no subsampling) give the reference risks: the baseline hazard and median threshold.
    train_full = build_dataset(pairs, splits["train"], max_instances=None, seed=train.seed)
    train_preds = predict_risk(result.model, train_full, train.survival_loss)
    meta = {**meta, "task": "survival",
            "survival": survival_meta(train_preds, train.survival_loss, result.bin_edges, time_col, event_col)}
    ckpt = save_checkpoint(out_dir / "model.pt", result.model, classes, dict(provenance), meta)
    test_metrics = None
    if test_ds is not None:
        preds = predict_risk(result.model, test_ds, train.survival_loss)
        test_records = [pairs[int(i)][1] for i in splits["test"]]
        test_metrics = write_survival_report(out_dir / "test", preds, test_records, meta["survival"], eval_opts,
                                             title="test")
    return FitResult(ckpt, result.best_epoch, meta["split_sizes"], test_metrics)
