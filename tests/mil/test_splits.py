"""Patient-level splits: disjoint by patient, covering, stratified, reproducible."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from wsi_fl.mil.data import BagRecord, TableBagDataset
from wsi_fl.mil.splits import (
    assert_patient_disjoint,
    labels_digest,
    patient_kfold,
    splits_from_column,
    train_val_split,
    train_val_test_split,
)


def _cohort(n_patients: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1-4 slides per patient, about a third positive; slides of one patient mostly share the label."""
    rng = np.random.default_rng(seed)
    targets, groups = [], []
    for p in range(n_patients):
        label = int(rng.random() < 0.35)
        for _ in range(rng.integers(1, 5)):
            targets.append(label if rng.random() < 0.9 else 1 - label)
            groups.append(f"P{p:03d}")
    return np.array(targets), np.array(groups)


def _patients(groups, idx) -> set[str]:
    return set(groups[idx].tolist())


def test_kfold_patient_disjoint_covering_and_stratified():
    y, g = _cohort()
    folds = patient_kfold(y, g, n_splits=5, seed=3)
    assert len(folds) == 5
    test_count = np.zeros(y.size, dtype=int)
    for train, test in folds:
        assert not _patients(g, train) & _patients(g, test)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(y.size))
        test_count[test] += 1
        assert abs(y[test].mean() - y.mean()) < 0.12  # stratification roughly kept
    assert (test_count == 1).all()  # every sample in exactly one test fold
    test_patients = [_patients(g, te) for _, te in folds]
    assert sum(len(p) for p in test_patients) == len(set(g.tolist()))  # no patient in two folds


def test_kfold_reproducible_per_seed():
    y, g = _cohort()
    a, b, c = (patient_kfold(y, g, 5, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x[1], z[1]) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x[1], z[1]) for x, z in zip(a, c, strict=True))


def test_kfold_refuses_class_with_fewer_patients_than_folds():
    y = np.array([0] * 20 + [1] * 6)
    g = np.array([f"N{i}" for i in range(20)] + ["A", "A", "B", "B", "C", "C"])  # 3 positive patients, 6 slides
    with pytest.raises(ValueError, match=r"class 1 has only 3 patient\(s\), fewer than n_splits=5"):
        patient_kfold(y, g, n_splits=5, seed=0)
    assert len(patient_kfold(y, g, n_splits=3, seed=0)) == 3


def test_kfold_on_real_musk1_bags(mil_file):
    ds = TableBagDataset.from_csv(mil_file("musk1.csv"))
    folds = patient_kfold(ds.targets, ds.groups, n_splits=10, seed=0)
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(92))
    assert all(3 <= ds.targets[te].sum() <= 6 for _, te in folds)  # 47 positives over 10 folds of ~9


@pytest.mark.parametrize("val_frac", [0.1, 0.15, 0.25, 0.5])
def test_train_val_split_disjoint_sized_and_stratified(val_frac):
    y, g = _cohort(n_patients=80)
    train, val = train_val_split(y, g, val_frac, seed=0)
    assert not _patients(g, train) & _patients(g, val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(y.size))
    assert abs(val.size / y.size - val_frac) < 0.06
    assert abs(y[val].mean() - y.mean()) < 0.12
    again, _ = train_val_split(y, g, val_frac, seed=0)
    assert np.array_equal(train, again)


def test_train_val_split_few_patients_and_bad_fraction():
    y = np.array([0, 0, 1, 1, 1])
    g = np.array(["a", "a", "b", "c", "c"])
    train, val = train_val_split(y, g, 0.2, seed=0)
    assert train.size and val.size and not _patients(g, train) & _patients(g, val)
    with pytest.raises(ValueError, match="val_frac"):
        train_val_split(y, g, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2 patients"):
        train_val_split(y[:2], g[:2], 0.5, seed=0)


def test_train_val_test_split_three_way():
    y, g = _cohort(n_patients=100, seed=5)
    train, val, test = train_val_test_split(y, g, val_frac=0.15, test_frac=0.2, seed=7)
    assert_patient_disjoint(g, train, val, test)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(y.size))
    assert abs(test.size / y.size - 0.2) < 0.06 and abs(val.size / y.size - 0.15) < 0.06
    for part in (train, val, test):
        assert abs(y[part].mean() - y.mean()) < 0.12
    with pytest.raises(ValueError, match="val_frac"):
        train_val_test_split(y, g, val_frac=0.5, test_frac=0.5)


def test_multi_slide_patients_stay_together():
    y, g = _cohort(n_patients=40, seed=11)
    multi = {p for p in set(g.tolist()) if (g == p).sum() > 1}
    assert multi
    parts = [*train_val_test_split(y, g, seed=1), *train_val_split(y, g, 0.3, seed=2)]
    parts += [te for _, te in patient_kfold(y, g, 4, seed=0)]
    for idx in parts:
        for p in _patients(g, idx) & multi:
            assert set(np.flatnonzero(g == p).tolist()) <= set(idx.tolist())  # all of p's slides, not some


def test_assert_patient_disjoint_names_the_patient():
    g = np.array(["p1", "p1", "p2", "p3"])
    assert_patient_disjoint(g, [0, 1], [2], [3])
    with pytest.raises(ValueError, match="patient p1 is in both index set 0 and index set 2"):
        assert_patient_disjoint(g, [0], [2, 3], [1])


def _rec(slide, patient, split, target=0):
    return BagRecord(slide, str(target), target, patient, split)


def test_splits_from_column():
    recs = [_rec("a", "P1", "train"), _rec("b", "P1", "train"), _rec("c", "P2", "test"), _rec("d", "P3", "val")]
    out = splits_from_column(recs)
    assert {k: v.tolist() for k, v in out.items()} == {"train": [0, 1], "val": [3], "test": [2]}
    assert splits_from_column([_rec("a", "P1", None), _rec("b", "P2", None)]) is None
    with pytest.raises(ValueError, match="partly filled: 1 slide"):
        splits_from_column([_rec("a", "P1", "train"), _rec("b", "P2", None)])
    with pytest.raises(ValueError, match="patient P1 is in both train and test"):
        splits_from_column([_rec("a", "P1", "train"), _rec("b", "P1", "test")])


def test_leave_one_site_out_holds_each_site_out_once():
    from wsi_fl.mil.splits import leave_one_site_out

    folds = leave_one_site_out(["site_1", "site_2", "site_3"])
    assert [held for held, _ in folds] == ["site_1", "site_2", "site_3"]
    for held, train in folds:
        assert held not in train and sorted([held, *train]) == ["site_1", "site_2", "site_3"]


def test_leave_one_site_out_refuses_one_site_or_duplicates():
    from wsi_fl.errors import ConfigError
    from wsi_fl.mil.splits import leave_one_site_out

    with pytest.raises(ConfigError, match="at least 2 sites"):
        leave_one_site_out(["site_1"])
    with pytest.raises(ConfigError, match="'a' is named twice"):
        leave_one_site_out(["a", "b", "a"])


def test_site_fold_indices_never_train_on_the_held_out_site():
    from wsi_fl.errors import ConfigError
    from wsi_fl.mil.splits import site_fold_indices

    sites = np.array(["a", "b", "a", "c", "b", "c", "c"])
    for held in ("a", "b", "c"):
        train, test = site_fold_indices(sites, held)
        assert set(sites[test]) == {held} and held not in set(sites[train])
        assert sorted([*train, *test]) == list(range(len(sites)))
    with pytest.raises(ConfigError, match="no sample of site 'd'"):
        site_fold_indices(sites, "d")
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        site_fold_indices(["a", "a"], "a")


def test_labels_digest_sees_a_survival_time_change_and_keeps_classification_digests():
    cls = [BagRecord("s1", "pos", 1, "p1", None), BagRecord("s0", "neg", 0, "p0", "test")]
    h = hashlib.sha256()
    for line in ("s0\tneg\tp0\ttest\n", "s1\tpos\tp1\t\n"):  # the format checkpoints already hold
        h.update(line.encode())
    assert labels_digest(cls) == f"sha256:{h.hexdigest()}"
    surv = [BagRecord("s0", "1", 1, "p0", None, time=12.5, event=True),
            BagRecord("s1", "0", 0, "p1", None, time=40.0, event=False)]
    moved = [surv[0], BagRecord("s1", "0", 0, "p1", None, time=41.0, event=False)]
    assert labels_digest(surv) != labels_digest(moved)  # the event is the label; the time must count too
    assert labels_digest(surv) == labels_digest(list(reversed(surv)))
