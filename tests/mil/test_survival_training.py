"""Survival training on bags: settings, survival bags and batches, Cox/discrete training, risk prediction, the
DP refusal of Cox, and survival bag tables' one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lifelines import CoxPHFitter

from models import MILConfig, create_model
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.survival import harrell_c
from wsi_fl.mil.config import SplitConfig, TrainConfig
from wsi_fl.mil.data import Bag, BagDataError, TableBagDataset, collate_bags
from wsi_fl.mil.survival import COX_CENTRING, check_dp_compatible, cox_loss
from wsi_fl.mil.training import SurvivalLoss, predict_risk, survival_outputs, train_model

DIM = 6


def bags(n: int, seed: int) -> TableBagDataset:
    """Bags of 8-16 instances; the share ``f`` of shifted instances sets the hazard ``exp(8 f)`` (oracle C ~0.82)."""
    rng = np.random.default_rng(seed)
    feats, times, events = [], [], []
    for _ in range(n):
        k = int(rng.integers(8, 16))
        f = rng.uniform(0, 0.7)
        x = rng.standard_normal((k, DIM)).astype(np.float32)
        x[: round(f * k), :2] += 3.0
        feats.append(torch.from_numpy(x))
        t, c = rng.exponential(np.exp(-8.0 * f)), rng.exponential(2.0)
        times.append(min(t, c))
        events.append(t <= c)
    return TableBagDataset(feats, [int(e) for e in events], [f"b{i}" for i in range(n)], ["0", "1"],
                           times=times, events=events)


def test_settings_validate_survival_fields() -> None:
    cfg = TrainConfig(task="survival", batch_size=8)
    assert (cfg.survival_loss, cfg.time_bins) == ("cox", 4) and SplitConfig().time_col == "time"
    assert SplitConfig().event_col == "event"
    for bad, match in (({"task": "regression"}, "task"), ({"survival_loss": "aft"}, "survival_loss"),
                       ({"task": "survival", "survival_loss": "discrete", "time_bins": 1}, "time_bins"),
                       ({"task": "survival"}, "batch-size >= 2")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**bad)
    TrainConfig(task="survival", survival_loss="discrete")  # one bag per step is fine: per-slide terms


def test_survival_bags_collate_with_time_event_and_stratum() -> None:
    x = torch.ones(3, DIM)
    batch = collate_bags([Bag(x, 1, "a", time=2.5, event=True, stratum=1), Bag(x[:2], 0, "b", time=4.0, event=False)])
    assert batch.time.tolist() == [2.5, 4.0] and batch.event.tolist() == [True, False]
    assert batch.stratum.tolist() == [1, 0] and batch.mask.sum().item() == 5
    plain = collate_bags([Bag(x, 1, "a")])
    assert plain.time is None and plain.event is None and plain.stratum is None
    with pytest.raises(BagDataError, match="survival and classification"):
        collate_bags([Bag(x, 1, "a", time=1.0, event=True), Bag(x, 0, "b")])


def test_batch_loss_is_cox_within_strata() -> None:
    torch.manual_seed(0)
    x = torch.ones(2, DIM)
    items = [Bag(x, 1, f"s{i}", time=float(t), event=bool(e), stratum=s)
             for i, (t, e, s) in enumerate([(1, 1, 0), (2, 1, 1), (3, 0, 0), (4, 1, 1), (0.5, 1, 1)])]
    batch = collate_bags(items)
    logits = torch.randn(5, 2)
    eta = logits[:, 1] - logits[:, 0]
    got = SurvivalLoss("cox", centring=0.0)(logits, batch)
    assert torch.allclose(got, cox_loss(eta, batch.time, batch.event, batch.stratum))
    assert not torch.allclose(got, cox_loss(eta, batch.time, batch.event))  # the strata matter
    # Training's default adds the centring term, which only sees the level of the scores: shifting every eta
    # leaves the partial likelihood unchanged and moves the loss by exactly the term's change.
    centred = SurvivalLoss("cox")
    assert torch.allclose(centred(logits, batch), got + COX_CENTRING * eta.mean() ** 2)
    shifted = logits + torch.tensor([0.0, 7.0])
    assert torch.allclose(SurvivalLoss("cox", centring=0.0)(shifted, batch), got)
    m = eta.mean()
    assert torch.allclose(centred(shifted, batch) - centred(logits, batch), COX_CENTRING * ((m + 7) ** 2 - m ** 2))


def test_batch_cox_loss_at_lifelines_coefficients_is_its_log_likelihood() -> None:
    """One-instance bags through the training loss: the partial likelihood lifelines maximises."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 2))
    t = rng.exponential(np.exp(-x @ np.array([0.9, -0.4])))
    c = rng.exponential(1.5, size=40)
    time, event = np.minimum(t, c), (t <= c)
    import pandas as pd

    fit = CoxPHFitter().fit(pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "T": time, "E": event.astype(int)}),
                            "T", "E")
    eta = torch.as_tensor(x @ fit.params_.to_numpy())
    batch = collate_bags([Bag(torch.zeros(1, 1), int(e), f"s{i}", time=float(ti), event=bool(e))
                          for i, (ti, e) in enumerate(zip(time, event, strict=True))])
    logits = torch.stack([torch.zeros_like(eta), eta], dim=1)
    loss = SurvivalLoss("cox", centring=0.0)(logits, batch)
    assert float(loss) * event.sum() == pytest.approx(-fit.log_likelihood_, rel=1e-6)


@pytest.mark.parametrize("loss", ["cox", "discrete"])
def test_train_model_learns_survival_and_predicts_risk(loss: str) -> None:
    torch.set_num_threads(1)
    train, val, test = bags(120, 0), bags(30, 1), bags(60, 2)
    cfg = TrainConfig(epochs=25, lr=2e-3, patience=25, seed=0, task="survival", survival_loss=loss, batch_size=16,
                      early_stopping="cindex")
    n_out, edges = survival_outputs(train, cfg)
    torch.manual_seed(0)
    model = create_model(MILConfig(in_dim=DIM, n_classes=n_out, hidden_dim=32, attn_dim=16))
    result = train_model(model, train, val, cfg)
    assert {"train_loss", "val_loss", "val_c_index"} <= set(result.history[0])
    if loss == "discrete":
        assert n_out == 4 and np.array_equal(result.bin_edges, edges) and edges[0] == 0
    else:
        assert result.bin_edges is None and n_out == 2
    preds = predict_risk(result.model, test, cfg if loss == "cox" else result.bin_edges)
    assert preds.slide_ids == list(test.groups) and preds.risk.shape == (60,) and np.isfinite(preds.risk).all()
    assert np.array_equal(preds.time, test.times) and np.array_equal(preds.event, test.events)
    assert harrell_c(preds.time, preds.event, preds.risk) >= 0.7  # higher risk = earlier event


def test_survival_model_of_the_wrong_size_is_refused() -> None:
    cfg = TrainConfig(task="survival", survival_loss="discrete", time_bins=3, epochs=1)
    model = create_model(MILConfig(in_dim=DIM, n_classes=2))
    with pytest.raises(ConfigError, match="needs 3 outputs"):
        train_model(model, bags(20, 0), None, cfg)


def test_cox_is_refused_under_dp_in_one_line() -> None:
    with pytest.raises(ConfigError, match="Cox loss cannot be trained under slide-level DP-SGD") as err:
        check_dp_compatible("cox", True)
    assert "\n" not in str(err.value) and "discrete" in str(err.value)
    check_dp_compatible("discrete", True)
    check_dp_compatible("cox", False)


def test_survival_bag_table(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("time,event,bag,0,1\n3.5,1,a,0.1,0.2\n3.5,1,a,0.3,0.4\n7,0,b,1,2\n")
    ds = TableBagDataset.from_csv(path, task="survival")
    assert list(ds.groups) == ["a", "b"] and ds.times.tolist() == [3.5, 7.0] and ds.events.tolist() == [True, False]
    assert ds[0].time == 3.5 and ds[0].event is True and ds[0].features.shape == (2, 2)
    sub = ds.subset([1])
    assert sub.times.tolist() == [7.0] and sub[0].event is False
    assert TableBagDataset.from_csv(tmp_path / "t.csv", task="survival").classes == ["0", "1"]


@pytest.mark.parametrize(("text", "message"), [
    ("time,event,bag,0\n-1,1,a,0.1\n", "t.csv:2: bag a: time must be a finite number >= 0, not -1"),
    ("time,event,bag,0\n1,2,a,0.1\n", "t.csv:2: bag a: event must be 0 (censored) or 1, not '2'"),
    ("time,event,bag,0\nsoon,1,a,0.1\n", "t.csv:2: bag a: time 'soon' is not a number"),
    ("event,bag,0\n1,a,0.1\n", "t.csv: expected header time,event,bag,<features...>"),
    ("time,event,bag,0\n1,1,a,0.1\n2,1,a,0.1\n", "t.csv: bag a has instances with different time/event"),
])
def test_bad_survival_bag_tables_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(BagDataError) as err:
        TableBagDataset.from_csv(tmp_path / "t.csv", task="survival")
    assert message in str(err.value) and "\n" not in str(err.value)
