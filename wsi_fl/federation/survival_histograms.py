"""Federated C-index and time-dependent AUC from per-site count histograms: no per-patient time or score leaves
a site.

Each site bins its test patients on a 2-D grid, follow-up time x risk score, with edges every site and the server
agreed on before any data was seen (:func:`uniform_edges`, from the run config), and sends two integer count
grids: one for patients with the event, one for the censored (:func:`survival_histograms`). The server sums the
sites' grids and computes, from the sums alone:

* Harrell's C (:func:`histogram_c_index`): comparable pairs are (i with an event, j with a later time, event or
  censored); a pair is concordant when i's risk is higher. Up to binning: i and j in the *same time bin* cannot
  be ordered and are left out (Harrell counts them when t_i < t_j), and equal *risk bins* count 1/2 (as tied risks
  do in Harrell's C). With 64-128 bins per axis the pooled C equals scikit-survival's C on the raw pooled scores
  within 0.01 (tests/federation/test_survival_histograms.py).
* The cumulative/dynamic AUC at a horizon t* on a time edge (:func:`histogram_time_auc`): cases are events before t*
  (time bins that end at t*), controls everyone with a time at or after t*; the binned Mann-Whitney statistic as in
  :func:`wsi_fl.federation.histograms.binned_auc`. This is the AUC among patients whose status at t* is known,
  without the inverse-probability-of-censoring weights of Uno's / scikit-survival's estimator (those need the
  censoring distribution at each case's own time, which the bins only approximate); the two agree when no one is
  censored before t*.

Values outside the edges fall into the first or last bin (clipped), so a site never has to refuse a patient, and
the grid's shape depends only on the agreed edges, never on a site's data. Numpy only: the site imports this.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["agreed_edges", "auc_horizon", "histogram_c_index", "histogram_time_auc", "survival_histograms",
           "uniform_edges"]


def uniform_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins + 1`` equally spaced edges from ``lo`` to ``hi``: the agreed grid of one axis."""
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo) or bins < 1:
        raise ValueError(f"need finite lo < hi and bins >= 1, got lo={lo}, hi={hi}, bins={bins}")
    return np.linspace(float(lo), float(hi), int(bins) + 1)


def agreed_edges(cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """(time edges, risk edges) of a run's survival histograms, from its run config alone
    (:class:`wsi_fl.federation.config.FedConfig`: ``hist-time-*``, ``hist-risk-*``): the same at every site."""
    return (uniform_edges(cfg.hist_time_min, cfg.hist_time_max, cfg.hist_time_bins),
            uniform_edges(*cfg.risk_range(), cfg.hist_risk_bins))


def auc_horizon(hist: np.ndarray, time_edges: np.ndarray, requested: float = 0.0) -> float | None:
    """The horizon of :func:`histogram_time_auc`: the inner time edge nearest ``requested``, or for 0 the one
    that ends the time bin holding the median event of the summed ``hist``; None without events."""
    edges = np.asarray(time_edges, dtype=np.float64)
    inner = edges[1:-1]
    if requested > 0:
        return float(inner[np.argmin(np.abs(inner - requested))])
    per_bin = np.asarray(hist)[0].sum(axis=1)
    if per_bin.sum() == 0:
        return None
    k = int(np.searchsorted(np.cumsum(per_bin), per_bin.sum() / 2.0))  # the bin of the median event
    return float(edges[min(max(k + 1, 1), len(edges) - 2)])


def _bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Bin k = [edges[k], edges[k+1]); below the first edge -> 0, at or above the last -> the last bin.
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def survival_histograms(time: np.ndarray, event: np.ndarray, risk: np.ndarray, time_edges: np.ndarray,
                        risk_edges: np.ndarray) -> np.ndarray:
    """Site side: int64 counts of shape ``(2, T, R)``; ``[0]`` patients with the event, ``[1]`` the censored."""
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    event = np.asarray(event).astype(bool).reshape(-1)
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    if not (len(time) == len(event) == len(risk)):
        raise ValueError("time, event and risk must have one entry per patient")
    if not (np.all(np.isfinite(time)) and np.all(np.isfinite(risk))):
        raise ValueError("time and risk must be finite")
    n_t, n_r = len(time_edges) - 1, len(risk_edges) - 1
    cell = _bin(time, np.asarray(time_edges)) * n_r + _bin(risk, np.asarray(risk_edges))
    out = np.zeros((2, n_t, n_r), dtype=np.int64)
    out[0] = np.bincount(cell[event], minlength=n_t * n_r).reshape(n_t, n_r)
    out[1] = np.bincount(cell[~event], minlength=n_t * n_r).reshape(n_t, n_r)
    return out


def _check(hist: np.ndarray) -> np.ndarray:
    hist = np.asarray(hist)
    if hist.ndim != 3 or hist.shape[0] != 2 or not np.issubdtype(hist.dtype, np.integer) or (hist < 0).any():
        raise ValueError(f"survival histograms must be non-negative integer counts of shape (2, T, R), "
                         f"got {hist.dtype} {hist.shape}")
    return hist.astype(np.float64)


def histogram_c_index(hist: np.ndarray) -> float:
    """Server side: Harrell's C of the summed ``(2, T, R)`` counts (see the module docstring); NaN if no pair."""
    h = _check(hist)
    events, everyone = h[0], h[0] + h[1]
    # later[a, r]: patients in a time bin after a, with risk bin r.
    later = np.cumsum(everyone[::-1], axis=0)[::-1] - everyone
    later_below = np.cumsum(later, axis=1) - later  # ... with a lower risk bin than r
    concordant = (events * (later_below + 0.5 * later)).sum()
    pairs = (events.sum(axis=1) * later.sum(axis=1)).sum()
    return float(concordant / pairs) if pairs > 0 else math.nan


def histogram_time_auc(hist: np.ndarray, time_edges: np.ndarray, horizon: float) -> float:
    """Server side: the binned cumulative/dynamic AUC at ``horizon``, which must be one of the time edges."""
    h = _check(hist)
    edges = np.asarray(time_edges, dtype=np.float64)
    match = np.flatnonzero(np.isclose(edges, horizon, rtol=0.0, atol=1e-12 * max(1.0, abs(horizon))))
    if len(match) != 1 or match[0] in (0, len(edges) - 1):
        raise ValueError(f"horizon {horizon} must be an inner time edge (one of {edges[1:-1].tolist()})")
    k = int(match[0])  # bins [0, k) end at or before the horizon
    cases = h[0, :k].sum(axis=0)
    controls = (h[0, k:] + h[1, k:]).sum(axis=0)
    n_cases, n_controls = cases.sum(), controls.sum()
    if n_cases == 0 or n_controls == 0:
        return math.nan
    controls_below = np.cumsum(controls) - controls
    return float((cases * (controls_below + 0.5 * controls)).sum() / (n_cases * n_controls))
