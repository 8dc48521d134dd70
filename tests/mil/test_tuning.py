"""Nested-CV tuning (wsi_fl.mil.tuning): it chooses on inner folds of the training bags and never reads a test bag."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import MILConfig
from wsi_fl.benchmarks.mil import BenchmarkConfig, standardise, tune_fold
from wsi_fl.errors import ConfigError
from wsi_fl.mil.config import TrainConfig
from wsi_fl.mil.splits import patient_kfold
from wsi_fl.mil.tables import TableBagDataset
from wsi_fl.mil.tuning import TuneGrid, tune

TINY = TuneGrid(lr=(1e-7, 5e-3), weight_decay=(1e-4,), hidden_dim=(16,), epochs=(1, 8), inner_folds=2)


def key_instance_bags(n_bags: int = 40, dim: int = 6, seed: int = 0) -> TableBagDataset:
    """Bags of 3-6 Gaussian instances; a positive bag holds one key instance shifted by +3 on feature 0."""
    rng = np.random.default_rng(seed)
    feats, targets = [], []
    for b in range(n_bags):
        x = rng.normal(size=(int(rng.integers(3, 7)), dim)).astype(np.float32)
        y = b % 2
        if y:
            x[0, 0] += 3.0
        feats.append(torch.from_numpy(x))
        targets.append(y)
    return TableBagDataset(feats, targets, [f"b{i}" for i in range(n_bags)], ["0", "1"])


class RecordingBags(TableBagDataset):
    """A bag table that remembers every index read through ``subset`` or ``__getitem__``."""

    seen: set[int]

    def subset(self, indices):
        self.seen.update(int(i) for i in indices)
        return super().subset(indices)

    def __getitem__(self, i):
        self.seen.add(int(i))
        return super().__getitem__(i)


def _recording(data: TableBagDataset) -> RecordingBags:
    rec = RecordingBags(data.features, data.targets, data.groups, data.classes)
    rec.seen = set()
    return rec


@pytest.mark.slow
def test_tune_fold_reads_only_the_outer_training_bags():
    data = _recording(key_instance_bags())
    train_idx, test_idx = patient_kfold(data.targets, data.groups, 4, seed=0)[0]
    cfg = BenchmarkConfig(folds=4, repeats=1, model="attention", tune=True)
    result = tune_fold(data, train_idx, cfg, seed=0, grid=TINY)
    assert data.seen and data.seen <= set(train_idx.tolist())
    assert not data.seen & set(test_idx.tolist())
    # and the choice is a function of the training bags alone: garbling every test bag changes nothing
    garbled = TableBagDataset(list(data.features), data.targets.copy(), data.groups, data.classes)
    for i in test_idx:
        garbled.features[i] = torch.full_like(garbled.features[i], float("nan"))
        garbled.targets[i] = 1 - garbled.targets[i]
    again = tune_fold(garbled, train_idx, cfg, seed=0, grid=TINY)
    assert again.best == result.best and again.table == result.table


def test_tune_calls_make_sets_with_training_indices_only_and_picks_the_learning_setting():
    data = key_instance_bags(32)
    calls = []

    def make_sets(tr, va):
        calls.append((tr, va))
        return tuple(standardise(data.subset(tr), data.subset(va)))

    model = MILConfig(model="attention", in_dim=data.feature_dim, n_classes=2)
    train = TrainConfig(early_stopping="none", class_weighting=False, device="cpu")
    result = tune(data.targets, data.groups, make_sets, model, train, TINY, seed=1)
    assert len(calls) == TINY.inner_folds
    for tr, va in calls:  # inner folds partition the given training set, patient-disjoint
        assert not set(tr) & set(va) and sorted([*tr, *va]) == list(range(len(data)))
    assert len(result.table) == len(TINY.points()) * len(TINY.epochs)
    # lr 1e-7 cannot learn in 8 epochs; 5e-3 finds the key instance
    assert result.best["lr"] == 5e-3 and result.best["epochs"] == 8 and result.score > 0.8
    tuned_model, tuned_train = result.apply(model, train)
    assert tuned_model.hidden_dim == 16 and tuned_model.attn_dim == 8
    assert (tuned_train.lr, tuned_train.epochs, tuned_train.weight_decay) == (5e-3, 8, 1e-4)


@pytest.mark.parametrize("bad", [dict(inner_folds=1), dict(lr=()), dict(epochs=(0, 5)), dict(weight_decay=(-1.0,))])
def test_tune_grid_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        TuneGrid(**bad)


def test_default_grid_is_small():
    grid = TuneGrid()
    assert len(grid.points()) * grid.inner_folds <= 24 and max(grid.epochs) == 40


@pytest.mark.slow
def test_train_cli_tune_uses_only_training_split_slides(tmp_path, monkeypatch, capsys):
    """``wsi-fl train --tune``: inner folds over the training split fit() draws, then the final fit."""
    import csv

    from bagsites import make_site

    from models.checkpoint import load_checkpoint
    from wsi_fl.cli import main
    from wsi_fl.mil import fit as fit_module
    from wsi_fl.mil import tuning

    monkeypatch.setattr(tuning, "DEFAULT_GRID", TuneGrid(lr=(1e-7, 3e-3), weight_decay=(1e-4,), hidden_dim=(16,),
                                                         epochs=(2, 6), inner_folds=2))
    site = make_site(tmp_path, "a", 24, seed=3)
    read: list[str] = []
    real_build = fit_module.build_dataset

    def recording_build(pairs, indices, **kw):
        read.extend(pairs[int(i)][1].slide_id for i in indices)
        return real_build(pairs, indices, **kw)

    real_fit = fit_module.fit

    def marked_fit(*a, **kw):
        read.append("<fit>")
        return real_fit(*a, **kw)

    monkeypatch.setattr(fit_module, "build_dataset", recording_build)
    monkeypatch.setattr(fit_module, "fit", marked_fit)
    code = main(["train", "--features", str(site.features_dir), "--labels", str(site.labels), "--out",
                 str(tmp_path / "run"), "--model", "attention", "--tune", "--quiet", "--bootstrap", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    tuned = json.loads(next(line for line in out.splitlines() if line.startswith("tuned:"))[len("tuned:"):])
    assert tuned["lr"] == 3e-3 and tuned["hidden_dim"] == 16
    with open(tmp_path / "run" / "splits.csv") as f:
        split_of = {r["slide_id"]: r["split"] for r in csv.DictReader(f)}
    tuning_reads = read[:read.index("<fit>")]
    assert tuning_reads and {split_of[s] for s in tuning_reads} == {"train"}
    model, ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert model.config.hidden_dim == 16 and ckpt.meta["train_config"]["lr"] == 3e-3
