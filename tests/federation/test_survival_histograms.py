"""Pooled survival metrics from summed site histograms equal the pooled computation on raw scores, up to binning."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from wsi_fl.federation.survival_histograms import (
    histogram_c_index,
    histogram_time_auc,
    survival_histograms,
    uniform_edges,
)


def site_data(n: int, seed: int, shift: float):
    """One site's test patients: risk-dependent exponential times, its own censoring and case mix."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(shift, 1.0, size=n)
    t = rng.exponential(np.exp(-risk))
    c = rng.exponential(1.5 + shift, size=n)
    return np.minimum(t, c), t <= c, risk + rng.normal(0, 0.7, size=n)  # a noisy model's scores


SITES = [site_data(150, 0, 0.0), site_data(90, 1, 0.5), site_data(220, 2, -0.3)]


@pytest.mark.parametrize("bins", [64, 128])
def test_pooled_histogram_c_index_equals_pooled_harrell_c(bins: int) -> None:
    time_edges, risk_edges = uniform_edges(0.0, 4.0, bins), uniform_edges(-4.0, 4.0, bins)
    sent = [survival_histograms(t, e, r, time_edges, risk_edges) for t, e, r in SITES]
    pooled_hist = sum(sent)
    t, e, r = (np.concatenate(parts) for parts in zip(*SITES, strict=True))
    expected = concordance_index_censored(e, t, r)[0]
    assert 0.65 < expected < 0.9
    assert abs(histogram_c_index(pooled_hist) - expected) < 0.01
    # Each site's own histogram gives its own C the same way.
    for (ts, es, rs), h in zip(SITES, sent, strict=True):
        assert abs(histogram_c_index(h) - concordance_index_censored(es, ts, rs)[0]) < 0.015


def test_what_a_site_sends_is_counts_only() -> None:
    time_edges, risk_edges = uniform_edges(0.0, 4.0, 64), uniform_edges(-4.0, 4.0, 64)
    t, e, r = SITES[0]
    h = survival_histograms(t, e, r, time_edges, risk_edges)
    assert h.dtype == np.int64 and h.shape == (2, 64, 64)  # the shape is the agreed grid's, not the site's size
    assert h.sum() == len(t) and h[0].sum() == e.sum()
    assert not set(np.unique(h).tolist()) & set(np.concatenate([t, r]).tolist())  # no time or score in it
    # A patient's exact values do not matter within a cell: moving one inside its cell sends the same message.
    t2 = t.copy()
    t2[0] = time_edges[np.searchsorted(time_edges, t[0], side="right") - 1] if t[0] < 4.0 else t[0]
    assert np.array_equal(survival_histograms(t2, e, r, time_edges, risk_edges), h)


def test_histogram_time_auc_equals_the_auc_of_cases_against_controls() -> None:
    time_edges, risk_edges = uniform_edges(0.0, 4.0, 128), uniform_edges(-4.0, 4.0, 128)
    pooled = sum(survival_histograms(t, e, r, time_edges, risk_edges) for t, e, r in SITES)
    t, e, r = (np.concatenate(parts) for parts in zip(*SITES, strict=True))
    for horizon in (time_edges[16], time_edges[32]):
        cases, controls = e & (t < horizon), t >= horizon
        labels = np.r_[np.ones(cases.sum()), np.zeros(controls.sum())]
        expected = roc_auc_score(labels, np.r_[r[cases], r[controls]])
        assert abs(histogram_time_auc(pooled, time_edges, horizon) - expected) < 0.01
    with pytest.raises(ValueError, match="inner time edge"):
        histogram_time_auc(pooled, time_edges, 0.3)


def test_hand_example_and_degenerate_inputs() -> None:
    edges = uniform_edges(0.0, 4.0, 4)
    # Times 0.5 (event, risk 3), 1.5 (event, risk 2), 2.5 (censored, risk 2.2), 3.5 (event, risk 1).
    h = survival_histograms([0.5, 1.5, 2.5, 3.5], [1, 1, 0, 1], [3.0, 2.0, 2.2, 1.0], edges, edges)
    # Pairs: (0,1) (0,2) (0,3) concordant; (1,2): risk bins equal -> 1/2; (1,3) concordant. 4.5 / 5.
    assert histogram_c_index(h) == pytest.approx(0.9)
    assert np.isnan(histogram_c_index(np.zeros((2, 4, 4), dtype=np.int64)))
    with pytest.raises(ValueError, match="integer counts"):
        histogram_c_index(h.astype(float))
    with pytest.raises(ValueError, match="lo < hi"):
        uniform_edges(1.0, 1.0, 8)
