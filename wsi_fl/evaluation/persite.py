"""Per-site results of ``wsi-fl evaluate``: one AUC with its interval for every hospital of a multi-site labels file.

Why: a pooled AUC over several hospitals can hide one where the model fails (another scanner, another stain,
another case mix), and a federated model is meant to serve every member. When the labels file has a site column
(``site`` by default, ``--site-col`` to name another), every site's slides are scored on their own too: metrics
with bootstrap CIs in ``metrics.json`` (``per_site``), ``per_site.csv`` and one printed line per site.

The held-out split is then also redrawn site by site, as training drew it (every site split on its own,
:func:`wsi_fl.mil.fit.assign_site_splits`; a federated site splits only its own slides): redrawn over all sites'
slides at once it would not be the split the model was trained with.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.atomic import write_csv_atomic
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.heldout import Selection, select_slides
from wsi_fl.evaluation.metrics import classification_metrics
from wsi_fl.evaluation.options import EvalOptions
from wsi_fl.mil.data import BagRecord

DEFAULT_SITE_COL = "site"
KEYS = ("n", "n_positive", "auc", "auc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "note")
CSV_HEADER = ("site", "n_slides", "n_positive", "auc", "ci_low", "ci_high", "accuracy", "balanced_accuracy")


def read_sites(labels: str | Path, site_col: str | None) -> dict[str, str] | None:
    """slide id -> site from the labels' ``site_col``; ``None`` when there is none to use.

    ``site_col`` None: the :data:`DEFAULT_SITE_COL` column if the labels have one. A column named explicitly must
    exist, and every row must name its site.
    """
    path = Path(labels)
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    col = site_col or DEFAULT_SITE_COL
    if col not in header:
        if site_col is None:
            return None
        raise ConfigError(f"{path}: no column {col!r} naming each slide's site (header: {','.join(header)})")
    sites: dict[str, str] = {}
    for row in reader:
        slide_id, site = (row.get("slide_id") or "").strip(), (row.get(col) or "").strip()
        if not slide_id:
            continue  # blank line (read_labels reports real problems)
        if not site:
            raise ConfigError(f"{path}:{reader.line_num}: slide {slide_id}: empty {col}")
        sites[slide_id] = site
    return sites


def select_per_site(meta: Mapping[str, Any], records: Sequence[BagRecord], split: str | None,
                    site_of: Mapping[str, str], checkpoint: str) -> Selection:
    """:func:`select_slides` on every site's records on its own (see the module doc), merged in labels order."""
    groups: dict[str, list[BagRecord]] = {}
    for rec in records:
        groups.setdefault(site_of[rec.slide_id], []).append(rec)
    parts = {site: select_slides(meta, recs, split, f"{checkpoint} (site {site})") for site, recs in groups.items()}
    chosen = {r.slide_id for part in parts.values() for r in part.records}
    first = next(iter(parts.values()))
    notes = [f"site {site}: {note}" for site, part in parts.items() for note in part.notes]
    how = first.how if not first.held_out else f"{first.how}, site by site ({len(parts)} sites)"
    return Selection(first.split, [r for r in records if r.slide_id in chosen], len(records), how, notes)


def per_site_metrics(targets: np.ndarray, probs: np.ndarray, slide_ids: Sequence[str], site_of: Mapping[str, str],
                     classes: Sequence[str], opts: EvalOptions) -> dict[str, dict[str, Any]]:
    """site -> its slides' metrics (:data:`KEYS` of :func:`classification_metrics`), sites in first-seen order."""
    sites = np.array([site_of[s] for s in slide_ids])
    out = {}
    for site in dict.fromkeys(sites.tolist()):
        mask = sites == site
        m = classification_metrics(targets[mask], probs[mask], classes=classes, threshold=opts.threshold,
                                   n_bootstrap=opts.n_bootstrap, seed=opts.seed)
        out[site] = {k: m[k] for k in KEYS if k in m}
    return out


def write_per_site_csv(path: Path, per_site: Mapping[str, Mapping[str, Any]]) -> None:
    def num(x: Any) -> str:
        return "" if x is None else f"{x:.4f}"

    rows = []
    for site, m in per_site.items():
        ci = m.get("auc_ci95") or (None, None)
        rows.append((site, m["n"], m.get("n_positive", ""), num(m.get("auc")), num(ci[0]), num(ci[1]),
                     num(m.get("accuracy")), num(m.get("balanced_accuracy"))))
    write_csv_atomic(path, CSV_HEADER, rows)


def format_per_site(per_site: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per site: AUC (95 % CI), slides and positives."""
    lines = []
    for site, m in per_site.items():
        ci = m.get("auc_ci95")
        auc = "AUC undefined (one class)" if m.get("auc") is None else f"AUC {m['auc']:.3f}"
        interval = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
        pos = f", {m['n_positive']} positive" if "n_positive" in m else ""
        lines.append(f"site {site}: {auc}{interval}, {m['n']} slides{pos}")
    return "\n".join(lines)
