"""Survival metrics against direct scikit-survival / lifelines calls and hand examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.survival import (
    breslow_survival,
    default_tau,
    harrell_c,
    km_risk_groups,
    plot_km,
    survival_metrics,
    uno_c,
)


def cohort(n: int, seed: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    t = rng.exponential(np.exp(-(x @ np.array([1.0, -0.5]))))
    c = rng.exponential(2.0, size=n)
    time = np.minimum(t, c)
    return x, (np.ceil(time * 5) / 5 if ties else time), t <= c


def test_harrell_c_by_hand_and_against_sksurv() -> None:
    time, event = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 1, 0, 1])
    # Comparable pairs: (0,1) (0,2) (0,3) (1,2) (1,3); patient 2 is censored at 3 so (2,3) is not one.
    assert harrell_c(time, event, [4, 3, 2, 1]) == 1.0
    assert harrell_c(time, event, [1, 2, 3, 4]) == 0.0
    assert harrell_c(time, event, [4, 3, 3, 3]) == pytest.approx((3 + 0.5 * 2) / 5)  # ties count 1/2
    assert np.isnan(harrell_c(time, np.zeros(4), [1, 2, 3, 4]))  # no event, no comparable pair
    _, t, e = cohort(100, 0)
    r = np.random.default_rng(1).normal(size=100) - t
    assert harrell_c(t, e, r) == concordance_index_censored(e, t, r)[0]


def test_uno_c_against_sksurv_with_the_default_tau() -> None:
    _, tt, te = cohort(150, 2)
    _, t, e = cohort(80, 3)
    r = -t + np.random.default_rng(4).normal(size=80)
    tau = default_tau(tt)
    assert tau == np.sort(tt)[-2]
    expected = concordance_index_ipcw(Surv.from_arrays(te, tt), Surv.from_arrays(e, t), r, tau=tau)[0]
    assert uno_c(tt, te, t, e, r) == pytest.approx(expected, abs=1e-12)


def test_breslow_survival_matches_sksurv_with_ties_and_lifelines_without() -> None:
    x, t, e = cohort(120, 5, ties=True)
    eta = x @ np.array([0.9, -0.4])
    times = np.linspace(0.2, 2.0, 12)  # from the first time on: sksurv's step function is undefined before it
    ref = BreslowEstimator().fit(eta, e, t).get_survival_function(eta[:7])
    expected = np.array([[fn(s) for s in times] for fn in ref])
    np.testing.assert_allclose(breslow_survival(t, e, eta, eta[:7], times), expected, rtol=1e-10)
    x, t, e = cohort(120, 6)
    df = pd.DataFrame(x, columns=["a", "b"]).assign(time=t, event=e.astype(int))
    fit = CoxPHFitter().fit(df, "time", "event")
    eta = x @ fit.params_[["a", "b"]].to_numpy()
    times = np.sort(t[e])[::10]  # lifelines interpolates between its steps; at the event times it is exact
    expected = fit.predict_survival_function(df.iloc[:5], times=times).to_numpy().T
    np.testing.assert_allclose(breslow_survival(t, e, eta, eta[:5], times), expected, rtol=1e-6)


def test_km_risk_groups_and_logrank_against_lifelines(tmp_path: Path) -> None:
    _, t, e = cohort(90, 7)
    r = -np.log(t) + np.random.default_rng(8).normal(size=90)
    groups = km_risk_groups(t, e, r, threshold=0.0)
    high = r > 0
    km = KaplanMeierFitter().fit(t[high], e[high])
    np.testing.assert_allclose(groups["groups"]["high"]["survival"], km.survival_function_.iloc[:, 0].to_numpy())
    lr = logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high])
    assert groups["logrank"]["p_value"] == pytest.approx(lr.p_value) and groups["logrank"]["p_value"] < 0.01
    assert groups["groups"]["high"]["n"] + groups["groups"]["low"]["n"] == 90
    plot_km(groups, tmp_path / "km.png", title="test", time_unit="months")
    data = (tmp_path / "km.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert km_risk_groups(t, e, r, threshold=1e9)["logrank"] is None  # one group only: no test


def test_survival_metrics_report_matches_the_libraries() -> None:
    x, tt, te = cohort(200, 9)
    xs, t, e = cohort(100, 10)
    beta = np.array([1.0, -0.5])
    tr, r = x @ beta, xs @ beta
    horizons = [0.25, 0.5, 1.0]
    grid = np.linspace(0.05, 1.5, 30)
    surv = breslow_survival(tt, te, tr, r, grid)
    out = survival_metrics(tt, te, tr, t, e, r, horizons=horizons, survival=surv, survival_times=grid,
                           n_bootstrap=200, seed=0)
    json.dumps(out)  # metrics.json-ready
    train, test = Surv.from_arrays(te, tt), Surv.from_arrays(e, t)
    assert out["c_index"] == concordance_index_censored(e, t, r)[0] > 0.6
    assert out["uno_c_index"] == pytest.approx(concordance_index_ipcw(train, test, r, tau=out["tau"])[0])
    lo, hi = out["c_index_ci95"]
    assert lo < out["c_index"] < hi and hi - lo < 0.25 and out["c_index_n_bootstrap_used"] == 200
    assert out["uno_c_index_ci95"][0] < out["uno_c_index"] < out["uno_c_index_ci95"][1]
    auc, mean_auc = cumulative_dynamic_auc(train, test, r, horizons)
    assert list(out["time_auc"].values()) == pytest.approx(list(auc))
    assert out["mean_time_auc"] == pytest.approx(mean_auc)
    keep = (grid >= t.min()) & (grid < min(t.max(), out["tau"]))
    assert out["integrated_brier_score"] == pytest.approx(integrated_brier_score(train, test, surv[:, keep],
                                                                                 grid[keep]))
    assert out["risk_groups"]["threshold"] == np.median(tr)
    again = survival_metrics(tt, te, tr, t, e, r, n_bootstrap=200, seed=0)
    assert again["c_index_ci95"] == out["c_index_ci95"]  # same seed, same interval


def test_bad_horizons_are_one_line_errors() -> None:
    _, tt, te = cohort(50, 11)
    _, t, e = cohort(30, 12)
    with pytest.raises(ConfigError, match="horizons must lie in") as err:
        survival_metrics(tt, te, tt, t, e, -t, horizons=[100.0], n_bootstrap=0)
    assert "\n" not in str(err.value)


def test_survival_report_files_reference_and_discrete_curves(tmp_path: Path) -> None:
    """write_survival_report: the training reference drives Uno's C and the risk groups; a discrete model's
    curves are its per-bin survival products (S = 1 before the first bin ends); out-of-range horizons noted."""
    from wsi_fl.evaluation.survival_report import _curves, write_survival_report
    from wsi_fl.mil.data import BagRecord
    from wsi_fl.mil.training import SurvivalPredictions

    _, tt, te = cohort(80, 0)
    _, t, e = cohort(40, 1)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 3))
    s = np.exp(np.cumsum(np.log1p(-1 / (1 + np.exp(-logits))), axis=1))
    edges = [0.0, 0.3, 0.8, float(tt.max())]
    info = {"loss": "discrete", "bin_edges": edges, "train_time": tt.tolist(), "train_event": te.astype(int).tolist(),
            "train_risk": rng.normal(size=80).tolist(), "horizons": [0.2, 0.5, 50.0]}
    grid = np.array([0.1, 0.3, 0.5, 0.9])
    assert np.allclose(_curves(SurvivalPredictions([], t, e, -s.sum(1), logits), info, grid),
                       np.column_stack([np.ones(40), s[:, 0], s[:, 0], s[:, 1]]))
    ids = [f"s{i}" for i in range(40)]
    preds = SurvivalPredictions(ids, t, e, -s.sum(1), logits)
    records = [BagRecord(i, "1", 1, f"p{i}", None, float(ti), bool(ei)) for i, ti, ei in zip(ids, t, e, strict=True)]
    from wsi_fl.evaluation.options import EvalOptions

    m = write_survival_report(tmp_path, preds, records, info, EvalOptions(n_bootstrap=50), title="x")
    assert m["n_bootstrap"] == 50 and len(m["c_index_ci95"]) == 2
    assert m["c_index"] == pytest.approx(harrell_c(t, e, -s.sum(1)))
    assert m["uno_c_index"] == pytest.approx(uno_c(tt, te, t, e, -s.sum(1)))
    assert m["horizons"] == [0.2, 0.5] and "50" in m["notes"][0] and set(m["time_auc"]) == {"0.2", "0.5"}
    assert m["risk_groups"]["threshold"] == pytest.approx(np.median(info["train_risk"]))
    assert 0 < m["integrated_brier_score"] < 1
    assert json.loads((tmp_path / "metrics.json").read_text())["c_index"] == m["c_index"]
    for name in ("predictions.csv", "km.png", "time_auc.png"):
        assert (tmp_path / name).stat().st_size > 0
