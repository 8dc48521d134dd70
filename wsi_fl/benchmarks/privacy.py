"""What differential privacy costs: FedAvg's test AUC under DP at several ε against the same run without DP.

Why on the federated benchmark's cohorts and protocol (:mod:`wsi_fl.benchmarks.cohorts`,
:class:`~wsi_fl.benchmarks.federated.Protocol`): the same partitions, seeds,
epochs and scoring on the union of the sites' held-out slides make the drop
from "no DP" a difference of one thing only, the noise. Each seed runs FedAvg
for the protocol's epochs (one local epoch per round) without DP, then with
DP calibrated to each target ε over those rounds (:class:`DPSweep`). With the
central modes the privacy unit is a site (client-level DP,
:mod:`wsi_fl.privacy.central`); with ``slide-dpsgd`` it is a training slide, each
site running DP-SGD with per-bag clipping (:mod:`wsi_fl.privacy.dpsgd`).

Results go to the same JSON-lines store as the federated benchmark's
(:class:`~wsi_fl.benchmarks.results.Results`), one row per run named
``"<setting> <sweep label>"`` (e.g. ``eps 8 client-fixed clip 0.1``), so a rerun
skips what is done and sweeps with other settings sit beside each other.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_fl.benchmarks.cohorts import Cohort
from wsi_fl.benchmarks.federated import ENGINES, Protocol, score
from wsi_fl.benchmarks.results import Results, format_cell, mean_std
from wsi_fl.federation.config import FedConfig

GOAL_DROP = 0.05  # at epsilon 8


@dataclass(frozen=True)
class DPSweep:
    """The DP settings of one sweep: a mode, its clipping norm and the target ε values, at one δ."""

    mode: str = "client-fixed"  # FedConfig's dp mode
    clip: float = 0.1  # clipping norm of a site's update (of a bag's gradient with slide-dpsgd)
    batch_size: int = 8  # slide-dpsgd: expected bags per step
    dp_lr: float | None = None  # local learning rate under DP (None: the protocol's)
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    delta: float = 1e-5

    def label(self) -> str:
        """What distinguishes this sweep's results from another's in the results file."""
        return (f"{self.mode} clip {self.clip}" + (f" batch {self.batch_size}" if self.mode == "slide-dpsgd" else "")
                + (f" lr {self.dp_lr:g}" if self.dp_lr is not None else ""))

    def settings(self) -> dict[str, dict[str, Any]]:
        """Setting name ("no DP", "eps 8", ...) -> the FedConfig fields it overrides."""
        sgd: dict[str, Any] = {"dp_batch_size": self.batch_size} if self.mode == "slide-dpsgd" else {}
        if self.dp_lr is not None:
            sgd["lr"] = self.dp_lr
        return {"no DP": {}} | {f"eps {e:g}": {"dp": self.mode, "dp_epsilon": e, "dp_delta": self.delta,
                                               "dp_clipping_norm": self.clip, **sgd} for e in self.epsilons}


def run(cohort: Cohort, out: Path, proto: Protocol, dp: dict[str, Any]) -> tuple[float, float | None]:
    """(test AUC, epsilon spent) of FedAvg on ``cohort`` with the DP settings ``dp`` (empty: none)."""
    base = proto.fed_config("fedavg", cohort.seed, len(cohort.sites), out)
    cfg = FedConfig(**{**dataclasses.asdict(base), **dp})
    ENGINES["inline"](cohort.root, len(cohort.sites), cfg)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return score(out / "last.pt", cohort, proto)[0], last.get("dp-epsilon")


def run_cohort(cohort: Cohort, results: Results, runs: Path, proto: Protocol, sweep: DPSweep) -> None:
    """Every setting of ``sweep`` on one dataset/skew/seed, skipping those already in ``results``."""
    dataset, skew, seed = cohort.dataset, cohort.skew, cohort.seed
    for name, dp in sweep.settings().items():
        key = {"protocol": proto.fingerprint(), "dataset": dataset, "skew": skew, "seed": seed,
               "model": f"{name} {sweep.label()}"}
        if results.has(**key):
            continue
        start = time.perf_counter()
        out = runs / dataset / skew / f"seed{seed}" / name.replace(" ", "")
        auc, eps = run(cohort, out, proto, dp)
        results.append({**key, "kind": "run", "auc": auc, "epsilon": eps,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"[{dataset}/{skew} seed {seed}] {name:<8} test AUC {auc:.3f}"
              + (f"  epsilon spent {eps:.3f}" if eps is not None else ""), flush=True)


def print_table(results: Results, proto: Protocol, sweep: DPSweep, combos: Sequence[tuple[str, str]],
                seeds: Sequence[int]) -> None:
    """Mean ± std of the test AUC per setting and the drop at ε = 8, one row per dataset/skew."""
    settings = sweep.settings()
    print(f"\nFedAvg test AUC, mean ± std over seeds {list(seeds)}; {proto.epochs} rounds; DP {sweep.label()}, "
          f"delta {sweep.delta:g}; drop = no DP - DP (goal at epsilon 8: <= {GOAL_DROP})")
    print(f"{'dataset/skew':<18}" + "".join(f"{n:>22}" for n in settings) + f"{'drop at eps 8':>16}")
    for dataset, skew in combos:
        cols = {}
        for name in settings:
            model = f"{name} {sweep.label()}"
            cols[name] = [r["auc"] for r in results.rows if r.get("dataset") == dataset and r.get("skew") == skew
                          and r.get("model") == model and r.get("seed") in seeds
                          and r.get("protocol") == proto.fingerprint()]
        drop = (mean_std(cols["no DP"])[0] - mean_std(cols["eps 8"])[0]) if "eps 8" in cols else float("nan")
        print(f"{dataset + '/' + skew:<18}" + "".join(f"{format_cell(v, len(seeds)):>22}" for v in cols.values())
              + f"{drop:>16.3f}")
