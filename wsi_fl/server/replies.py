"""What the sites send back, checked and summed: training replies screened, evaluation counts pooled.

A federation must survive a site that fails, answers late or sends something
malformed (other array names or shapes, another dtype, NaN/Inf, a non-positive
bag count): each such reply is dropped here with its reason logged, so the
round loop (:mod:`wsi_fl.server.loop`) aggregates only valid updates. The
federated metrics are computed from summed histograms and confusion counts
(:mod:`wsi_fl.federation.histograms`): the pooled AUC over all sites' slides,
while no per-slide score leaves a site. A survival run's sites send count grids
instead (follow-up time x risk, events and censored; :mod:`wsi_fl.site.survival`):
their sums give the pooled C-index and time-dependent AUC of every split
(:func:`aggregate_survival_evaluation`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import FedConfig
from wsi_fl.federation.histograms import confusion_metrics, histogram_auc
from wsi_fl.federation.survival_histograms import agreed_edges, auc_horizon, histogram_c_index, histogram_time_auc

log = logging.getLogger("wsi_fl.server")
#: Share of a split's patients in the two outermost risk bins above which the server warns that the axis clips.
RISK_AT_ENDS_WARNING = 0.2

#: What a training reply's MetricRecord holds (the weight FedAvg uses, and the site's mean training loss).
TRAIN_METRICS = {"num-examples", "train-loss"}


def screen_replies(replies: list[Message], reference: ArrayRecord, transport: str,
                   metric_keys: set[str] = TRAIN_METRICS) -> tuple[list[Message], int, int, list[int]]:
    """(valid replies, failed count, rejected count, array bytes each valid reply sent).

    Every drop is logged with its reason. The valid replies' arrays are cast to float32 in place, so a float16
    transport is aggregated at full precision.
    """
    valid, failed, rejected, sent = [], 0, 0, []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed += 1
            log.warning("site %s failed this round: %s", node, reply.error.reason)
            continue
        content = reply.content
        arrays = list(content.array_records.values())
        metrics = list(content.metric_records.values())
        if len(arrays) != 1 or len(metrics) != 1:
            reason = "a reply must hold exactly one ArrayRecord and one MetricRecord"
        else:
            reason = fedarrays.check_update(arrays[0], reference, transport) or fedarrays.check_weight(
                metrics[0].get("num-examples"))
        if reason is None and set(metrics[0].keys()) != metric_keys:
            reason = f"metric keys {sorted(metrics[0].keys())} are not {sorted(metric_keys)}"
        if reason is None and not all(isinstance(v, int | float) and math.isfinite(v) for v in metrics[0].values()):
            reason = "metrics hold NaN, Inf or non-scalars"
        if reason is not None:
            rejected += 1
            log.warning("rejected the update of site %s: %s", node, reason)
            continue
        key = next(iter(content.array_records))
        sent.append(fedarrays.record_nbytes(arrays[0]))
        content.array_records[key] = ArrayRecord({k: fedarrays.Array(v)
                                                  for k, v in fedarrays.to_numpy(arrays[0]).items()})
        valid.append(reply)
    return valid, failed, rejected, sent


def _summed_counts(replies: list[Message], parse: Callable[[Any], dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The sum over valid evaluation replies of ``parse(metrics)`` (a dict of counts), and how many were valid.

    ``parse`` raises KeyError, ValueError or TypeError for a reply that is malformed; such a reply is logged and
    left out whole, so none of its splits reaches the sums.
    """
    sums: dict[str, Any] = {}
    valid = 0
    for reply in replies:
        if reply.has_error():
            log.warning("site %s failed to evaluate: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        try:
            part = parse(reply.content["metrics"])
        except (KeyError, ValueError, TypeError) as err:
            log.warning("rejected the evaluation of site %s: %s", reply.metadata.src_node_id, err)
            continue
        for key, value in part.items():
            sums[key] = sums.get(key, 0) + value
        valid += 1
    return sums, valid


def aggregate_evaluation(replies: list[Message], n_classes: int, bins: int) -> dict[str, float]:
    """Pooled metrics of the val and test splits from the sites' summed counts."""
    hist_shape = (1 if n_classes == 2 else n_classes, 2, bins)

    def parse(m: Any) -> dict[str, Any]:
        part: dict[str, Any] = {}
        for split in ("val", "test"):
            hist = np.asarray(m[f"{split}-hist"], dtype=np.int64).reshape(hist_shape)
            cm = np.asarray(m[f"{split}-confusion"], dtype=np.int64).reshape(n_classes, n_classes)
            if (hist < 0).any() or (cm < 0).any() or not math.isfinite(m[f"{split}-loss-sum"]):
                raise ValueError("negative counts or non-finite loss")
            part.update({f"{split}-hist": hist, f"{split}-confusion": cm, f"{split}-n": int(m[f"{split}-n"]),
                         f"{split}-loss-sum": float(m[f"{split}-loss-sum"])})
        return part

    sums, valid = _summed_counts(replies, parse)
    out: dict[str, float] = {"eval-replies": valid}
    for split in ("val", "test"):
        n = sums.get(f"{split}-n", 0)
        out[f"{split}-n"] = n
        if n:
            out[f"{split}-loss"] = sums[f"{split}-loss-sum"] / n
            out[f"{split}-auc"] = histogram_auc(sums[f"{split}-hist"])
            for k, v in confusion_metrics(sums[f"{split}-confusion"]).items():
                out[f"{split}-{k}"] = v
    return out


def aggregate_survival_evaluation(replies: list[Message], cfg: FedConfig) -> dict[str, float]:
    """Pooled survival metrics of the train, val and test splits from the sites' summed count grids.

    Per split: ``-n``, ``-events``, ``-loss`` (Cox: the sum of the sites' partial log-likelihoods, each over its
    own patients, per event; discrete: per patient), ``-c-index`` (Harrell's, binned) and ``-td-auc`` at
    ``-td-auc-time`` (:mod:`wsi_fl.federation.survival_histograms`).
    """
    time_edges, _ = agreed_edges(cfg)
    shape = (2, cfg.hist_time_bins, cfg.hist_risk_bins)
    splits = ("train", "val", "test")

    def parse(m: Any) -> dict[str, Any]:
        part: dict[str, Any] = {}
        for split in splits:
            hist = np.asarray(m[f"{split}-surv-hist"], dtype=np.int64).reshape(shape)
            n, events, loss = int(m[f"{split}-n"]), int(m[f"{split}-events"]), float(m[f"{split}-loss-sum"])
            if (hist < 0).any() or int(hist.sum()) != n or int(hist[0].sum()) != events or not math.isfinite(loss):
                raise ValueError(f"{split}: negative counts, counts that do not add up to {split}-n and "
                                 f"{split}-events, or a non-finite loss")
            part.update({f"{split}-hist": hist, f"{split}-n": n, f"{split}-events": events,
                         f"{split}-loss-sum": loss})
        return part

    sums, valid = _summed_counts(replies, parse)
    out: dict[str, float] = {"eval-replies": valid}
    clipped = []
    for split in splits:
        n = sums.get(f"{split}-n", 0)
        out[f"{split}-n"] = n
        if not n:
            continue
        events, hist = sums[f"{split}-events"], sums[f"{split}-hist"]
        out[f"{split}-events"] = events
        # Risks beyond the agreed axis land in its end bins, where they tie: many there and the C-index is
        # biased towards 0.5 without anything else showing it.
        out[f"{split}-risk-at-ends"] = share = float(hist[..., 0].sum() + hist[..., -1].sum()) / n
        if share > RISK_AT_ENDS_WARNING:
            clipped.append(f"{split} {share:.0%}")
        out[f"{split}-loss"] = sums[f"{split}-loss-sum"] / max(events if cfg.survival_loss == "cox" else n, 1)
        out[f"{split}-c-index"] = histogram_c_index(hist)
        horizon = auc_horizon(hist, time_edges, cfg.td_auc_time)
        if horizon is not None:
            out[f"{split}-td-auc"] = histogram_time_auc(hist, time_edges, horizon)
            out[f"{split}-td-auc-time"] = horizon
    if clipped:
        lo, hi = cfg.risk_range()
        log.warning("survival histograms: %s of the patients' risk scores are in the end bins of the agreed risk "
                    "axis [%g, %g], where they tie, so the pooled C-index and time-dependent AUC are biased "
                    "towards 0.5: widen hist-risk-min/hist-risk-max", ", ".join(clipped), lo, hi)
    return out


def summarise(row: dict[str, Any]) -> str:
    """One readable line per round for the log (``metrics.jsonl`` has everything)."""
    parts = [f"{row['aggregated']}/{row['sampled']} updates aggregated ({row['failed']} failed, "
             f"{row['rejected']} rejected)"]
    if "train-loss" in row:
        parts.append(f"train loss {row['train-loss']:.3f}")
    for split in ("val", "test"):
        if row.get(f"{split}-n") and f"{split}-c-index" in row:
            parts.append(f"{split} loss {row[f'{split}-loss']:.3f} C-index {row[f'{split}-c-index']:.3f} "
                         f"(n={row[f'{split}-n']}, {row[f'{split}-events']} events)")
        elif row.get(f"{split}-n"):
            parts.append(f"{split} loss {row[f'{split}-loss']:.3f} AUC {row[f'{split}-auc']:.3f} "
                         f"(n={row[f'{split}-n']})")
    if "bytes-per-client" in row:
        parts.append(f"{row['bytes-per-client'] / 1e6:.2f} MB/site")
    if "dp-epsilon" in row:
        parts.append(f"privacy spent epsilon {row['dp-epsilon']:.3g} at delta {row['dp-delta']:g}")
    return "; ".join([*parts, f"{row['seconds']:.1f} s"])
