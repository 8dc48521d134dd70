"""Survival losses for any MIL head: Cox partial likelihood (site-stratified) and discrete-time hazards.

Two ways to learn from ``(time, event)`` labels, with what each head output means:

* **Cox** (:func:`cox_loss`): the head's output is a log-risk ``eta``. The loss is the negative Breslow partial
  log-likelihood ``-sum_{i: event} [eta_i - log sum_{j: t_j >= t_i, stratum_j = stratum_i} exp(eta_j)]``:
  tied event times each see the full risk set (Breslow; lifelines and scikit-survival fit Efron, which equals
  Breslow when no two events share a time). Risk sets are built *within the batch* and *within a stratum*
  (a site id): a patient is only compared with patients of the same site, so a federated or pooled batch never
  lets one hospital's baseline hazard stand in for another's. It is not separable per slide (every term
  depends on the others in its risk set), so slide-level DP-SGD cannot clip it per slide. The likelihood does
  not change when every ``eta`` moves by one constant, so nothing in it holds the scores' level: training adds
  :data:`COX_CENTRING` times the batch's squared mean ``eta`` (which leaves every ranking, and so the C-index,
  alone). Without it the level drifted by -10 to -18 in 25 epochs on the synthetic survival cohort, past the
  risk axis the federation's histograms agree on, whose pooled C-index then read 0.5.
* **Discrete time** (:func:`discrete_time_loss`): the head outputs one logit per time bin, the hazard
  ``h_k = sigmoid(logit_k)`` is the probability of the event in bin k given survival to it, and
  ``S_k = prod_{m <= k} (1 - h_m)``. An event in bin k contributes ``-log h_k - sum_{m<k} log(1 - h_m)``; a
  censored patient in bin k ``-sum_{m<=k} log(1 - h_m)`` (censoring is taken to happen at the end of its bin,
  the usual convention, e.g. Zadeh & Schmid 2020, Chen et al. 2021). Each slide's term depends on its own
  output only, so this is the loss slide-level DP-SGD can use. Bin edges: :func:`discrete_time_bins`.

Risk for evaluation (:func:`risk`), one convention for every head: higher = earlier event. Cox: ``eta``. Discrete
time: ``-sum_k S_k``, minus the expected number of bins survived (a restricted mean survival time in bin units,
Chen et al.'s convention), which orders patients by their whole survival curve rather than one horizon.

Head outputs: ``MILConfig`` asks for ``n_classes >= 2``. For Cox, a head with 1 output is read as ``eta``; a head
with 2 outputs as ``eta = logit_1 - logit_0`` (the log-odds a binary classification head already has), so every
registered head can learn a risk without a config change. For discrete time, ``n_classes`` = number of bins.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_fl.errors import ConfigError

#: Weight of the squared batch-mean log-risk added to the Cox training loss (module docstring). Small: its
#: gradient only moves the level of the scores, which the partial likelihood leaves free.
COX_CENTRING = 1e-2

__all__ = ["COX_CENTRING", "check_dp_compatible", "cox_loss", "discrete_time_bins", "discrete_time_loss", "log_risk",
           "risk", "survival_curves", "time_bins"]


def log_risk(logits: Tensor) -> Tensor:
    """Cox log-risk ``eta`` (B,) of a head's logits (B, 1) or (B, 2) (see the module docstring)."""
    if logits.dim() != 2 or logits.shape[1] not in (1, 2):
        raise ConfigError(f"a Cox head needs 1 or 2 outputs per slide, got logits of shape {tuple(logits.shape)}")
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]


def cox_loss(eta: Tensor, time: Tensor, event: Tensor, strata: Tensor | None = None,
             reduction: str = "mean") -> Tensor:
    """Negative Breslow partial log-likelihood of log-risks ``eta`` (B,), risk sets within ``strata``.

    ``time`` (B,) float, ``event`` (B,) bool or 0/1, ``strata`` (B,) int (e.g. site index; None = one stratum).
    ``reduction``: ``"sum"`` (the likelihood itself, as lifelines reports it) or ``"mean"`` over events (so the
    step size does not depend on how many events a batch holds). A batch with no event has no partial
    likelihood: the loss is 0 (still connected to ``eta``, so backward works and gives zero gradients).
    O(B^2) memory: meant for batches, or a whole site's few hundred slides.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    eta = eta.reshape(-1)
    time = time.reshape(-1).to(eta.dtype)
    event = event.reshape(-1).to(torch.bool)
    if not (len(eta) == len(time) == len(event)):
        raise ValueError(f"eta, time and event must have one entry per slide, got {len(eta)}, {len(time)}, "
                         f"{len(event)}")
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)  # [i, j]: j is at risk when i has its event
    if strata is not None:
        strata = strata.reshape(-1)
        at_risk = at_risk & (strata.unsqueeze(0) == strata.unsqueeze(1))
    log_denominator = torch.logsumexp(eta.unsqueeze(0).masked_fill(~at_risk, float("-inf")), dim=1)
    terms = (eta - log_denominator)[event]
    if terms.numel() == 0:
        return eta.sum() * 0.0
    total = -terms.sum()
    return total / terms.numel() if reduction == "mean" else total


def discrete_time_bins(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """``n_bins + 1`` increasing edges: interior edges at quantiles of the training *event* times.

    Quantiles of event times (not all times) put equally many events in each bin, which is where the
    likelihood has information (Chen et al. 2021 do the same); the outer edges are 0 and the largest training
    time, so every training time falls in a bin. Tied quantiles (many events at one time) are merged, so fewer
    bins may come back than asked for; raises if fewer than 2 remain.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    if n_bins < 2:
        raise ConfigError(f"discrete-time survival needs at least 2 bins, not {n_bins}")
    if not event.any():
        raise ConfigError("discrete-time bins need at least one event in the training data")
    interior = np.quantile(time[event], np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    edges = np.unique(np.concatenate([[0.0], interior, [time.max()]]))
    if len(edges) < 3:
        raise ConfigError(f"the training event times give only {len(edges) - 1} distinct bin(s); need 2")
    return edges


def time_bins(time: Tensor | np.ndarray, edges: np.ndarray) -> Tensor:
    """Bin index (long) of each time: bin k is ``(edges[k], edges[k+1]]``; times outside go to the end bins."""
    interior = torch.as_tensor(np.asarray(edges[1:-1], dtype=np.float64))
    t = torch.as_tensor(np.asarray(time, dtype=np.float64)).reshape(-1)
    return torch.bucketize(t, interior, right=False).clamp(0, len(edges) - 2)


def discrete_time_loss(logits: Tensor, bins: Tensor, event: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of per-bin hazard logits (B, K) given bin indices (B,) and events (B,).

    Computed with ``log sigmoid`` so no hazard of exactly 0 or 1 gives an infinite loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    bins = bins.reshape(-1).to(torch.long)
    event = event.reshape(-1).to(logits.dtype)
    if logits.dim() != 2 or len(bins) != len(logits) or len(event) != len(logits):
        raise ValueError(f"logits must be (B, K) with one bin and event per row, got {tuple(logits.shape)}, "
                         f"{len(bins)}, {len(event)}")
    if len(bins) and (int(bins.min()) < 0 or int(bins.max()) >= logits.shape[1]):
        raise ValueError(f"bin indices must be in [0, {logits.shape[1]}), got {bins.tolist()}")
    log_survive = F.logsigmoid(-logits)  # log(1 - h_k)
    cum = torch.cumsum(log_survive, dim=1)  # log S_k
    survived_before = torch.where(bins > 0, cum.gather(1, (bins - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                                  torch.zeros_like(event))
    log_hazard = F.logsigmoid(logits).gather(1, bins.unsqueeze(1)).squeeze(1)
    survived_through = cum.gather(1, bins.unsqueeze(1)).squeeze(1)
    nll = -(event * (log_hazard + survived_before) + (1.0 - event) * survived_through)
    return nll.mean() if reduction == "mean" else nll.sum()


def survival_curves(logits: Tensor) -> Tensor:
    """Discrete-time survival ``S_k`` (B, K) at the end of each bin."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))


def risk(logits: Tensor, kind: str) -> Tensor:
    """Risk score (B,), higher = earlier event: ``kind`` ``"cox"`` (log-risk) or ``"discrete"`` (-sum_k S_k)."""
    if kind == "cox":
        return log_risk(logits)
    if kind == "discrete":
        return -survival_curves(logits).sum(dim=1)
    raise ConfigError(f"survival loss must be cox or discrete, not {kind!r}")


def check_dp_compatible(loss: str, dp_enabled: bool) -> None:
    """Refuse the Cox loss under slide-level DP-SGD, in one line: the one place that rule is written.

    DP-SGD bounds each slide's influence by clipping its own gradient; a Cox term depends on every slide of its
    risk set, so no per-slide gradient exists to clip (and the privacy accounting would not hold). The
    discrete-time loss is a sum of per-slide terms and is accepted.
    """
    if dp_enabled and loss == "cox":
        raise ConfigError("the Cox loss cannot be trained under slide-level DP-SGD (each slide's term depends on "
                          "its whole risk set, so per-slide gradients cannot be clipped): use --survival-loss "
                          "discrete")
