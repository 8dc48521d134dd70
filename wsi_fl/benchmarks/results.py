"""The federated benchmark's results file, its table and the statistics under it.

Why a file of JSON lines, appended run by run: the full benchmark takes hours on
two cores, so a killed run must lose at most its own result, and ``--resume``
must find what is done. The table is always built from the file, never from the
runs in memory, so one file can gather runs made at different times (new seeds,
another server step, another FedProx mu) and results stored by earlier versions
keep loading: a row's ``protocol`` fingerprint and ``model`` name are its key,
and the names (``fedprox``, ``fedprox mu M``, ``fedavg step S``, ``local:<site>``)
are a stored format, not a display choice.

Statistics: mean ± sample std (ddof 1) over seeds per cell; the goal lines compare
the better of FedAvg/FedProx with pooled (margin :data:`POOLED_MARGIN`, with a
paired Student-t interval, since both models of a seed share partition, splits
and test slides) and with the best local model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wsi_fl.benchmarks.federated import Protocol

GOAL_STRATEGIES = ("fedavg", "fedprox")
POOLED_MARGIN = 0.02


class Results:
    """Per-run results as JSON lines, appended and flushed one by one (a killed run loses at most its own)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue

    @staticmethod
    def key(row: dict[str, Any]) -> tuple:
        return row.get("protocol"), row.get("dataset"), row.get("skew"), row.get("seed"), row.get("model")

    def has(self, **key: Any) -> bool:
        wanted = self.key(key)
        return any(self.key(r) == wanted for r in self.rows if r.get("kind") == "run")

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)


def per_seed(rows: Iterable[dict[str, Any]], dataset: str, skew: str) -> dict[str, dict[int, float]]:
    """model column -> seed -> AUC for one table row; 'best local' is the max over all sites' local models.

    Each site's local model is a column too (``local:<site>``), for :func:`goal_check`'s best site.
    """
    cols: dict[str, dict[int, float]] = {}
    local: dict[int, list[float]] = {}
    for r in rows:
        if r.get("kind") != "run" or r["dataset"] != dataset or r["skew"] != skew:
            continue
        if r["model"].startswith("local:"):
            local.setdefault(r["seed"], []).append(r["auc"])
        cols.setdefault(r["model"], {})[r["seed"]] = r["auc"]
    n_sites = max((len(v) for v in local.values()), default=0)
    cols["best local"] = {seed: max(v) for seed, v in local.items() if len(v) == n_sites}
    return cols


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for one value) of the non-NaN values; NaNs when there are none."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def format_cell(values: Sequence[float], n_seeds: int) -> str:
    """``mean ± std``, with ``(k)`` when only k of the ``n_seeds`` seeds are done."""
    if not values:
        return "-"
    m, s = mean_std(values)
    partial = "" if len(values) == n_seeds else f" ({len(values)})"
    return f"{m:.3f}{partial}" if len(values) == 1 else f"{m:.3f} ± {s:.3f}{partial}"


def goal_check(cols: dict[str, dict[int, float]], proto: Protocol) -> str:
    """The goal line of one table row: better of FedAvg/FedProx vs pooled - margin, best local and best site."""
    fed = {name: mean_std(list(cols[name].values()))[0] for name in map(proto.fed_name, GOAL_STRATEGIES)
           if cols.get(name)}
    if not fed or not cols.get("pooled") or not cols.get("best local"):
        return "incomplete"
    best = max(fed, key=lambda s: fed[s])
    pooled = mean_std(list(cols["pooled"].values()))[0]
    local = mean_std(list(cols["best local"].values()))[0]
    site = max(mean_std(list(v.values()))[0] for k, v in cols.items() if k.startswith("local:"))
    ok_pooled = "yes" if fed[best] >= pooled - POOLED_MARGIN else "NO"
    ok_local = "yes" if fed[best] >= local else "NO"
    ok_site = "yes" if fed[best] >= site else "NO"
    lo, hi = paired_interval(cols[best], cols["pooled"])
    return (f"{best} {fed[best]:.3f} >= pooled {pooled:.3f} - {POOLED_MARGIN}: {ok_pooled} "
            f"(paired {best} - pooled, 95% CI {lo:+.3f} to {hi:+.3f}); "
            f">= best local {local:.3f}: {ok_local}; >= best site {site:.3f}: {ok_site}")


def paired_interval(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean per-seed difference a - b over the seeds both have (NaN for < 2 seeds).

    Both models of a seed share its partition, splits and test slides, so the paired difference removes most of
    the seed-to-seed spread that the table's ± carries.
    """
    from scipy import stats

    diffs = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if len(diffs) < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
    return float(diffs.mean() - half), float(diffs.mean() + half)


def print_table(results: Results, proto: Protocol, combos: Sequence[tuple[str, str]], seeds: Sequence[int],
                strategies: Sequence[str]) -> None:
    """The benchmark's table (one row per dataset/skew, one column per model) and its goal lines."""
    rows = [r for r in results.rows if r.get("protocol") == proto.fingerprint() and r.get("seed") in seeds]
    columns = ["pooled", "best local", *map(proto.fed_name, strategies)]
    width = 20
    print(f"\ntest AUC, mean ± std over seeds {list(seeds)} ({proto.epochs} epochs; '(k)': only k seeds done)")
    print(f"{'dataset/skew':<18}" + "".join(f"{c:>{width}}" for c in columns))
    checks = []
    for dataset, skew in combos:
        cols = per_seed(rows, dataset, skew)
        cells = [format_cell(list(cols.get(c, {}).values()), len(seeds)) for c in columns]
        print(f"{dataset + '/' + skew:<18}" + "".join(f"{c:>{width}}" for c in cells))
        checks.append(f"{dataset + '/' + skew:<18}{goal_check(cols, proto)}")
    print("\ngoals (better of FedAvg/FedProx by mean):")
    print("\n".join(checks))
