"""Where a ClientApp finds its hospital's data, and that data split the way the federation asked.

A SuperNode is started with its site's paths in its node config::

    flower-supernode ... --node-config "data-path='/data/features' labels='/data/labels.csv'"

(``site-name`` optional). In the simulation engine every virtual node has a
``partition-id`` instead, mapped to the k-th site of a cohort directory: one
subdirectory per site holding ``labels.csv`` and ``features/`` (the layout
``wsi-fl demo`` writes). Paths never leave the site.

The split is the one :func:`wsi_fl.mil.fit.fit` makes for the same site, seed and
fractions, so federated, pooled and local models are tested on the same slides.
Loaded sites are cached per process (bags stay in memory across rounds).

A survival site (``task = "survival"``) has ``slide_id,<time-col>,<event-col>[,patient_id][,split]`` labels:
its records carry the time and event (:func:`wsi_fl.mil.fit.load_site_survival_records`), their label is
the event, so splits are stratified by event status, and every bag is of stratum 0 (Cox risk sets never leave
the site's batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from wsi_fl.errors import ConfigError
from wsi_fl.mil.fit import Site, assign_splits, build_dataset, load_site_records, load_site_survival_records


class SiteConfigError(ConfigError):
    """A node whose data location is missing or wrong (one line, names the key or path)."""


@dataclass(frozen=True)
class SiteData:
    site: Site
    classes: tuple[str, ...]
    feature_dim: int
    provenance: dict[str, Any]
    train: Dataset
    val: Dataset | None
    test: Dataset | None


def discover_cohort(cohort: str | Path) -> list[Site]:
    """Sites of a cohort directory: every subdirectory with a ``labels.csv`` and a ``features/`` directory."""
    root = Path(cohort)
    if not root.is_dir():
        raise SiteConfigError(f"{root}: cohort directory does not exist")
    sites = [Site(d.name, d / "features", d / "labels.csv") for d in sorted(root.iterdir())
             if (d / "labels.csv").is_file() and (d / "features").is_dir()]
    if not sites:
        raise SiteConfigError(f"{root}: no site directories (each needs labels.csv and features/)")
    return sites


def site_from_node_config(node_config: Mapping[str, Any], cohort: str | Path | None = None) -> Site:
    """The site a node serves: ``data-path``/``labels`` from its node config, else its partition of ``cohort``."""
    if "data-path" in node_config or "labels" in node_config:
        missing = [k for k in ("data-path", "labels") if k not in node_config]
        if missing:
            raise SiteConfigError(f"node config lacks {missing[0]!r} (set data-path and labels together)")
        features, labels = Path(str(node_config["data-path"])), Path(str(node_config["labels"]))
        for path, what in ((features, "data-path"), (labels, "labels")):
            if not path.exists():
                raise SiteConfigError(f"{path}: {what} does not exist")
        return Site(str(node_config.get("site-name", features.parent.name or "site")), features, labels)
    cohort = node_config.get("cohort", cohort)
    if cohort is None or "partition-id" not in node_config:
        raise SiteConfigError("node config needs data-path and labels (or, in simulation, partition-id and a cohort)")
    sites = discover_cohort(str(cohort))
    pid = int(node_config["partition-id"])
    if not 0 <= pid < len(sites):
        raise SiteConfigError(f"partition-id {pid} out of range: cohort {cohort} has {len(sites)} sites")
    return sites[pid]


@lru_cache(maxsize=8)
def load_site(site: Site, *, classes: tuple[str, ...] | None, label_col: str, val_frac: float, test_frac: float,
              seed: int, max_instances: int | None, survival: tuple[str, str] | None = None) -> SiteData:
    """The site's bag datasets per split (``classes``: the federation's class mapping, else the site's own).

    ``survival``: ``(time_col, event_col)`` for a survival site; its ``classes`` are then the model's outputs
    (:meth:`wsi_fl.federation.config.FedConfig.outputs`, as the server sends them) and its bags carry times.
    """
    if survival is not None:
        pairs, site_classes = load_site_survival_records([site], *survival), list(classes or ())
    else:
        pairs, site_classes = load_site_records([site], label_col, classes)
    splits = assign_splits([r for _, r in pairs], val_frac, test_frac, seed)
    empty = np.zeros(0, dtype=int)
    train = build_dataset(pairs, splits["train"], max_instances=max_instances, seed=seed)
    if train is None:
        raise SiteConfigError(f"site {site.name}: no training slides after splitting ({site.labels})")
    return SiteData(
        site=site, classes=tuple(site_classes), feature_dim=int(train.feature_dim),
        provenance=dict(train.provenance), train=train,
        val=build_dataset(pairs, splits.get("val", empty), max_instances=None, seed=seed),
        test=build_dataset(pairs, splits.get("test", empty), max_instances=None, seed=seed),
    )
