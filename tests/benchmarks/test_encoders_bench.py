"""The encoder benchmark's protocols (:mod:`wsi_fl.benchmarks.encoders`), run small on CPU.

The GPU figures come from :func:`stream_run`; its CPU path is the same code but
for the CUDA events, so it is checked here on two tiny synthetic slides: both
modes embed every planned tile, the device-busy fraction is a fraction, and the
per-slide mode (one loader per slide) pays a gap at the slide boundary that the
stream does not.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from preprocessing.encoders import create_encoder
from wsi_fl.benchmarks.encoders import OthersMeter, bench_slides, slide_coords, stream_run, summarise_cpu


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_stream_and_per_slide_runs_embed_every_tile(tmp_path):
    paths = bench_slides(tmp_path, 2, 1024)
    enc = create_encoder("resnet18_trunc", random_init=True)
    kw = {"device": "cpu", "tile_size": 224, "batch_size": 8, "num_workers": 1}
    stream = stream_run(enc, paths, per_slide=False, **kw)
    per_slide = stream_run(enc, paths, per_slide=True, **kw)
    assert stream["tiles"] == per_slide["tiles"] > 8  # every tile of both slides, in both modes
    for r in (stream, per_slide):
        assert 0 < r["busy"] <= 1 and r["tiles_per_s"] > 0 and r["plan_s"] >= 0
        assert r["max_gap_boundary_ms"] > 0  # one boundary between the two slides was seen
    assert enc.model.__class__.__name__ != "BusyClock"  # the wrapper is removed afterwards


def test_summary_takes_medians_of_paired_ratios():
    runs = {"naive": [{"tiles_per_s": 10.0}, {"tiles_per_s": 5.0}, {"tiles_per_s": 10.0}],
            "forward": [{"tiles_per_s": 13.0}, {"tiles_per_s": 7.0}, {"tiles_per_s": 12.0}],
            "extract": [{"tiles_per_s": 13.0}, {"tiles_per_s": 7.0}, {"tiles_per_s": 11.4}]}
    out = summarise_cpu(runs)
    assert out["naive"] == 10.0 and out["forward"] == 12.0
    assert out["forward/naive"] == pytest.approx(1.3)  # pairs (1.3, 1.4, 1.2), not 12 / 10
    assert out["extract/forward"] == pytest.approx(1.0)
    assert "quiet repeats" not in out  # no run says how busy the machine was: none counts as quiet
    for i, part_runs in enumerate(zip(*runs.values(), strict=True)):
        for r in part_runs:
            r["others"] = 0.5 if i == 1 else 0.02
    quiet = summarise_cpu(runs)
    assert quiet["quiet repeats"] == 2 and quiet["quiet forward/naive"] == pytest.approx(1.25)


def test_others_meter_and_slide_coords(slide_file):
    with OthersMeter() as m:
        time.sleep(0.3)
    assert math.isnan(m.share) or 0 <= m.share <= 1
    coords = slide_coords(slide_file("cmu-1-small-region.svs"), 256, 500)
    assert coords.shape == (500, 2) and coords[:, 0].max() <= 2220 - 256 and coords[:, 1].max() <= 2967 - 256
