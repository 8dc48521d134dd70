"""Stain normalisation and augmentation: known stain matrices recovered, statistics matched, jitter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocessing.errors import InputError
from preprocessing.params import StainParams
from preprocessing.stain import (
    MACENKO_REFERENCE,
    MacenkoNormalizer,
    ReinhardNormalizer,
    SlideStain,
    default_reference,
    hed_jitter,
    provenance_record,
    stain_angles_deg,
    stain_reference,
    tile_rng,
)

IO = 240


def stained(he: np.ndarray, seed: int = 0, size: int = 128) -> np.ndarray:
    """A uint8 tile mixed from the (3, 2) OD matrix ``he`` by Beer-Lambert: pure-H nuclei, pure-E
    stroma, mixtures and a little glass, as H&E tiles look."""
    rng = np.random.default_rng(seed)
    n = size * size
    c = np.zeros((2, n))
    kind = rng.integers(0, 4, n)
    c[0] = np.where(kind == 0, rng.uniform(0.4, 1.6, n), 0) + np.where(kind == 2, rng.uniform(0.1, 0.8, n), 0)
    c[1] = np.where(kind == 1, rng.uniform(0.3, 1.2, n), 0) + np.where(kind == 2, rng.uniform(0.1, 0.8, n), 0)
    od = he @ c
    img = IO * np.exp(-od)
    return np.clip(img.T.reshape(size, size, 3) + rng.normal(0, 0.5, (size, size, 3)), 0, 255).astype(np.uint8)


# Macenko's published reference (torchstain's default) and a redder, bluer pair. Ruifrok &
# Johnston's eosin (0.07, 0.99, 0.11) is not used: its red OD is so small that pure-eosin pixels
# fall under Macenko's transparency cut (every channel's OD >= beta = 0.15) and the eosin
# estimate is then pulled towards the mixtures (measured: ~11° off).
HE_A = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
HE_B = np.array([[0.65, 0.25], [0.70, 0.95], [0.29, 0.17]])


def unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=0)


@pytest.mark.parametrize("he", [HE_A, HE_B], ids=["macenko-reference", "other"])
def test_macenko_recovers_known_stain_matrix(he):
    norm = MacenkoNormalizer().fit(stained(unit(he)))
    angles = stain_angles_deg(norm.stain_matrix, unit(he))
    assert (angles < 3.0).all(), angles


def test_macenko_normalised_tile_takes_the_reference_stain():
    ref, src = stained(unit(HE_A), seed=1), stained(unit(HE_B), seed=2)
    norm = MacenkoNormalizer().fit(ref)
    out = norm.normalize(src)
    assert out.shape == src.shape and out.dtype == np.uint8
    refit = MacenkoNormalizer().fit(out)
    assert (stain_angles_deg(refit.stain_matrix, unit(HE_A)) < 3.0).all()
    assert (stain_angles_deg(MacenkoNormalizer().fit(src).stain_matrix, unit(HE_A)) > 5).any()
    d = norm.describe()
    assert d["method"] == "macenko" and len(d["reference"]) == 64
    assert d == MacenkoNormalizer().fit(ref).describe()
    assert d["reference"] != MacenkoNormalizer().fit(src).describe()["reference"]


def test_reinhard_matches_reference_lab_statistics():
    ref, src = stained(unit(HE_A), seed=3), stained(unit(HE_B), seed=4)
    norm = ReinhardNormalizer().fit(ref)
    out = norm.normalize(src)
    mean, std = ReinhardNormalizer.lab_stats(out)
    np.testing.assert_allclose(mean, norm.mean, atol=1.0)
    np.testing.assert_allclose(std, norm.std, rtol=0.05, atol=0.5)
    assert norm.describe()["method"] == "reinhard"


def test_hed_jitter_zero_sigma_is_identity_and_seeded():
    tile = stained(unit(HE_A), seed=5, size=64)
    assert np.array_equal(hed_jitter(tile, np.random.default_rng(0), 0.0, 0.0), tile)
    a = hed_jitter(tile, np.random.default_rng(7), 0.05, 0.01)
    b = hed_jitter(tile, np.random.default_rng(7), 0.05, 0.01)
    c = hed_jitter(tile, np.random.default_rng(8), 0.05, 0.01)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.5 < np.abs(a.astype(float) - tile).mean() < 30


def test_bad_input_and_unfitted():
    with pytest.raises(ValueError):
        ReinhardNormalizer().fit(np.zeros((4, 4), np.uint8))
    with pytest.raises(RuntimeError):
        MacenkoNormalizer().normalize(np.zeros((4, 4, 3), np.uint8))


# --- slide-level normalisation as the pipeline runs it (preprocessing.tileprep) -------------------------------

def test_builtin_reference_is_macenkos_published_one():
    """The built-in reference tile carries Macenko's published vectors; its Macenko default is them exactly."""
    tile = default_reference()
    assert tile.dtype == np.uint8 and tile.shape == (256, 256, 3)
    fitted = MacenkoNormalizer().fit(tile)
    assert (stain_angles_deg(fitted.stain_matrix, MACENKO_REFERENCE["stain_matrix"]) < 1.0).all()
    np.testing.assert_allclose(fitted.max_concentrations, MACENKO_REFERENCE["max_concentrations"], rtol=0.06)
    builtin = stain_reference(StainParams(method="macenko"))
    np.testing.assert_allclose(builtin.stain_matrix, MACENKO_REFERENCE["stain_matrix"])
    assert stain_reference(StainParams()) is None


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_slide_stain_maps_a_slide_onto_the_reference(method):
    """A slide stained with other vectors, mapped with its own (sample-based) estimate, takes the reference's stain."""
    reference = stain_reference(StainParams(method=method))
    tiles = np.stack([stained(unit(HE_B), seed=s, size=64) for s in range(8)])
    mapping = SlideStain.fit(reference, tiles[:4])  # estimated on a sample, applied to every tile
    out = mapping(tiles)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    image = out.reshape(-1, 64, 3)
    if method == "macenko":
        refit = MacenkoNormalizer().fit(image)
        assert (stain_angles_deg(refit.stain_matrix, MACENKO_REFERENCE["stain_matrix"]) < 3.0).all()
        assert (stain_angles_deg(MacenkoNormalizer().fit(tiles.reshape(-1, 64, 3)).stain_matrix,
                                 MACENKO_REFERENCE["stain_matrix"]) > 5).any()
    else:
        mean, std = ReinhardNormalizer.lab_stats(image)
        np.testing.assert_allclose(mean, reference.mean, atol=1.5)
        np.testing.assert_allclose(std, reference.std, rtol=0.08, atol=0.5)
    # A blank sample has no stain to estimate: one clear error (the slide fails, the batch goes on).
    if method == "macenko":
        with pytest.raises(ValueError, match="cannot estimate the slide's H&E vectors"):
            SlideStain.fit(reference, np.full((2, 32, 32, 3), 245, np.uint8))


def test_stain_provenance_identity_tells_settings_apart(tmp_path):
    records = {
        "none": provenance_record(StainParams(), None)["stain"],
        "macenko": provenance_record(StainParams(method="macenko"), stain_reference(StainParams(method="macenko")))[
            "stain"],
        "reinhard": provenance_record(StainParams(method="reinhard"),
                                      stain_reference(StainParams(method="reinhard")))["stain"],
        "jitter": provenance_record(StainParams(hed_jitter=0.05), None)["stain"],
    }
    assert records["none"] == "none" and records["jitter"] == "none+hed0.05/seed0"
    assert records["macenko"].startswith("macenko:") and records["reinhard"].startswith("reinhard:")
    assert len(set(records.values())) == 4
    ref = tmp_path / "ref.png"
    Image.fromarray(stained(unit(HE_B), seed=9)).save(ref)
    other = StainParams(method="macenko", reference=str(ref))
    record = provenance_record(other, stain_reference(other))
    assert record["stain"] != records["macenko"] and record["stain_params"]["reference_file"] == "ref.png"
    assert record == provenance_record(other, stain_reference(other))  # the same reference, the same identity


def test_bad_stain_settings_are_one_line_input_errors(tmp_path):
    bad = tmp_path / "ref.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"ref\.png: cannot read the stain reference image"):
        stain_reference(StainParams(method="reinhard", reference=str(bad)))
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiny)
    with pytest.raises(InputError, match=r"tiny\.png: stain reference image 8x8 px is too small"):
        stain_reference(StainParams(method="macenko", reference=str(tiny)))
    with pytest.raises(InputError, match="stain method must be one of"):
        StainParams(method="vahadane")
    with pytest.raises(InputError, match="needs a stain method"):
        StainParams(reference=str(tiny))


def test_jitter_is_seeded_per_slide_and_tile():
    tile = stained(unit(HE_A), seed=5, size=32)
    a = hed_jitter(tile, tile_rng(0, "slide-a", 448, 896), 0.05, 0.01)
    assert np.array_equal(a, hed_jitter(tile, tile_rng(0, "slide-a", 448, 896), 0.05, 0.01))
    assert not np.array_equal(a, hed_jitter(tile, tile_rng(0, "slide-b", 448, 896), 0.05, 0.01))
    assert not np.array_equal(a, hed_jitter(tile, tile_rng(0, "slide-a", 672, 896), 0.05, 0.01))
    assert not np.array_equal(a, hed_jitter(tile, tile_rng(1, "slide-a", 448, 896), 0.05, 0.01))
