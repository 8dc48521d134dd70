"""Three-site non-IID cohorts for the federated benchmark, dealt from the classic MIL bag tables.

The federated benchmark's figures stand on these splits, so they live here rather
than in ``scripts/bench_federated.py``: ``scripts/bench_privacy.py`` runs on the
very same partitions, and the tests check them without executing a script.

Every bag of a table becomes one HDF5 feature file (instances z-scored per
feature with the mean/std of the *whole* table, all bags of both classes: a
label-free transductive normalisation shared by every training mode; coords a
dummy grid; patient id = bag id), written once under ``work/<dataset>/bags``
and linked into every cohort. The bags are dealt to three sites by a seeded,
deterministic non-IID split:

* ``label`` skew: site positive rates about 0.2 / 0.5 / 0.8 at similar sizes
  (positives dealt 0.2:0.5:0.8, negatives 0.8:0.5:0.2);
* ``size`` skew: sites get about 15 % / 30 % / 55 % of the bags, stratified by label.

Every site keeps at least :data:`MIN_PER_CLASS` bags of each class, so its own
train/val/test split works. The seed picks the partition as well as the weights
and splits, so the spread over seeds includes the partition's. The dataset
``wsiscale`` is random bags sized like whole-slide embeddings, for timing only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preprocessing.h5format import REQUIRED_ATTRS, FeatureWriter
from wsi_fl.mil.data import TableBagDataset
from wsi_fl.mil.fit import Site
from wsi_fl.site.data import discover_cohort

DATASETS = ("musk1", "musk2", "fox", "tiger")
SKEWS = ("label", "size")
LABEL_SKEW_RATES = (0.2, 0.5, 0.8)  # target positive rate of each site
SIZE_SKEW_SHARES = (0.15, 0.30, 0.55)  # share of the bags of each site
WSI_SCALE_DIM = 1024  # feature width of the "wsiscale" timing cohort (a ResNet-50 trunk / UNI-sized embedding)
MIN_PER_CLASS = 2  # bags of each class every site keeps, so its own train/val/test split works


@dataclass(frozen=True)
class Cohort:
    """One dataset/skew/seed: the cohort directory (one ``site_<i>/`` per site) and its sites."""

    dataset: str
    skew: str
    seed: int
    root: Path
    sites: tuple[Site, ...]


def feature_attrs(dataset: str, slide_id: str) -> dict[str, Any]:
    """Provenance of a bag-table feature file: one made-up 'encoder' per table, so tables never mix."""
    attrs: dict[str, Any] = {k: "mil-table" for k in REQUIRED_ATTRS if k not in ("feature_dim", "feature_dtype")}
    attrs.update(slide_id=slide_id, source_file=f"{dataset}.csv", encoder=f"mil-table-{dataset}",
                 weights="zscore-whole-table", mpp=1.0, target_mpp=1.0, tile_size=1, tile_size_level0=1.0,
                 stride=1, read_level=0, min_tissue=0.0)
    return attrs


def write_bag_files(table: Path, dataset: str, out: Path) -> tuple[list[str], np.ndarray]:
    """Every bag of the table as ``out/<slide_id>.h5`` (reused when complete); returns slide ids and targets."""
    ds = TableBagDataset.from_csv(table)
    if len(ds.classes) != 2:
        raise ValueError(f"{table}: the non-IID splits need a binary table, got classes {ds.classes}")
    slide_ids = [f"{dataset}_b{bag}" for bag in ds.groups]
    stamp = {"table": str(table.resolve()), "size": table.stat().st_size, "mtime_ns": table.stat().st_mtime_ns,
             "bags": len(ds)}
    marker = out / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return slide_ids, np.asarray(ds.targets)
    allx = torch.cat(ds.features).numpy().astype(np.float64)
    mean, std = allx.mean(axis=0), allx.std(axis=0)
    std[std == 0] = 1.0
    for slide_id, x in zip(slide_ids, ds.features, strict=True):
        z = ((x.numpy() - mean) / std).astype(np.float32)
        n = len(z)
        coords = np.stack([np.arange(n) % 64, np.arange(n) // 64], axis=1)
        with FeatureWriter(out / f"{slide_id}.h5", z.shape[1], feature_attrs(dataset, slide_id)) as w:
            w.append(coords, z)
            w.commit()
    marker.write_text(json.dumps(stamp))
    return slide_ids, np.asarray(ds.targets)


def write_wsi_scale_bags(out: Path, n_bags: int, n_instances: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n_bags`` random bags sized like whole-slide embeddings (``n_instances`` × 1024, float16), for timing.

    Half are positive: 5 % of their instances are shifted by +1 in the first 64 features (a small "tumour"),
    so the models learn something and the engines' AUCs can be compared. Reused when complete.
    """
    slide_ids = [f"wsiscale_b{i:03d}" for i in range(n_bags)]
    targets = np.arange(n_bags) % 2
    stamp = {"bags": n_bags, "instances": n_instances, "seed": seed, "dim": WSI_SCALE_DIM}
    marker = out / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return slide_ids, targets
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_side = math.ceil(math.sqrt(n_instances))
    coords = np.stack([np.arange(n_instances) % n_side, np.arange(n_instances) // n_side], axis=1)
    for slide_id, target in zip(slide_ids, targets, strict=True):
        x = rng.standard_normal((n_instances, WSI_SCALE_DIM), dtype=np.float32)
        if target:
            x[rng.choice(n_instances, max(n_instances // 20, 1), replace=False), :64] += 1.0
        with FeatureWriter(out / f"{slide_id}.h5", WSI_SCALE_DIM, feature_attrs("wsiscale", slide_id),
                           dtype="float16") as w:
            w.append(coords, x)
            w.commit()
    marker.write_text(json.dumps(stamp))
    return slide_ids, targets


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainder), then topped up to MIN_PER_CLASS."""
    w = np.asarray(shares, dtype=float) / sum(shares)
    raw = w * total
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[k] += 1
    if total < MIN_PER_CLASS * len(shares):
        raise ValueError(f"{total} bags of a class cannot give {len(shares)} sites {MIN_PER_CLASS} each")
    while (short := np.flatnonzero(counts < MIN_PER_CLASS)).size:
        counts[short[0]] += 1
        counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def class_shares(skew: str) -> tuple[list[float], list[float]]:
    """(share of the positives, share of the negatives) each site receives."""
    if skew == "label":
        return list(LABEL_SKEW_RATES), [1 - r for r in LABEL_SKEW_RATES]
    if skew == "size":
        return list(SIZE_SKEW_SHARES), list(SIZE_SKEW_SHARES)
    raise ValueError(f"unknown skew {skew!r}; choose from {', '.join(SKEWS)}")


def partition(targets: np.ndarray, skew: str, seed: int) -> np.ndarray:
    """Site index (0, 1, 2) of every bag: deterministic for (targets, skew, seed)."""
    rng = np.random.default_rng(seed)
    site = np.full(len(targets), -1)
    for cls, shares in zip((1, 0), class_shares(skew), strict=True):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        bounds = np.cumsum([0, *apportion(len(idx), shares)])
        for k in range(len(shares)):
            site[idx[bounds[k]:bounds[k + 1]]] = k
    return site


def build_cohort(work: Path, table: Path | None, dataset: str, skew: str, seed: int,
                 wsi_scale: tuple[int, int] = (0, 0)) -> Cohort:
    """``work/<dataset>/<skew>-seed<k>/site_<i>/{labels.csv, features/}``; features are links to the bag files.

    ``dataset`` "wsiscale" is :func:`write_wsi_scale_bags` with ``wsi_scale`` = (bags, instances per bag)
    (``table`` is then unused).
    """
    bags = work / dataset / "bags"
    if dataset == "wsiscale":
        slide_ids, targets = write_wsi_scale_bags(bags, *wsi_scale)
    else:
        if table is None:
            raise ValueError(f"dataset {dataset!r} needs its bag table")
        slide_ids, targets = write_bag_files(table, dataset, bags)
    site_of = partition(targets, skew, seed)
    root = work / dataset / f"{skew}-seed{seed}"
    for k in range(int(site_of.max()) + 1):
        site_dir = root / f"site_{k + 1}"
        (site_dir / "features").mkdir(parents=True, exist_ok=True)
        rows = ["slide_id,label,patient_id"]
        for i in np.flatnonzero(site_of == k):
            link = site_dir / "features" / f"{slide_ids[i]}.h5"
            if not link.is_symlink():
                link.symlink_to((bags / f"{slide_ids[i]}.h5").resolve())
            rows.append(f"{slide_ids[i]},{targets[i]},{slide_ids[i].split('_b', 1)[1]}")
        (site_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    return Cohort(dataset, skew, seed, root, tuple(discover_cohort(root)))


REALISTIC = "realistic"  # the dataset name of :func:`realistic_cohort`
#: Slides per site of the "realistic" dataset: the preset's size factors (2, 1, 0.4) make sites of 20, 10 and 4.
REALISTIC_SLIDES = 10
REALISTIC_ENCODER = "resnet18_trunc"  # light and random-init (seeded, so every seed sees one feature space)


def realistic_cohort(work: Path, seed: int, slides_per_site: int = REALISTIC_SLIDES, *,
                     progress: bool = False) -> Cohort:
    """The synthetic ``realistic`` preset (:mod:`preprocessing.synth`) at ``seed``, preprocessed as the demo does.

    Unlike the MIL tables this is the whole pipeline, slides → tissue → tiles → features, with the preset's
    inter-hospital differences (sizes 2:1:0.4, prevalence 0.1 → 0.6, scanner blur, JPEG quality, site 3 at
    another native µm/px, artefacts): the seed draws new slides, not a new partition. Cached under
    ``work/realistic/n<slides>-seed<k>`` (a ``.complete.json`` marker, written last, with the preset's values:
    a rerun reuses the cohort only while the preset is unchanged).
    """
    root = work / REALISTIC / f"n{slides_per_site}-seed{seed}"
    from preprocessing.synth import preset

    # The preset's values are in the stamp: a changed preset (another helper's edit, a new version) makes new slides.
    stamp = {"preset": "realistic", "config": repr(preset("realistic")), "seed": seed,
             "slides_per_site": slides_per_site, "encoder": REALISTIC_ENCODER}
    marker = root / ".complete.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        from preprocessing.encoders import create_encoder
        from preprocessing.pipeline import PreprocessConfig, discover_slides, run_preprocess
        from preprocessing.synth import generate_cohort

        summaries = generate_cohort(root, sites=3, slides_per_site=slides_per_site, seed=seed, config="realistic",
                                    progress=progress)
        encoder = create_encoder(REALISTIC_ENCODER, random_init=True)
        for site in summaries:
            cfg = PreprocessConfig(out_dir=root / site.site, encoder=REALISTIC_ENCODER, random_init=True,
                                   qc=False, progress=progress)
            results = run_preprocess(discover_slides([site.slides_dir]), cfg, encoder=encoder)
            failed = [r.slide_id for r in results if r.status == "failed"]
            if failed:
                raise RuntimeError(f"{root / site.site}: preprocessing failed for {', '.join(failed)}")
        marker.write_text(json.dumps(stamp))
    return Cohort(REALISTIC, "as-is", seed, root.resolve(), tuple(discover_cohort(root)))


def synthetic_cohort(directory: Path, seed: int) -> Cohort:
    """An existing cohort directory used as is (e.g. ``wsi-fl demo``'s, whose sites differ by stain)."""
    return Cohort("synthetic", "as-is", seed, directory.resolve(), tuple(discover_cohort(directory)))


def describe(cohort: Cohort) -> str:
    """Per site: bags and positive rate, as printed beside every run and stored with its result."""
    parts = []
    for site in cohort.sites:
        labels = [line.split(",")[1] for line in site.labels.read_text().splitlines()[1:] if line.strip()]
        pos = sum(label == max(labels) for label in labels)
        parts.append(f"{site.name} {len(labels)} bags {pos / len(labels):.0%} pos")
    return "; ".join(parts)
