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
from wsi_fl.mil.training import TrainConfig, concat_datasets, predict, train_model

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
    """One bag dataset over the chosen records, spanning sites (one FeatureBagDataset per site)."""
    if len(indices) == 0:
        return None
    per_site: dict[Site, list[BagRecord]] = {}
    for i in indices:
        site, rec = pairs[int(i)]
        per_site.setdefault(site, []).append(rec)
    parts = [FeatureBagDataset(recs, site.features_dir, max_instances=max_instances, seed=seed)
             for site, recs in per_site.items()]
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
        progress: bool = True) -> FitResult:
    """Train on the sites' slides, save the checkpoint, and report on the test split (see the module doc).

    ``eval_opts`` with ``heatmap_top_k``/``heatmap_slides`` also draws attention
    maps of test slides (images need the slide files under ``slide_dirs``).
    """
    if model.model not in list_models():
        raise ConfigError(f"unknown model {model.model!r}; registered: {', '.join(list_models())}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    config = replace(model, in_dim=train_ds.feature_dim, n_classes=len(classes))
    torch.manual_seed(train.seed)
    result = train_model(create_model(config), train_ds, val_ds, train, progress=progress)

    split_of = {int(i): name for name, idx in splits.items() for i in idx}
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
