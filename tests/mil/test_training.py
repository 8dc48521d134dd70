"""The training loop: class weighting, early stopping, per-epoch subsampling through pooled datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import MILConfig, create_model
from wsi_fl.mil.data import Bag, TableBagDataset
from wsi_fl.mil.training import (
    TrainConfig,
    auc_score,
    class_weights,
    concat_datasets,
    predict,
    set_epoch,
    train_model,
)


def _table(n_bags: int, seed: int, shift: float = 4.0) -> TableBagDataset:
    rng = np.random.default_rng(seed)
    feats, targets = [], []
    for i in range(n_bags):
        x = rng.standard_normal((int(rng.integers(5, 15)), 8)).astype(np.float32)
        if i % 2:
            x[:2, 0] += shift
        feats.append(torch.from_numpy(x))
        targets.append(i % 2)
    return TableBagDataset(feats, targets, [str(i) for i in range(n_bags)], ["0", "1"])


def test_class_weights_inverse_frequency():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_training_learns_a_planted_signal_and_is_seeded():
    train, val = _table(40, 0), _table(20, 1)
    cfg = TrainConfig(epochs=10, lr=1e-3, seed=3, early_stopping="auc")
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        res = train_model(create_model(MILConfig(model="attention", in_dim=8, hidden_dim=32, attn_dim=16)),
                          train, val, cfg)
        runs.append(predict(res.model, val).probs)
        assert 0 <= res.best_epoch < 10 and {"train_loss", "val_auc", "val_loss"} <= set(res.history[0])
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)
    assert auc_score(np.array(val.targets), runs[0]) > 0.9


def test_early_stopping_stops_and_restores_best():
    train, val = _table(20, 0, shift=0.0), _table(10, 1, shift=0.0)  # nothing to learn: validation stalls
    res = train_model(create_model(MILConfig(model="mean", in_dim=8, hidden_dim=8)), train, val,
                      TrainConfig(epochs=50, patience=3, lr=1e-2, early_stopping="loss"))
    assert len(res.history) < 50 and res.best_epoch == len(res.history) - 4


class _Counting(torch.utils.data.Dataset):
    def __init__(self):
        self.epochs = []
        self.targets = np.array([0, 1])

    def set_epoch(self, e):
        self.epochs.append(e)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return Bag(torch.zeros(1, 2), int(self.targets[i]), str(i))


def test_set_epoch_reaches_datasets_inside_pools_and_subsets():
    a, b = _Counting(), _Counting()
    pooled = concat_datasets([a, torch.utils.data.Subset(b, [0])])
    set_epoch(pooled, 7)
    assert a.epochs == [7] and b.epochs == [7]
    assert pooled.targets.tolist() == [0, 1, 0]


def test_class_weights_count_at_one_bag_per_step():
    """A single bag's loss is w_y * NLL (plain CrossEntropyLoss(weight) would divide the weight out again)."""
    from wsi_fl.mil.training import BagCrossEntropy

    weight = torch.tensor([0.5, 3.0])
    criterion = BagCrossEntropy(weight=weight)
    logits = torch.tensor([[0.3, -0.2]])
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor([1]))
    assert criterion(logits, torch.tensor([1])).item() == pytest.approx(3.0 * nll.item())
    batch = torch.tensor([[0.3, -0.2], [1.0, 0.0]])
    per_bag = torch.nn.functional.cross_entropy(batch, torch.tensor([1, 0]), reduction="none")
    expected = (3.0 * per_bag[0] + 0.5 * per_bag[1]).item() / 2
    assert criterion(batch, torch.tensor([1, 0])).item() == pytest.approx(expected)
