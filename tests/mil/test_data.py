"""Bag data: label CSVs, lazily read feature-file bags with their checks, instance tables, padded batches."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from preprocessing.h5format import REQUIRED_ATTRS, FeatureWriter
from wsi_fl.mil.data import (
    PROVENANCE_KEYS,
    Bag,
    BagDataError,
    BagRecord,
    FeatureBagDataset,
    TableBagDataset,
    collate_bags,
    read_labels,
)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# --- labels -----------------------------------------------------------------------------------------------------


def _csv(tmp_path, text: str, name: str = "labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_labels_numeric_classes_sorted_by_value_and_defaults(tmp_path):
    path = _csv(tmp_path, "slide_id,label\ns1,10\ns2,2\ns3,0\ns4,2\n")
    table = read_labels(path)
    assert table.classes == ["0", "2", "10"]  # by value, not "0","10","2"
    assert [(r.slide_id, r.label, r.target) for r in table.records] == [
        ("s1", "10", 2),
        ("s2", "2", 1),
        ("s3", "0", 0),
        ("s4", "2", 1),
    ]
    assert all(r.patient_id == r.slide_id and r.split is None for r in table.records)
    assert all(table.classes[r.target] == r.label for r in table.records)


def test_labels_outcome_column_patient_split_and_given_classes(tmp_path):
    path = _csv(
        tmp_path,
        "slide_id,patient_id,subtype,split,age\na1,P1,LUSC,train,60\na2,P1,LUAD,train,60\nb1,,LUAD,test,55\n",
    )
    table = read_labels(path, label_col="subtype", classes=["LUSC", "LUAD"])
    assert table.classes == ["LUSC", "LUAD"]  # given order fixes the index
    assert [r.target for r in table.records] == [0, 1, 1]
    assert [r.patient_id for r in table.records] == ["P1", "P1", "b1"]  # empty cell -> slide id
    assert [r.split for r in table.records] == ["train", "train", "test"]
    # different labels within one patient are allowed (per-slide labels)
    assert read_labels(path, label_col="subtype").classes == ["LUAD", "LUSC"]


def test_labels_unknown_class_names_file_line_and_value(tmp_path):
    path = _csv(tmp_path, "slide_id,label\ns1,tumor\ns2,normal\ns3,tumour\n")
    with pytest.raises(BagDataError) as err:
        read_labels(path, classes=["normal", "tumor"])
    msg = _one_line(err)
    assert f"{path}:4" in msg and "'tumour'" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("slide_id,label\ns1,0\ns2,1\ns1,1\n", "duplicate slide_id s1 (first on line 2)"),
        ("slide_id,diagnosis\ns1,0\n", "missing column(s) label"),
        ("label\n0\n", "missing column(s) slide_id"),
        ("", "empty label file"),
        ("slide_id,label\n", "no slides"),
        ("slide_id,label\ns1,0\ns2,\n", ":3: slide s2: empty label"),
        ("slide_id,label,split\ns1,0,training\n", "split 'training'"),
    ],
)
def test_labels_bad_files(tmp_path, text, expected):
    path = _csv(tmp_path, text)
    with pytest.raises(BagDataError) as err:
        read_labels(path)
    msg = _one_line(err)
    assert expected in msg and str(path) in msg


# --- feature-file bags --------------------------------------------------------------------------------------------


def _attrs(slide_id: str, **over):
    attrs = {k: f"v-{k}" for k in REQUIRED_ATTRS if k not in ("feature_dim", "feature_dtype")}
    attrs.update(slide_id=slide_id, mpp=0.5, target_mpp=0.5, tile_size=224, encoder="resnet50", weights="imagenet")
    attrs.update(over)
    return attrs


def _write_slide(directory, slide_id: str, n: int, dim: int = 8, dtype: str = "float32", seed: int = 0, **over):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    coords = rng.integers(0, 50_000, (n, 2))
    with FeatureWriter(directory / f"{slide_id}.h5", dim, _attrs(slide_id, **over), dtype=dtype) as w:
        if n:
            w.append(coords, feats)
        w.commit()
    return feats, coords


def _records(*ids: str, targets=None, patients=None) -> list[BagRecord]:
    targets = targets or [i % 2 for i in range(len(ids))]
    patients = patients or list(ids)
    return [BagRecord(s, str(t), t, p, None) for s, t, p in zip(ids, targets, patients, strict=True)]


def test_feature_bags_load_lazily_the_right_tensors(tmp_path):
    _write_slide(tmp_path, "s1", 30, seed=1)
    f2, c2 = _write_slide(tmp_path, "s2", 7, dtype="float16", seed=2)
    ds = FeatureBagDataset(_records("s1", "s2", patients=["P", "P"]), tmp_path)
    assert len(ds) == 2 and ds.feature_dim == 8
    assert ds.provenance == {
        "encoder": "resnet50",
        "weights": "imagenet",
        "feature_dim": 8,
        "target_mpp": 0.5,
        "tile_size": 224,
        "schema_version": 1,
        "stain": "none",  # absent from these files: not normalised
    }
    assert set(ds.provenance) == set(PROVENANCE_KEYS)
    np.testing.assert_array_equal(ds.targets, [0, 1])
    np.testing.assert_array_equal(ds.groups, ["P", "P"])

    (tmp_path / "s1.h5").unlink()  # nothing was read at construction beyond attributes; s2 still loads
    bag = ds[1]
    assert isinstance(bag, Bag) and bag.slide_id == "s2" and bag.target == 1
    assert bag.features.dtype == torch.float32 and bag.features.shape == (7, 8)  # float16 file -> float32
    np.testing.assert_allclose(bag.features.numpy(), f2, atol=1e-2, rtol=1e-2)
    assert bag.coords.dtype == torch.int64
    np.testing.assert_array_equal(bag.coords.numpy(), c2)
    with pytest.raises(BagDataError, match="slide s1: cannot read"):
        ds[0]


def _corrupt(path, value):
    with h5py.File(path, "a") as f:
        f["features"][3, 1] = value


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_features_name_the_slide(tmp_path, value):
    _write_slide(tmp_path, "good", 10)
    _write_slide(tmp_path, "bad", 10)
    _corrupt(tmp_path / "bad.h5", value)
    ds = FeatureBagDataset(_records("good", "bad"), tmp_path, max_instances=2)
    assert ds[0].features.shape == (2, 8)
    for epoch in range(3):  # reported whichever instances this epoch draws
        ds.set_epoch(epoch)
        with pytest.raises(BagDataError) as err:
            ds[1]
        assert "slide bad: NaN/Inf features in 1 of 10 tiles" in _one_line(err)


def _construct_error(tmp_path, ids=("s1", "s2"), **kwargs) -> str:
    with pytest.raises(BagDataError) as err:
        FeatureBagDataset(_records(*ids), tmp_path, **kwargs)
    return _one_line(err)


def test_missing_slide_file(tmp_path):
    _write_slide(tmp_path, "s1", 5)
    assert _construct_error(tmp_path) == f"slide s2: no feature file {tmp_path / 's2.h5'}"


def test_unknown_schema_version_and_incomplete_file(tmp_path):
    _write_slide(tmp_path, "s1", 5)
    _write_slide(tmp_path, "s2", 5)
    with h5py.File(tmp_path / "s2.h5", "a") as f:
        f.attrs["schema_version"] = 99
    msg = _construct_error(tmp_path)
    assert msg.startswith("slide s2: ") and "unknown schema version 99" in msg
    with h5py.File(tmp_path / "s2.h5", "a") as f:
        f.attrs["schema_version"] = 1
        f.attrs["status"] = "writing"
    assert "slide s2: " in (msg := _construct_error(tmp_path)) and "incomplete" in msg


def test_zero_tile_bag(tmp_path):
    _write_slide(tmp_path, "s1", 5)
    _write_slide(tmp_path, "s2", 0)
    assert _construct_error(tmp_path).startswith("slide s2: zero tiles")


@pytest.mark.parametrize(
    ("key", "first", "second"),
    [
        ("feature_dim", {"dim": 8}, {"dim": 16}),
        ("encoder", {}, {"encoder": "uni"}),
        ("weights", {}, {"weights": "ssl-v2"}),
        ("target_mpp", {}, {"target_mpp": 1.0}),
        ("tile_size", {}, {"tile_size": 256}),
    ],
)
def test_provenance_mismatch_across_slides(tmp_path, key, first, second):
    _write_slide(tmp_path, "s1", 5, **first)
    _write_slide(tmp_path, "s2", 5, **second)
    msg = _construct_error(tmp_path)
    assert msg.startswith(f"slides s1 and s2 differ in {key}: ")


def test_expected_provenance(tmp_path):
    _write_slide(tmp_path, "s1", 5)
    _write_slide(tmp_path, "s2", 5)
    ok = {"encoder": "resnet50", "feature_dim": 8, "target_mpp": 0.5 + 1e-12, "tile_size": 224}
    assert FeatureBagDataset(_records("s1", "s2"), tmp_path, expected_provenance=ok).feature_dim == 8
    msg = _construct_error(tmp_path, expected_provenance={**ok, "encoder": "uni"})
    assert str(tmp_path) in msg and "encoder: checkpoint 'uni' vs features 'resnet50'" in msg
    assert "tile_size" not in msg  # only the differing key is named
    assert "colour" in _construct_error(tmp_path, expected_provenance={"colour": "blue"})


def test_subsampling_bounded_redrawn_per_epoch_and_deterministic(tmp_path):
    feats, coords = _write_slide(tmp_path, "big", 200)
    _write_slide(tmp_path, "small", 3)
    recs = _records("big", "small")

    def draw(seed: int, epoch: int) -> np.ndarray:
        ds = FeatureBagDataset(recs, tmp_path, max_instances=16, seed=seed)
        ds.set_epoch(epoch)
        bag = ds[0]
        assert bag.features.shape == (16, 8) and bag.coords.shape == (16, 2)
        rows = [int(np.flatnonzero((coords == c).all(axis=1))[0]) for c in bag.coords.numpy()]
        assert len(set(rows)) == 16  # without replacement
        np.testing.assert_array_equal(bag.features.numpy(), feats[rows])  # features stay paired with coords
        assert ds[1].features.shape == (3, 8)  # smaller bags are kept whole
        return bag.coords.numpy()

    epoch0, epoch1 = draw(0, 0), draw(0, 1)
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(draw(0, 1), epoch1)  # same (seed, epoch): same subset, in a new instance
    assert not np.array_equal(draw(1, 1), epoch1)
    full = FeatureBagDataset(recs, tmp_path)[0]
    assert full.features.shape == (200, 8)


def test_collate_pads_with_zeros_and_masks():
    bags = [
        Bag(torch.ones(3, 4), 1, "a", None),
        Bag(torch.full((5, 4), 2.0), 0, "b", None),
        Bag(torch.full((1, 4), 3.0), 1, "c", None),
    ]
    batch = collate_bags(bags)
    assert batch.x.shape == (3, 5, 4) and batch.mask.shape == (3, 5) and batch.mask.dtype == torch.bool
    assert batch.mask.sum(dim=1).tolist() == [3, 5, 1]
    assert batch.targets.dtype == torch.long and batch.targets.tolist() == [1, 0, 1]
    assert batch.slide_ids == ["a", "b", "c"]
    for j, b in enumerate(bags):
        n = b.features.shape[0]
        torch.testing.assert_close(batch.x[j, :n], b.features)
        assert not batch.x[j, n:].any()
    with pytest.raises(BagDataError, match="different feature dims"):
        collate_bags([bags[0], Bag(torch.ones(2, 3), 0, "d", None)])


# --- instance tables ----------------------------------------------------------------------------------------------


def test_table_bags_from_real_musk1(mil_file):
    ds = TableBagDataset.from_csv(mil_file("musk1.csv"))
    assert len(ds) == 92 and ds.feature_dim == 166 and ds.classes == ["0", "1"]
    assert int((ds.targets == 1).sum()) == 47 and int((ds.targets == 0).sum()) == 45
    assert sum(ds[i].features.shape[0] for i in range(len(ds))) == 476
    assert len(set(ds.groups.tolist())) == 92
    bag = ds[0]
    assert bag.coords is None and bag.slide_id == ds.groups[0] and bag.features.dtype == torch.float32
    # the first row of the file is bag "1", label 1, features 42,-198,-109,...
    assert bag.slide_id == "1" and bag.target == 1 and bag.features[0, :3].tolist() == [42.0, -198.0, -109.0]

    sub = ds.subset(np.flatnonzero(ds.targets == 0)[:5])
    assert len(sub) == 5 and (sub.targets == 0).all() and sub.classes == ds.classes
    assert sub[0].features.data_ptr() == ds[int(np.flatnonzero(ds.targets == 0)[0])].features.data_ptr()

    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_bags)))
    assert batch.x.shape[0] == 4 and batch.x.shape[2] == 166
    assert batch.mask.sum(dim=1).tolist() == [ds[i].features.shape[0] for i in range(4)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("label,bag,0,1\n1,7,0.5,1\n0,7,0.1,2\n", "bag 7 has instances with different labels ['0', '1']"),
        ("label,bag,0,1\n1,7,0.5,1\n1,8,nan,2\n", ":3: bag 8: NaN/Inf"),
        ("label,bag,0,1\n1,7,0.5,1\n1,8,,2\n", ":3: bag 8: non-numeric"),
        ("label,bag,0,1\n1,7,0.5\n", ":2: 3 fields, header has 4"),
        ("lab,bag,0\n1,7,0.5\n", "expected header label,bag"),
    ],
)
def test_table_bad_files(tmp_path, text, expected):
    path = _csv(tmp_path, text, "bags.csv")
    with pytest.raises(BagDataError) as err:
        TableBagDataset.from_csv(path)
    msg = _one_line(err)
    assert expected in msg and str(path) in msg
