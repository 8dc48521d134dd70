"""The feature-file format: streamed writes, atomic appearance, validation and staleness."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from preprocessing.h5format import (
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    FeatureFileError,
    FeatureWriter,
    check_feature_file,
    read_features,
    remove_stale_partials,
    stale_reason,
)


def _attrs(**over):
    attrs = {k: f"v-{k}" for k in REQUIRED_ATTRS if k not in ("feature_dim", "feature_dtype")}
    attrs.update(mpp=0.5, target_mpp=0.5, tile_size=224, tissue_params={"a": 1, "b": 2.0})
    attrs.update(over)
    return attrs


def _write(path, n=300, dim=16, dtype="float32", batch=64, **over):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    coords = rng.integers(0, 10_000, (n, 2))
    with FeatureWriter(path, dim, _attrs(**over), dtype=dtype) as w:
        for i in range(0, n, batch):
            w.append(coords[i : i + batch], feats[i : i + batch])
        w.commit()
    return feats, coords


def test_round_trip_layout_and_attrs(tmp_path):
    path = tmp_path / "features" / "s1.h5"
    feats, coords = _write(path)
    got_f, got_c, attrs = read_features(path)
    np.testing.assert_array_equal(got_f, feats)
    np.testing.assert_array_equal(got_c, coords)
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["n_tiles"] == 300
    assert attrs["feature_dim"] == 16 and attrs["feature_dtype"] == "float32"
    with h5py.File(path) as f:  # CLAM-style readers: root datasets, chunked, compressed
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
        assert f["features"].chunks is not None and f["features"].compression == "gzip"
    assert list(tmp_path.joinpath("features").iterdir()) == [path]  # no temporary left behind


def test_float16_option(tmp_path):
    feats, _ = _write(tmp_path / "h.h5", dtype="float16")
    got, _, attrs = read_features(tmp_path / "h.h5")
    assert got.dtype == np.float16 and attrs["feature_dtype"] == "float16"
    np.testing.assert_allclose(got, feats, rtol=1e-2, atol=1e-2)


def test_nothing_visible_until_commit_and_partial_removed_on_error(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="boom"), FeatureWriter(path, 4, _attrs()) as w:
        w.append(np.zeros((2, 2)), np.ones((2, 4)))
        assert not path.exists() and w.tmp.exists()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_nan_features_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN/Inf"), FeatureWriter(tmp_path / "s.h5", 2, _attrs()) as w:
        w.append(np.zeros((1, 2)), np.array([[np.nan, 0.0]]))
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_foreign_files_are_rejected(tmp_path):
    _write(tmp_path / "ok.h5")
    with h5py.File(tmp_path / "ok.h5", "a") as f:
        f.attrs["status"] = "writing"
    with pytest.raises(FeatureFileError, match="incomplete"):
        check_feature_file(tmp_path / "ok.h5")
    _write(tmp_path / "v.h5")
    with h5py.File(tmp_path / "v.h5", "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(FeatureFileError, match="unknown schema version 99"):
        check_feature_file(tmp_path / "v.h5")
    truncated = tmp_path / "t.h5"
    _write(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(FeatureFileError, match="not a readable HDF5 file"):
        check_feature_file(truncated)


def test_stale_reason_names_the_changed_parameter(tmp_path):
    _write(tmp_path / "s.h5")
    same = {"mpp": 0.5, "target_mpp": 0.5, "tile_size": 224, "tissue_params": {"b": 2.0, "a": 1}}
    assert stale_reason(tmp_path / "s.h5", same) is None
    assert "target_mpp changed" in stale_reason(tmp_path / "s.h5", {**same, "target_mpp": 1.0})
    assert "tissue_params changed" in stale_reason(tmp_path / "s.h5", {**same, "tissue_params": {"a": 2}})
    assert "no such feature file" in stale_reason(tmp_path / "missing.h5", same)


def test_stale_partials_cleanup(tmp_path):
    (tmp_path / ".s.h5.123.partial").write_bytes(b"x")
    (tmp_path / ".other.h5.9.partial").write_bytes(b"x")
    assert remove_stale_partials(tmp_path, "s.h5") == 1
    assert [p.name for p in tmp_path.iterdir()] == [".other.h5.9.partial"]


def test_float16_overflow_refused_not_stored_as_inf(tmp_path):
    with pytest.raises(ValueError, match="NaN/Inf features \\(stored as float16\\)"), FeatureWriter(
        tmp_path / "s.h5", 2, _attrs(), dtype="float16"
    ) as w:
        w.append(np.zeros((1, 2)), np.array([[1e6, 0.0]], dtype=np.float32))
    assert list(tmp_path.iterdir()) == []
