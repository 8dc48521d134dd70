"""A site's part of a federated survival run: its loss, and its evaluation as count grids only.

Training is the classification round's (:func:`wsi_fl.site.app.train`) with the survival loss of
:class:`wsi_fl.mil.training.SurvivalLoss`: Cox risk sets are formed within one batch of this site's own training
slides (every bag is of stratum 0), never across sites, since no other site's patient is here to compare with.
Discrete-time hazards use bins of equal width over the agreed follow-up range (``hist-time-min`` to
``hist-time-max``, ``time-bins`` of them), not quantiles of this site's event times as local training does: every
site's head must mean the same bins for their weights to be averaged.

Evaluation (:func:`survival_aggregates`) sends, per split (train, val, test), what
:mod:`wsi_fl.federation.survival_histograms` needs and nothing per patient: two integer grids, follow-up time
bin x risk bin, one for the patients with the event and one for the censored, on the edges of the run config
(the same at every site, fixed before any data is seen), plus the number of patients and events and the summed
loss. No time, score or slide id leaves the site.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from models import MILModel
from wsi_fl.federation.config import FedConfig
from wsi_fl.federation.survival_histograms import agreed_edges, survival_histograms, uniform_edges
from wsi_fl.mil.training import SurvivalLoss, predict_risk

#: The splits a survival evaluation reports (the training split too: how well the model fits, pooled).
SURVIVAL_SPLITS = ("train", "val", "test")


def discrete_edges(cfg: FedConfig) -> np.ndarray | None:
    """The agreed hazard bins of a discrete-time head (None for Cox)."""
    if cfg.survival_loss != "discrete":
        return None
    return uniform_edges(cfg.hist_time_min, cfg.hist_time_max, cfg.time_bins)


def survival_criterion(cfg: FedConfig) -> SurvivalLoss:
    return SurvivalLoss(cfg.survival_loss, discrete_edges(cfg))


def empty_split(prefix: str, cfg: FedConfig) -> dict[str, int | float | list[int]]:
    """What a split without patients sends: zero counts of the same shape (the server's sums stay well-formed)."""
    return {f"{prefix}-n": 0, f"{prefix}-events": 0, f"{prefix}-loss-sum": 0.0,
            f"{prefix}-surv-hist": [0] * (2 * cfg.hist_time_bins * cfg.hist_risk_bins)}


def survival_aggregates(model: MILModel, ds: Dataset | None, prefix: str, cfg: FedConfig,
                        device: torch.device) -> dict[str, int | float | list[int]]:
    """One split's survival histograms, patient and event counts and summed loss (Cox: the site's partial
    log-likelihood over the whole split, one risk set; discrete: the sum of the patients' terms)."""
    if ds is None or len(ds) == 0:
        return empty_split(prefix, cfg)
    preds = predict_risk(model, ds, cfg.survival_loss, batch_size=cfg.effective_batch_size(), device=device)
    time_edges, risk_edges = agreed_edges(cfg)
    hist = survival_histograms(preds.time, preds.event, preds.risk, time_edges, risk_edges)
    loss = SurvivalLoss(cfg.survival_loss, discrete_edges(cfg)).on_predictions(preds)
    n, events = len(preds.time), int(preds.event.sum())
    # on_predictions averages (Cox: over events, discrete: over patients); the server sums and divides again.
    loss_sum = loss * (events if cfg.survival_loss == "cox" else n)
    return {f"{prefix}-n": n, f"{prefix}-events": events, f"{prefix}-loss-sum": float(loss_sum),
            f"{prefix}-surv-hist": hist.ravel().tolist()}
