"""Feature extraction on real slides, error propagation from workers, and the runtime settings."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preprocessing.encoders import Encoder
from preprocessing.errors import SlideError
from preprocessing.extract import TileDataset, choose_settings, extract_features
from preprocessing.runtime import (
    FAST_TUNABLES,
    auto_batch_size,
    auto_num_workers,
    available_cores,
    configure_threads,
    merge_tunables,
    pick_device,
)
from preprocessing.slide import open_slide

TILE = 64


@pytest.fixture(autouse=True)
def _keep_threads(keep_threads):
    """Every test here restores torch's thread count (tests/preprocessing/conftest.py)."""


def _grid(n: int, step: int = 200) -> np.ndarray:
    return np.array([(x, y) for y in range(0, 2700, step) for x in range(0, 2000, step)][:n], dtype=np.int64)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_features_in_order_and_equal_to_direct_forward(slide_file, encoder: Encoder, num_workers: int):
    path = slide_file("cmu-1-small-region.svs")
    coords = _grid(11)
    batches = list(extract_features(path, coords, read_level=0, read_size=TILE, tile_size=TILE, encoder=encoder,
                                    batch_size=4, num_workers=num_workers, device="cpu", progress=False))
    assert [len(c) for c, _ in batches] == [4, 4, 3]
    got_coords = np.concatenate([c for c, _ in batches])
    feats = np.concatenate([f for _, f in batches])
    assert got_coords.dtype == np.int64 and np.array_equal(got_coords, coords)
    assert feats.shape == (11, 256) and feats.dtype == np.float32
    with open_slide(path) as s:
        tiles = torch.from_numpy(np.stack([s.read_region(tuple(c), 0, (TILE, TILE)) for c in coords]))
    np.testing.assert_allclose(feats, encoder(tiles).numpy(), rtol=1e-4, atol=1e-4)
    assert not torch.is_inference_mode_enabled()  # the generator does not leak its mode to the caller


def test_downsampled_read_matches_pil_box(slide_file):
    path = slide_file("cmu-1-small-region.svs")
    coords = _grid(2)
    ds = TileDataset(path, coords, read_level=0, read_size=2 * TILE, tile_size=TILE)
    index, tile = ds[1]
    with open_slide(path) as s:
        big = s.read_region(tuple(coords[1]), 0, (2 * TILE, 2 * TILE))
    expected = np.asarray(Image.fromarray(big).resize((TILE, TILE), Image.Resampling.BOX))
    assert index == 1 and tile.dtype == torch.uint8 and tuple(tile.shape) == (TILE, TILE, 3)
    assert np.array_equal(tile.numpy(), expected)
    ds.close()


def test_float16_output_and_no_coords(slide_file, encoder: Encoder):
    path = slide_file("cmu-1-small-region.svs")
    kw = {"read_level": 0, "read_size": TILE, "tile_size": TILE, "encoder": encoder, "progress": False}
    (c, f), = extract_features(path, _grid(2), dtype=np.float16, device="cpu", **kw)
    assert c.shape == (2, 2) and f.dtype == np.float16
    assert list(extract_features(path, np.zeros((0, 2), np.int64), **kw)) == []
    with pytest.raises(SlideError, match="read level 3 does not exist"):
        next(extract_features(path, _grid(1), **{**kw, "read_level": 3}))
    with pytest.raises(ValueError, match=r"integer \(n, 2\)"):
        next(extract_features(path, np.zeros((3, 3)), **kw))


@pytest.mark.parametrize("num_workers", [1, 0])
def test_corrupt_tile_raises_slide_error_quickly(slide_file, encoder: Encoder, num_workers: int):
    path = slide_file("unreadable.svs")  # opens, but its tile data is corrupt
    start = time.perf_counter()
    with pytest.raises(SlideError, match=r"unreadable\.svs: tile at \(0, 0\), level 0: .*Bogus marker length"):
        for _ in extract_features(path, np.zeros((8, 2), np.int64), read_level=0, read_size=16, tile_size=16,
                                  encoder=encoder, batch_size=2, num_workers=num_workers, device="cpu", progress=False):
            pass
    assert time.perf_counter() - start < 30
    assert multiprocessing.active_children() == []  # the reader worker was shut down, not left behind


# -- runtime ----------------------------------------------------------------------------------

_PROBE = """
import os, sys
from preprocessing.runtime import ensure_fast_allocator, fast_allocator_active
print("start", os.environ.get("GLIBC_TUNABLES"), flush=True)
ensure_fast_allocator(method=sys.argv[1])
print("after", fast_allocator_active(), os.environ.get("GLIBC_TUNABLES"), flush=True)
"""


def _probe(method: str, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "WSI_FL_NO_REEXEC")}
    out = subprocess.run([sys.executable, "-c", _PROBE, method], env={**base, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_reexec_sets_tunables_once_and_keeps_existing_ones():
    lines = _probe("reexec", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert [line.split()[0] for line in lines] == ["start", "start", "after"]  # re-executed exactly once
    assert lines[0] == "start glibc.malloc.arena_max=2"
    seen = dict(item.split("=") for item in lines[1].split()[1].split(":"))
    assert seen == {"glibc.malloc.arena_max": "2", **FAST_TUNABLES}
    assert lines[2].startswith("after True")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_no_reexec_when_disabled_and_mallopt_in_place_by_default():
    assert _probe("reexec", WSI_FL_NO_REEXEC="1") == ["start None", "after False None"]
    lines = _probe("auto")  # default: mallopt in this process, exported for children, no restart
    assert lines[0] == "start None" and len(lines) == 2
    assert lines[1] == f"after True {merge_tunables(None)}"


def test_merge_tunables_keeps_user_settings():
    assert merge_tunables("glibc.malloc.trim_threshold=1") == (
        "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=1")


def test_settings_chosen_for_this_machine(encoder: Encoder):
    cores = available_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    workers = auto_num_workers("cpu")
    assert workers == (0 if cores < 8 else -(-cores // 16))
    assert configure_threads(workers) == torch.get_num_threads() >= 1
    assert auto_batch_size(encoder, "cpu") == 32
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")
    with pytest.raises(ValueError, match=r"not supported|unknown device"):
        pick_device("tpu")
    s = choose_settings(encoder, "cpu")
    assert (s.batch_size, s.num_workers) == (32, workers) and s.threads == torch.get_num_threads()


def test_tile_dataset_pickles_without_its_handle(slide_file, tmp_path: Path):
    import pickle

    ds = TileDataset(slide_file("cmu-1-small-region.svs"), _grid(1), read_level=0, read_size=TILE, tile_size=TILE)
    ds[0]  # opens the handle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slide is None and np.array_equal(clone[0][1].numpy(), ds[0][1].numpy())
    ds.close()
    clone.close()
