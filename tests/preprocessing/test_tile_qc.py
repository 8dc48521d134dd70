"""Per-tile QC in the pipeline: measures stored, artifact tiles excluded before the encoder, shown in the QC image.

The synthetic "realistic" slides carry their artifacts' ground truth (``artifacts.csv``); the
shared real slides check that clean tissue still yields tiles.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from artifactsites import artifact_boxes, coverage
from PIL import Image

from preprocessing.artifacts import REASONS
from preprocessing.h5format import check_feature_file, read_features, read_qc, stale_reason
from preprocessing.qc import EXCLUDED_RGB
from wsi_fl.cli import main

FAST = ["--encoder", "resnet18_trunc", "--random-init", "--quiet"]
@pytest.fixture(scope="module")
def realistic(tmp_path_factory, artifact_slides):
    """Three sites' slides with artifacts, preprocessed once with the default QC; per slide: kept/excluded/boxes."""
    slides = artifact_slides
    out = tmp_path_factory.mktemp("realistic") / "out"
    assert main(["preprocess", "--slides", *map(str, slides), "--out", str(out), *FAST]) == 0
    per_slide = []
    for path in slides:
        boxes = artifact_boxes(path)
        h5 = out / "features" / f"{path.stem}.h5"
        _, coords, attrs = read_features(h5)
        qc = read_qc(h5)
        with Image.open(path) as img:
            dims = img.size
        t = attrs["tile_size_level0"]
        per_slide.append({
            "h5": h5, "attrs": attrs, "qc": qc, "kept": coords, "excluded": qc.excluded_coords,
            "cov_kept": {k: coverage(coords, t, b, dims) for k, b in boxes.items()},
            "cov_excl": {k: coverage(qc.excluded_coords, t, b, dims) for k, b in boxes.items()},
        })
    return out, slides, per_slide


def _cat(per_slide, key, kind):
    return np.concatenate([s[key][kind] for s in per_slide])


def test_artifact_tiles_are_excluded_and_kept_tiles_are_clean(realistic):
    """A tile "overlaps" a pen mark when >= 25 % of it lies in the mark's bounding box (boxes of diagonal strokes
    are mostly clean tissue). Measured (seed 2, 6 slides): 5 of 132 kept tiles (3.8 %) overlap pen (>= 10 %:
    6.8 %, >= 50 %: 0); of the tiles mostly (>= 50 %) inside blurred patches 60 % and inside folds 86 % are
    excluded; no clean tile is. ``-s`` prints the fractions."""
    _, _, per_slide = realistic
    kept_pen = _cat(per_slide, "cov_kept", "pen")
    on_pen = float((kept_pen >= 0.25).mean())
    fractions = {"kept tiles overlapping pen": on_pen, "... by >= 10 %": float((kept_pen >= 0.1).mean()),
                 "... by >= 50 %": float((kept_pen >= 0.5).mean())}
    for kind in ("blur", "fold"):
        hit_kept = (_cat(per_slide, "cov_kept", kind) >= 0.5).sum()
        hit_excl = (_cat(per_slide, "cov_excl", kind) >= 0.5).sum()
        assert hit_kept + hit_excl >= 3, f"too few {kind} tiles to measure"
        fractions[f"{kind} tiles excluded"] = hit_excl / (hit_kept + hit_excl)
    clean_kept = sum(int((sum(s["cov_kept"].values()) == 0).sum()) for s in per_slide)
    clean_excl = sum(int((sum(s["cov_excl"].values()) == 0).sum()) for s in per_slide)
    fractions["clean tiles excluded"] = clean_excl / (clean_kept + clean_excl)
    print({k: round(float(v), 3) for k, v in fractions.items()}, f"kept {len(kept_pen)}")
    assert len(kept_pen) > 100
    assert on_pen <= 0.05
    assert fractions["blur tiles excluded"] > 0.5 and fractions["fold tiles excluded"] > 0.5
    assert fractions["clean tiles excluded"] < 0.05


def test_qc_measures_and_thresholds_are_stored(realistic):
    out, _, per_slide = realistic
    for s in per_slide:
        n, m = len(s["kept"]), len(s["excluded"])
        assert set(s["qc"].measures) == {"blur", "pen_fraction", "fold_fraction"}
        assert all(v.shape == (n,) and v.dtype == np.float32 for v in s["qc"].measures.values())
        assert s["qc"].excluded_reason.shape == (m,) and (s["qc"].excluded_reason > 0).all()
        assert all(v.shape == (m,) for v in s["qc"].excluded_measures.values())
        params = json.loads(s["attrs"]["qc_params"])
        assert params["enabled"] and params["max_pen_fraction"] == 0.1 and params["min_sharpness_ratio"] == 0.3
        counts = json.loads(s["attrs"]["qc_excluded"])
        for name, bit in REASONS.items():
            assert counts[name] == int((s["qc"].excluded_reason & bit > 0).sum())
        # kept tiles pass every threshold the file records
        assert (s["qc"].measures["pen_fraction"] <= 0.1).all() and (s["qc"].measures["fold_fraction"] <= 0.4).all()
        assert (s["qc"].measures["blur"] >= 0.3 * s["attrs"]["qc_sharpness"]).all()
        assert s["attrs"]["stain"] == "none"
        assert not set(map(tuple, s["kept"])) & set(map(tuple, s["excluded"]))
    # the QC image outlines excluded tiles in their reasons' colours
    excluded_any = {name for s in per_slide for name, bit in REASONS.items() if (s["qc"].excluded_reason & bit).any()}
    seen = set()
    for s in per_slide:
        png = np.asarray(Image.open(out / "qc" / f"{s['h5'].stem}.png").convert("RGB"))
        seen |= {name for name, rgb in EXCLUDED_RGB.items() if (png == rgb).all(axis=-1).any()}
    assert excluded_any and excluded_any <= seen


def test_no_tile_qc_keeps_every_tile_and_makes_outputs_stale(realistic, tmp_path):
    _, slides, per_slide = realistic
    one = slides[0]
    before = next(s for s in per_slide if s["h5"].stem == one.stem)
    assert stale_reason(before["h5"], {"qc_params": json.loads(before["attrs"]["qc_params"])}) is None
    target = tmp_path / "out"
    assert main(["preprocess", "--slides", str(one), "--out", str(target), "--no-tile-qc", *FAST]) == 0
    qc = read_qc(target / "features" / f"{one.stem}.h5")
    n = check_feature_file(target / "features" / f"{one.stem}.h5").n_tiles
    assert len(qc.excluded_coords) == 0 and n == len(before["kept"]) + len(before["excluded"])
    assert len(qc.measures["blur"]) == n  # measured all the same
    before_params = {"qc_params": json.loads(before["attrs"]["qc_params"])}
    changed = stale_reason(target / "features" / f"{one.stem}.h5", before_params)
    assert changed is not None and changed.startswith("qc_params changed")


def test_files_without_qc_or_stain_still_read(tmp_path):
    """A feature file written before per-tile QC existed (no qc groups, no stain attribute) still reads."""
    path = tmp_path / "old.h5"
    attrs = {k: 1 for k in ("source_size", "mpp", "target_mpp", "tile_size", "tile_size_level0", "stride",
                             "read_level", "min_tissue", "feature_dim", "schema_version", "n_tiles")}
    attrs |= {k: "x" for k in ("slide_id", "source_file", "source_fingerprint", "mpp_source", "tissue_params",
                               "encoder", "weights", "feature_dtype", "package_version", "created")}
    attrs |= {"feature_dim": 4, "n_tiles": 2, "status": "complete"}
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((2, 4), np.float32)
        f["coords"] = np.zeros((2, 2), np.int64)
        f.attrs.update(attrs)
    assert check_feature_file(path).n_tiles == 2
    qc = read_qc(path)
    assert qc.measures == {} and qc.excluded_coords.shape == (0, 2) and qc.excluded_reason.shape == (0,)
    assert stale_reason(path, {"stain": "none"}) is None  # missing means "none"
    assert "stain changed" in stale_reason(path, {"stain": "macenko:0123"})


def test_real_slides_still_yield_tiles_where_there_is_tissue(testdata, tmp_path):
    """CMU-1 (Aperio JPEG, mpp in the file) and the TCGA section (JPEG 2000, mpp supplied): default QC keeps most."""
    slides = [testdata / "slides" / "cmu-1-small-region.svs", testdata / "slides" / "tcga-cr-7395-01a-01-ts1.svs"]
    slides = [s for s in slides if s.exists()]
    assert slides, "shared slides missing"
    assert main(["preprocess", "--slides", *map(str, slides), "--out", str(tmp_path), "--default-mpp", "0.25",
                 *FAST]) == 0
    for slide in slides:
        h5 = tmp_path / "features" / f"{slide.stem}.h5"
        n = check_feature_file(h5).n_tiles
        qc = read_qc(h5)
        kept_share = n / (n + len(qc.excluded_coords))
        print(slide.stem, n, "kept of", n + len(qc.excluded_coords))
        assert n > 20 and kept_share >= 0.9, (slide.stem, n, kept_share)
        assert len(qc.measures["blur"]) == n


def test_worker_processes_give_the_same_qc(realistic, tmp_path):
    """QC (and stain) run where tiles are read: in loader workers they must give what the main process gives."""
    _, slides, per_slide = realistic
    one = slides[1]
    before = next(s for s in per_slide if s["h5"].stem == one.stem)
    assert main(["preprocess", "--slides", str(one), "--out", str(tmp_path), "--num-workers", "1", *FAST]) == 0
    h5 = tmp_path / "features" / f"{one.stem}.h5"
    _, coords, _ = read_features(h5)
    qc = read_qc(h5)
    assert np.array_equal(coords, before["kept"]) and np.array_equal(qc.excluded_coords, before["excluded"])
    for name, values in before["qc"].measures.items():
        np.testing.assert_allclose(qc.measures[name], values)
