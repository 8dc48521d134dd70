"""Survival losses against lifelines, scikit-survival and direct numpy; survival label tables' one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from wsi_fl.errors import ConfigError
from wsi_fl.mil.survival import (
    cox_loss,
    discrete_time_bins,
    discrete_time_loss,
    log_risk,
    risk,
    survival_curves,
    time_bins,
)
from wsi_fl.mil.survival_labels import SurvivalLabelError, read_survival_labels


def cohort(n: int = 60, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    t = rng.exponential(np.exp(-(x @ np.array([0.8, -0.5, 0.0]))))
    t = np.ceil(t * 4) / 4 if ties else t
    c = rng.exponential(1.5, size=n)
    return x, np.minimum(t, c) + (0.0 if ties else 1e-9), (t <= c).astype(int)


def breslow_reference(eta, time, event, strata=None) -> float:
    """Direct loops: the negative Breslow partial log-likelihood, risk sets within a stratum."""
    strata = np.zeros(len(eta)) if strata is None else strata
    total = 0.0
    for i in np.flatnonzero(event):
        at_risk = (time >= time[i]) & (strata == strata[i])
        total -= eta[i] - math.log(np.exp(eta[at_risk]).sum())
    return total


def test_cox_loss_at_lifelines_fit_is_its_partial_log_likelihood() -> None:
    x, t, e = cohort()
    assert len(np.unique(t[e == 1])) == e.sum()  # no tied event times: lifelines' Efron = Breslow
    df = pd.DataFrame(x, columns=["a", "b", "c"]).assign(time=t, event=e)
    fit = CoxPHFitter().fit(df, "time", "event")
    eta = torch.tensor(x @ fit.params_[["a", "b", "c"]].to_numpy())
    loss = cox_loss(eta, torch.tensor(t), torch.tensor(e), reduction="sum")
    assert float(loss) == pytest.approx(-fit.log_likelihood_, rel=1e-6)
    assert float(cox_loss(eta, torch.tensor(t), torch.tensor(e))) == pytest.approx(-fit.log_likelihood_ / e.sum())


def test_stratified_cox_loss_matches_lifelines_strata_and_never_crosses_sites() -> None:
    x, t, e = cohort(90, seed=1)
    site = np.repeat([0, 1, 2], 30)
    df = pd.DataFrame(x, columns=["a", "b", "c"]).assign(time=t, event=e, site=site)
    fit = CoxPHFitter().fit(df, "time", "event", strata=["site"])
    eta = torch.tensor(x @ fit.params_[["a", "b", "c"]].to_numpy())
    loss = cox_loss(eta, torch.tensor(t), torch.tensor(e), torch.tensor(site), reduction="sum")
    assert float(loss) == pytest.approx(-fit.log_likelihood_, rel=1e-6)
    per_site = sum(float(cox_loss(eta[site == s], torch.tensor(t[site == s]), torch.tensor(e[site == s]),
                                  reduction="sum")) for s in range(3))
    assert float(loss) == pytest.approx(per_site, rel=1e-12)
    # Shifting one site's log-risks (its own baseline hazard) changes nothing: no cross-site comparison.
    shifted = eta + torch.tensor(np.where(site == 2, 5.0, 0.0))
    assert float(cox_loss(shifted, torch.tensor(t), torch.tensor(e), torch.tensor(site), reduction="sum")) == \
        pytest.approx(float(loss), rel=1e-9)


def test_cox_loss_breslow_ties_by_hand_and_at_the_sksurv_breslow_optimum() -> None:
    eta = torch.tensor([0.0, math.log(2), 0.0, math.log(3)])
    loss = cox_loss(eta, torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([1, 1, 0, 1]), reduction="sum")
    # Both events at t=1 see the whole risk set {1, 2, 1, 3}; the event at t=3 is alone in its risk set.
    assert float(loss) == pytest.approx(2 * math.log(7) - math.log(2))
    x, t, e = cohort(80, seed=2, ties=True)
    assert len(np.unique(t[e == 1])) < e.sum()  # tied event times
    beta = CoxPHSurvivalAnalysis(ties="breslow").fit(x, Surv.from_arrays(e.astype(bool), t)).coef_
    b = torch.tensor(beta, requires_grad=True)
    ours = cox_loss(torch.tensor(x) @ b, torch.tensor(t), torch.tensor(e), reduction="sum")
    ours.backward()
    assert b.grad.abs().max() < 1e-4  # sksurv's Breslow maximiser is a stationary point of our loss
    assert float(ours.detach()) == pytest.approx(breslow_reference(x @ beta, t, e), rel=1e-10)


def test_cox_loss_edge_cases() -> None:
    eta = torch.randn(4, requires_grad=True)
    zero = cox_loss(eta, torch.arange(4.0), torch.zeros(4))
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.equal(eta.grad, torch.zeros(4))
    assert torch.equal(log_risk(torch.tensor([[1.0, 3.0]])), torch.tensor([2.0]))
    assert torch.equal(log_risk(torch.tensor([[1.5]])), torch.tensor([1.5]))
    with pytest.raises(ConfigError, match="1 or 2 outputs"):
        log_risk(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one entry per slide"):
        cox_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3))


def discrete_reference(logits: np.ndarray, bins: np.ndarray, event: np.ndarray) -> float:
    h = 1 / (1 + np.exp(-logits))
    total = 0.0
    for row, k, d in zip(h, bins, event, strict=True):
        total -= np.log(row[k]) + np.log(1 - row[:k]).sum() if d else np.log(1 - row[: k + 1]).sum()
    return total / len(bins)


def test_discrete_time_loss_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(20, 4))
    bins, event = rng.integers(0, 4, 20), rng.integers(0, 2, 20)
    ours = discrete_time_loss(torch.tensor(logits), torch.tensor(bins), torch.tensor(event))
    assert float(ours) == pytest.approx(discrete_reference(logits, bins, event), rel=1e-10)
    # Extreme logits: finite, where log(sigmoid) computed naively would be log(0).
    big = torch.tensor([[80.0, -80.0], [-80.0, 80.0]])
    assert torch.isfinite(discrete_time_loss(big, torch.tensor([1, 0]), torch.tensor([1, 0])))


def test_discrete_time_bins_from_event_time_quantiles() -> None:
    time = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 100])
    event = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0])
    edges = discrete_time_bins(time, event, 4)
    np.testing.assert_allclose(edges, [0, 2.75, 4.5, 6.25, 100])
    assert time_bins(np.array([0.5, 2.75, 2.76, 100, 250]), edges).tolist() == [0, 0, 1, 3, 3]
    assert len(discrete_time_bins(np.array([1.0, 1, 1, 2, 9]), np.array([1, 1, 1, 1, 0]), 4)) == 4  # 3 bins
    with pytest.raises(ConfigError, match="at least one event"):
        discrete_time_bins(time, np.zeros(9), 4)
    with pytest.raises(ConfigError, match="at least 2 bins"):
        discrete_time_bins(time, event, 1)


def test_risk_conventions_order_patients_by_hazard() -> None:
    logits = torch.tensor([[-3.0, -3.0, -3.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    s = survival_curves(logits)
    assert torch.all(s[:, 1:] <= s[:, :-1])  # survival never increases
    torch.testing.assert_close(s[1], torch.tensor([0.5, 0.25, 0.125]))
    r = risk(logits, "discrete")
    assert r[0] < r[1] < r[2]
    torch.testing.assert_close(r[1], torch.tensor(-0.875))
    with pytest.raises(ConfigError, match="cox or discrete"):
        risk(logits, "weibull")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_survival_labels_read_with_settable_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "slide_id,os_months,dead,label\na,12.5,1,x\nb,0,0,y\n\n")
    assert read_survival_labels(path, time_col="os_months", event_col="dead") == {"a": (12.5, True), "b": (0.0, False)}


@pytest.mark.parametrize(("text", "message"), [
    ("slide_id,time\na,1\n", "labels.csv: missing column\\(s\\) event"),
    ("slide_id,time,event\na,1,1\nb,-2,0\n", "labels.csv:3: slide b: time must be a finite number >= 0, not -2"),
    ("slide_id,time,event\na,soon,1\n", "labels.csv:2: slide a: time 'soon' is not a number"),
    ("slide_id,time,event\na,nan,1\n", "labels.csv:2: slide a: time must be a finite"),
    ("slide_id,time,event\na,1,2\n", "labels.csv:2: slide a: event must be 0 \\(censored\\) or 1 \\(event\\), not '2'"),
    ("slide_id,time,event\na,1,yes\n", "labels.csv:2: slide a: event must be 0"),
    ("slide_id,time,event\na,1,1\na,2,0\n", "labels.csv:3: duplicate slide_id a"),
    ("", "empty label file"),
])
def test_bad_survival_labels_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SurvivalLabelError, match=message) as err:
        read_survival_labels(write(tmp_path, text))
    assert "\n" not in str(err.value) and isinstance(err.value, ConfigError)
