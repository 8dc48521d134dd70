"""Attention GeoJSON (QuPath's format) and thumbnail heatmaps on a real slide."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from preprocessing.slide import open_slide
from wsi_fl.evaluation.heatmap import (
    TOP_CLASS_NAME,
    attention_geojson,
    attention_heatmap,
    normalize_attention,
    top_k_tiles,
    write_geojson,
)

TILE = 256


def _grid(width: int, height: int, tile: int = TILE) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, width - tile + 1, tile), np.arange(0, height - tile + 1, tile))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def test_geojson_has_one_closed_square_per_tile_with_consistent_ranks():
    rng = np.random.default_rng(0)
    coords = _grid(2048, 1536)
    attention = rng.dirichlet(np.ones(len(coords)))
    fc = attention_geojson(coords, attention, TILE, slide_id="slide-a", top_k=5)
    json.dumps(fc, allow_nan=False)

    assert fc["type"] == "FeatureCollection"
    features = fc["features"]
    assert len(features) == len(coords)
    ranks = []
    for (x, y), a, f in zip(coords, attention, features, strict=True):
        assert f["type"] == "Feature"
        uuid.UUID(f["id"])  # QuPath parses ids as UUIDs
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = np.array(geom["coordinates"][0], dtype=float)
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        assert ring.min(axis=0).tolist() == [x, y] and ring.max(axis=0).tolist() == [x + TILE, y + TILE]
        assert abs(np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])) / 2 == TILE * TILE  # a square
        props = f["properties"]
        assert props["objectType"] == "tile"
        meas = props["measurements"]
        assert meas["attention"] == pytest.approx(a)
        assert props["name"] == f"rank {meas['attention_rank']}"
        assert 0.0 <= meas["attention_scaled"] <= 1.0
        ranks.append(meas["attention_rank"])
    ranks = np.array(ranks)
    assert sorted(ranks) == list(range(1, len(coords) + 1))
    assert (np.argsort(ranks) == np.argsort(-attention)).all()  # rank 1 is the highest attention
    scaled = np.array([f["properties"]["measurements"]["attention_scaled"] for f in features])
    assert scaled[ranks == 1][0] == 1.0 and scaled[ranks == len(coords)][0] == 0.0

    classified = [i for i, f in enumerate(features) if "classification" in f["properties"]]
    assert sorted(classified) == sorted(top_k_tiles(coords, attention, 5).tolist())
    cls = features[classified[0]]["properties"]["classification"]
    assert cls["name"] == TOP_CLASS_NAME and len(cls["color"]) == 3

    again = attention_geojson(coords, attention, TILE, slide_id="slide-a")
    assert [f["id"] for f in again["features"]] == [f["id"] for f in features]  # stable across exports
    assert len({f["id"] for f in features}) == len(features)
    assert not any("classification" in f["properties"] for f in again["features"])


def test_write_geojson_round_trips(tmp_path):
    coords = np.array([[0, 0], [512, 256]])
    fc = attention_geojson(coords, np.array([0.25, 0.75]), 512.5, slide_id="s")
    path = write_geojson(fc, tmp_path / "out" / "s.geojson")
    assert json.loads(path.read_text()) == fc
    assert fc["features"][1]["geometry"]["coordinates"][0][2] == [1024.5, 768.5]
    assert not list(tmp_path.rglob("*.partial"))


def test_top_k_and_validation():
    coords = np.zeros((5, 2))
    attention = np.array([0.1, 0.5, 0.2, 0.5, 0.0])
    assert top_k_tiles(coords, attention, 3).tolist() == [1, 3, 2]  # descending, ties in tile order
    assert top_k_tiles(coords, attention, 99).tolist() == [1, 3, 2, 0, 4]
    assert top_k_tiles(coords, attention, 0).size == 0
    with pytest.raises(ValueError, match="finite"):
        attention_geojson(coords, np.array([0.1, np.nan, 0, 0, 0]), 256, slide_id="s")
    with pytest.raises(ValueError, match="shape"):
        attention_geojson(coords, attention[:4], 256, slide_id="s")


def test_normalize_attention():
    a = np.array([0.001, 0.002, 0.9, np.nan])
    assert normalize_attention(a, "rank")[:3].tolist() == [0.0, 0.5, 1.0]
    assert np.isnan(normalize_attention(a, "rank")[3])
    assert normalize_attention(a, "minmax")[:3] == pytest.approx([0.0, 0.001 / 0.899, 1.0])
    assert normalize_attention(np.array([0.3, 0.3]), "minmax").tolist() == [1.0, 1.0]


def test_heatmap_colours_high_and_low_attention_apart(slide_file, tmp_path):
    path = slide_file("cmu-1-small-region.svs")
    with open_slide(path) as slide:
        w0, h0 = slide.dimensions
        thumb, (dsx, dsy) = slide.thumbnail(max(w0, h0) / 512)
    coords = _grid(w0, h0)
    rng = np.random.default_rng(1)
    left = coords[:, 0] < 1024
    attention = np.where(left, rng.uniform(0.5, 1.0, len(coords)), rng.uniform(0.0, 0.1, len(coords)))
    attention[-1] = np.nan  # a tile without attention stays untouched

    alpha = 0.5
    out = attention_heatmap(path, coords, attention, TILE, tmp_path / "hm.png", max_side=512, alpha=alpha,
                            colorbar=False)
    with Image.open(out) as img:
        heat = np.asarray(img.convert("RGB")).astype(float)
    assert heat.shape == thumb.shape
    overlay = (heat - (1 - alpha) * thumb) / alpha  # the colour-map colour under each covered pixel

    def block(x: float, y: float) -> tuple[slice, slice]:
        # the tile's square in the thumbnail, 2 px in from its edges
        return (slice(round(y / dsy) + 2, round((y + TILE) / dsy) - 2),
                slice(round(x / dsx) + 2, round((x + TILE) / dsx) - 2))

    redness = np.array([np.mean(overlay[block(x, y)][..., 0] - overlay[block(x, y)][..., 2]) for x, y in coords[:-1]])
    high, low = redness[left[:-1]], redness[~left[:-1]]
    assert high.mean() > 100 and low.mean() < -100  # jet: high attention red, low attention blue
    assert high.min() > low.max()
    # Reading each tile's colour back through the colour map gives its rank-normalised attention.
    lut = colormaps["jet"](np.linspace(0, 1, 1024))[:, :3] * 255
    colours = np.array([overlay[block(x, y)].reshape(-1, 3).mean(axis=0) for x, y in coords[:-1]])
    read_back = np.linspace(0, 1, 1024)[np.argmin(((colours[:, None] - lut[None]) ** 2).sum(-1), axis=1)]
    assert read_back == pytest.approx(normalize_attention(attention, "rank")[:-1], abs=0.02)

    x, y = coords[-1]
    assert np.array_equal(heat[block(x, y)], thumb[block(x, y)])
    below = round((coords[:, 1].max() + TILE) / dsy) + 1  # the strip no tile covers
    assert below < thumb.shape[0] and np.array_equal(heat[below:], thumb[below:])

    with_bar = attention_heatmap(path, coords, attention, TILE, tmp_path / "bar.png", max_side=512,
                                 normalize="minmax")
    with Image.open(with_bar) as img:
        assert img.height == thumb.shape[0] and img.width > thumb.shape[1]
    assert not list(tmp_path.glob("*.partial"))
