"""Survival evaluation: C-indices with bootstrap intervals, time-dependent AUC, integrated Brier score,
Kaplan-Meier curves of two risk groups with a log-rank test.

Every number comes from scikit-survival (C-indices, AUC, Brier) or lifelines (Kaplan-Meier, log-rank), so a
reviewer recomputes them with the libraries the field uses; this module picks *which* numbers, fixes the
conventions and returns a JSON-serialisable dict for ``metrics.json``.

Conventions:

* ``risk``: higher = earlier event (:func:`wsi_fl.mil.survival.risk`).
* Harrell's C counts pairs (i has an event, t_i < t_j); tied risks count 1/2 (scikit-survival's convention).
* Uno's C, the time-dependent AUC and the Brier score weight by the inverse probability of censoring, estimated
  by Kaplan-Meier on the *training* set (as scikit-survival requires); they are evaluated up to ``tau``, by
  default the second-largest distinct training time (the censoring estimate is 0 at the largest), and
  horizons must lie inside the test times and below ``tau``.
* Intervals: percentile bootstrap over test slides with a fixed seed, as for the AUC
  (:func:`wsi_fl.evaluation.metrics.bootstrap_ci`); a resample with no comparable pair is skipped.
* The integrated Brier score needs survival curves. For a Cox head they come from the Breslow estimate of the
  baseline cumulative hazard on the training set, ``H0(t) = sum_{t_i <= t, event} 1 / sum_{j: t_j >= t_i}
  exp(eta_j)``, and ``S(t | x) = exp(-H0(t) exp(eta(x)))`` (:func:`breslow_survival`), as lifelines and
  scikit-survival do.
* Risk groups: high risk = risk above the *training* median risk (a threshold fixed before seeing the test
  set), so the log-rank test is not tuned on the data it tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib.figure import Figure
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.metrics import bootstrap_ci

__all__ = ["breslow_survival", "default_tau", "harrell_c", "km_risk_groups", "plot_km", "survival_metrics",
           "uno_c"]


def _arrays(time: Any, event: Any, risk: Any | None = None) -> tuple[np.ndarray, ...]:
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e = np.asarray(event).astype(bool).reshape(-1)
    if len(t) != len(e) or (risk is not None and len(np.asarray(risk).reshape(-1)) != len(t)):
        raise ValueError("time, event and risk must have one entry per slide")
    if risk is None:
        return t, e
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(r)):
        raise ValueError("risk scores must be finite")
    return t, e, r


def harrell_c(time: Any, event: Any, risk: Any) -> float:
    """Harrell's C (scikit-survival's ``concordance_index_censored``); NaN when no pair is comparable."""
    t, e, r = _arrays(time, event, risk)
    if not e.any():
        return math.nan
    try:
        return float(concordance_index_censored(e, t, r)[0])
    except ZeroDivisionError:
        return math.nan


def default_tau(train_time: Any) -> float:
    """The second-largest distinct training time: the last where the training censoring estimate is positive."""
    distinct = np.unique(np.asarray(train_time, dtype=np.float64))
    return float(distinct[-2] if len(distinct) > 1 else distinct[-1])


def uno_c(train_time: Any, train_event: Any, time: Any, event: Any, risk: Any, tau: float | None = None) -> float:
    """Uno's IPCW C up to ``tau`` (scikit-survival's ``concordance_index_ipcw``); NaN when undefined."""
    tt, te = _arrays(train_time, train_event)
    t, e, r = _arrays(time, event, risk)
    tau = default_tau(tt) if tau is None else float(tau)
    if not (e & (t < tau)).any():
        return math.nan
    try:
        return float(concordance_index_ipcw(Surv.from_arrays(te, tt), Surv.from_arrays(e, t), r, tau=tau)[0])
    except ZeroDivisionError:
        return math.nan


def breslow_survival(train_time: Any, train_event: Any, train_risk: Any, risk: Any, times: Sequence[float]
                     ) -> np.ndarray:
    """``S(t | eta)`` of shape (n, len(times)) from a Cox model's log-risks, Breslow baseline on the training set."""
    tt, te, tr = _arrays(train_time, train_event, train_risk)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    event_times = np.unique(tt[te])
    # Breslow with ties: d_k events at time t_k share the risk set {j: t_j >= t_k}.
    deaths = np.array([np.sum(te & (tt == s)) for s in event_times], dtype=np.float64)
    shift = tr.max()  # exp(eta - shift) avoids overflow; shift cancels in H0 * exp(eta)
    at_risk = np.array([np.exp(tr[tt >= s] - shift).sum() for s in event_times])
    cum_hazard = np.cumsum(deaths / at_risk)  # H0 * exp(-shift), at each event time
    idx = np.searchsorted(event_times, np.asarray(times, dtype=np.float64), side="right") - 1
    h0 = np.where(idx >= 0, cum_hazard[np.clip(idx, 0, None)], 0.0)
    return np.exp(-np.outer(np.exp(r - shift), h0))


def km_risk_groups(time: Any, event: Any, risk: Any, threshold: float) -> dict[str, Any]:
    """Kaplan-Meier curves of ``risk > threshold`` (high) vs the rest (low), with the log-rank test."""
    t, e, r = _arrays(time, event, risk)
    high = r > threshold
    out: dict[str, Any] = {"threshold": float(threshold), "groups": {}}
    for name, members in (("low", ~high), ("high", high)):
        if not members.any():
            out["groups"][name] = {"n": 0, "events": 0, "median_survival": None, "time": [], "survival": []}
            continue
        km = KaplanMeierFitter().fit(t[members], e[members])
        sf = km.survival_function_.iloc[:, 0]
        median = float(km.median_survival_time_)
        out["groups"][name] = {"n": int(members.sum()), "events": int(e[members].sum()),
                               "median_survival": median if math.isfinite(median) else None,
                               "time": [float(v) for v in sf.index], "survival": [float(v) for v in sf.to_numpy()]}
    if high.any() and (~high).any():
        test = logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high])
        out["logrank"] = {"statistic": float(test.test_statistic), "p_value": float(test.p_value)}
    else:
        out["logrank"] = None
    return out


def plot_km(groups: dict[str, Any], path: str | os.PathLike, *, title: str = "", time_unit: str = "") -> None:
    """The two Kaplan-Meier step curves of :func:`km_risk_groups` as a PNG (Agg, atomic write)."""
    from wsi_fl.evaluation.plots import save_figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name, color in (("low", "tab:blue"), ("high", "tab:red")):
        g = groups["groups"][name]
        if g["n"]:
            ax.step(g["time"], g["survival"], where="post", color=color,
                    label=f"{name} risk (n={g['n']}, events={g['events']})")
    p = groups.get("logrank")
    ax.set_title(title + (f"  log-rank p = {p['p_value']:.3g}" if p else ""))
    ax.set_xlabel(f"time ({time_unit})" if time_unit else "time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    save_figure(fig, path)


def _packed(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> np.ndarray:
    # bootstrap_ci resamples (y, probs) rows together; every column rides in "probs" and y is constant, so no
    # resample is skipped for lacking a "class" and the statistic itself decides (NaN = skipped).
    return np.column_stack([time, event, risk])


def _ci(lo: float, hi: float) -> list[float] | None:
    return None if math.isnan(lo) else [lo, hi]


def survival_metrics(train_time: Any, train_event: Any, train_risk: Any, time: Any, event: Any, risk: Any, *,
                     horizons: Sequence[float] = (), survival: np.ndarray | None = None,
                     survival_times: Sequence[float] | None = None, tau: float | None = None,
                     n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every survival metric of one evaluation as a JSON-serialisable dict (see the module docstring).

    ``survival`` (n, len(survival_times)): predicted survival curves for the integrated Brier score; when None
    and the scores are Cox log-risks, pass :func:`breslow_survival`'s output. Horizons outside the test times or
    beyond ``tau`` are a one-line :class:`ConfigError`.
    """
    tt, te, tr = _arrays(train_time, train_event, train_risk)
    t, e, r = _arrays(time, event, risk)
    tau = default_tau(tt) if tau is None else float(tau)
    out: dict[str, Any] = {"n": len(t), "events": int(e.sum()), "tau": tau}
    zeros = np.zeros(len(t))

    def harrell(_y: np.ndarray, p: np.ndarray) -> float:
        return harrell_c(p[:, 0], p[:, 1], p[:, 2])

    def uno(_y: np.ndarray, p: np.ndarray) -> float:
        return uno_c(tt, te, p[:, 0], p[:, 1], p[:, 2], tau)

    for name, fn in (("c_index", harrell), ("uno_c_index", uno)):
        out[name] = fn(zeros, _packed(t, e, r))
        lo, hi, used = bootstrap_ci(fn, zeros, _packed(t, e, r), n_bootstrap, seed)
        out[f"{name}_ci95"], out[f"{name}_n_bootstrap_used"] = _ci(lo, hi), used
    out["n_bootstrap"] = int(n_bootstrap)
    train, test = Surv.from_arrays(te, tt), Surv.from_arrays(e, t)
    if horizons:
        h = np.asarray(horizons, dtype=np.float64)
        if h.min() < t.min() or h.max() >= min(t.max(), tau):
            raise ConfigError(f"survival horizons must lie in [{t.min():g}, {min(t.max(), tau):g}) (the test "
                              f"times, below tau), got {', '.join(f'{v:g}' for v in h)}")
        auc, mean_auc = cumulative_dynamic_auc(train, test, r, h)
        out["time_auc"] = {f"{v:g}": float(a) for v, a in zip(h, auc, strict=True)}
        out["mean_time_auc"] = float(mean_auc)
    if survival is not None:
        grid = np.asarray(survival_times, dtype=np.float64)
        keep = (grid >= t.min()) & (grid < min(t.max(), tau))
        if keep.sum() < 2:
            raise ConfigError("the integrated Brier score needs at least 2 survival times inside the test times")
        out["integrated_brier_score"] = float(integrated_brier_score(train, test, survival[:, keep], grid[keep]))
    out["risk_groups"] = km_risk_groups(t, e, r, float(np.median(tr)))
    return out
