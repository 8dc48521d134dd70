"""The survival report of a trained model: ``predictions.csv``, ``metrics.json``, ``km.png``, ``time_auc.png``.

Written by ``wsi-fl train --task survival`` for its test split and by ``wsi-fl evaluate`` for a survival
checkpoint (:func:`evaluate_survival_checkpoint`, which :func:`wsi_fl.evaluation.evaluate.evaluate_checkpoint`
dispatches to). The numbers are :func:`wsi_fl.evaluation.survival.survival_metrics`'s; what this module adds is
where the reference quantities come from. Uno's C, the time-dependent AUC and the Brier score need the
*training* set's censoring distribution, the Cox survival curves its Breslow baseline, and the Kaplan-Meier
risk groups the training median risk: all of them are fixed at training time and stored in the checkpoint
(``meta["survival"]``: the training times, events and risk scores; no slide ids), so a later evaluation of the
same checkpoint reports the same numbers without the training data.

Horizons of the time-dependent AUC default to the quartiles of the training times; a horizon outside the test
times (or past ``tau``) cannot be estimated on this test set, so it is left out and named in ``notes``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preprocessing.atomic import write_text_atomic
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.options import EvalOptions
from wsi_fl.mil.data import BagRecord
from wsi_fl.mil.survival import survival_curves
from wsi_fl.mil.training import SurvivalPredictions

__all__ = ["evaluate_survival_checkpoint", "survival_meta", "write_survival_report"]

#: Points of the time grid over which the integrated Brier score is taken.
_GRID = 50


def survival_meta(train: SurvivalPredictions, loss: str, edges: np.ndarray | None, time_col: str,
                  event_col: str) -> dict[str, Any]:
    """What a survival checkpoint stores (``meta["survival"]``) for its later evaluation (see the module doc)."""
    return {"loss": loss, "bin_edges": None if edges is None else [float(v) for v in edges],
            "time_col": time_col, "event_col": event_col,
            "train_time": [float(v) for v in train.time], "train_event": [int(v) for v in train.event],
            "train_risk": [float(v) for v in train.risk],
            "horizons": [float(v) for v in np.quantile(train.time, [0.25, 0.5, 0.75])]}


def _curves(preds: SurvivalPredictions, info: Mapping[str, Any], grid: np.ndarray) -> np.ndarray:
    """Predicted ``S(t)`` (n, len(grid)): Breslow for Cox, the per-bin product for discrete time (a step at
    each bin's end; ``S = 1`` before the first bin ends)."""
    if info["loss"] == "cox":
        from wsi_fl.evaluation.survival import breslow_survival

        return breslow_survival(info["train_time"], info["train_event"], info["train_risk"], preds.risk, grid)
    if preds.logits is None:
        raise ConfigError("discrete-time survival curves need the model's outputs")
    s = survival_curves(torch.as_tensor(preds.logits, dtype=torch.float64)).numpy()  # S at each bin's end
    ends = np.asarray(info["bin_edges"], dtype=np.float64)[1:]
    done = np.searchsorted(ends, grid, side="right")  # bins finished by time t
    padded = np.concatenate([np.ones((len(s), 1)), s], axis=1)
    return padded[:, np.clip(done, 0, s.shape[1])]


def write_predictions(path: Path, preds: SurvivalPredictions, records: Sequence[BagRecord]) -> None:
    patient = {r.slide_id: r.patient_id for r in records}
    rows = ["slide_id,patient_id,time,event,risk"]
    rows += [f"{s},{patient.get(s, s)},{t:g},{int(e)},{r:.6f}"
             for s, t, e, r in zip(preds.slide_ids, preds.time, preds.event, preds.risk, strict=True)]
    write_text_atomic(path, "\n".join(rows) + "\n")


def write_survival_report(out_dir: str | Path, preds: SurvivalPredictions, records: Sequence[BagRecord],
                          info: Mapping[str, Any], opts: EvalOptions = EvalOptions(), title: str = "",
                          extra: Mapping | None = None) -> dict[str, Any]:
    """predictions.csv, metrics.json (the metrics and ``extra``), km.png and time_auc.png; returns the metrics."""
    from wsi_fl.evaluation.survival import default_tau, plot_km, survival_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tt = np.asarray(info["train_time"], dtype=np.float64)
    te = np.asarray(info["train_event"], dtype=bool)
    tr = np.asarray(info["train_risk"], dtype=np.float64)
    t, e = preds.time, preds.event
    tau = default_tau(tt)
    upper = min(float(t.max()), tau)
    notes: list[str] = []
    horizons = [h for h in info.get("horizons", []) if t.min() <= h < upper]
    dropped = [h for h in info.get("horizons", []) if h not in horizons]
    if dropped:
        notes.append(f"horizon(s) {', '.join(f'{h:g}' for h in dropped)} outside this set's times "
                     f"[{t.min():g}, {upper:g}): no time-dependent AUC there")
    grid = np.linspace(float(t.min()), upper, _GRID + 1)[:-1]
    survival = _curves(preds, info, grid) if len(np.unique(grid)) >= 2 and e.any() else None
    if survival is None:
        notes.append("no integrated Brier score: too few events or distinct times in this set")
    if not e.any() or not (e & (t < upper)).any():
        horizons = []
    metrics = survival_metrics(tt, te, tr, t, e, preds.risk, horizons=horizons, survival=survival,
                               survival_times=grid if survival is not None else None, tau=tau,
                               n_bootstrap=opts.n_bootstrap, seed=opts.seed)
    metrics = {"task": "survival", "loss": info["loss"], **metrics, "horizons": horizons}
    if notes:
        metrics["notes"] = notes
    metrics.update(extra or {})
    write_predictions(out_dir / "predictions.csv", preds, records)
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    plot_km(metrics["risk_groups"], out_dir / "km.png", title=f"{title}  C = {metrics['c_index']:.3f}".strip())
    if metrics.get("time_auc"):
        _plot_time_auc(metrics["time_auc"], out_dir / "time_auc.png", title)
    return metrics


def _plot_time_auc(auc: Mapping[str, float], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    from wsi_fl.evaluation.plots import save_figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot([float(k) for k in auc], list(auc.values()), marker="o")
    ax.axhline(0.5, linestyle="--", color="0.6", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("horizon (time)")
    ax.set_ylabel("cumulative/dynamic AUC")
    ax.set_title(title)
    save_figure(fig, path)


def evaluate_survival_checkpoint(checkpoint: str | Path, model: Any, ckpt: Any, features_dir: str | Path,
                                 labels: str | Path, out_dir: str | Path, *, split: str | None = None,
                                 opts: EvalOptions = EvalOptions(), log=print) -> dict[str, Any]:
    """``wsi-fl evaluate`` of a survival checkpoint: the held-out slides of ``labels`` (as for classification,
    :func:`~wsi_fl.evaluation.heldout.select_slides`), scored with the report of :func:`write_survival_report`."""
    from wsi_fl.evaluation.heldout import select_slides
    from wsi_fl.mil.data import FeatureBagDataset
    from wsi_fl.mil.splits import drop_empty_slides
    from wsi_fl.mil.survival_labels import read_survival_records
    from wsi_fl.mil.training import predict_risk

    info = ckpt.meta.get("survival")
    if not isinstance(info, dict) or "train_time" not in info:
        raise ConfigError(f"{checkpoint}: a survival checkpoint without its training reference (meta.survival)")
    records = read_survival_records(labels, time_col=info["time_col"], event_col=info["event_col"])
    features_dir = Path(features_dir)
    given = drop_empty_slides(records, features_dir, log)
    FeatureBagDataset(given, features_dir, expected_provenance=ckpt.provenance)  # every file checked first
    chosen = select_slides(ckpt.meta, given, split, str(checkpoint))
    log(chosen.line())
    for note in chosen.notes:
        log(f"note: {note}")
    dataset = FeatureBagDataset(chosen.records, features_dir, expected_provenance=ckpt.provenance)
    preds = predict_risk(model, dataset, info["loss"])
    return write_survival_report(out_dir, preds, chosen.records, info, opts, title=Path(checkpoint).stem,
                                 extra={"evaluated": chosen.summary()})
