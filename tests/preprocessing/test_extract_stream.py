"""Many slides through one extraction stream (:func:`preprocessing.extract.extract_slides`).

What must hold: each job's features equal a one-slide extraction of it, in tile
order; every job ends with exactly one ``last`` batch (also an empty job); a
slide that fails is reported in the stream and the others go on; the caller's
job generator is consumed lazily, one slide ahead, in a background thread, so
the next slide is planned and read while the current one finishes; and workers
never outlive the stream, however it ends.
"""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from preprocessing.encoders import Encoder
from preprocessing.extract import SlideJob, extract_features, extract_slides

TILE = 64


@pytest.fixture(autouse=True)
def _keep_threads(keep_threads):
    """Every test here restores torch's thread count (tests/preprocessing/conftest.py)."""


def _grid(n: int, offset: int = 0) -> np.ndarray:
    return np.array([(x + offset, y) for y in range(0, 2700, 200) for x in range(0, 2000, 200)][:n], dtype=np.int64)


def _job(path, coords, key, **kw) -> SlideJob:
    return SlideJob(path, coords, kw.pop("read_level", 0), TILE, TILE, key=key)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_jobs_stream_in_order_and_failures_do_not_stop_it(slide_file, encoder: Encoder, num_workers: int):
    good, corrupt = slide_file("cmu-1-small-region.svs"), slide_file("unreadable.svs")
    jobs = [
        _job(good, _grid(5), "a"),
        _job(corrupt, np.zeros((6, 2), np.int64), "corrupt"),  # opens, tiles fail
        _job(good, _grid(0), "empty"),
        _job(slide_file("broken.svs"), _grid(2), "broken"),  # does not open
        _job(good, _grid(2), "level", read_level=5),  # no such level
        _job(good, _grid(7, offset=37), "b"),
    ]
    out = list(extract_slides(jobs, encoder=encoder, batch_size=2, num_workers=num_workers, device="cpu",
                              progress=False))
    keys = [b.job.key for b in out]
    assert keys == sorted(keys, key=[j.key for j in jobs].index)  # jobs in order, never interleaved
    lasts = [b.job.key for b in out if b.last]
    assert lasts == [j.key for j in jobs]  # exactly one last batch per job
    errors = {b.job.key: b.error for b in out if b.error is not None}
    assert set(errors) == {"corrupt", "broken", "level"}
    assert "Bogus marker length" in str(errors["corrupt"]) and "read level 5 does not exist" in str(errors["level"])
    assert "broken.svs" in str(errors["broken"])
    for job in (jobs[0], jobs[5]):
        batches = [b for b in out if b.job is job]
        assert [len(b.coords) for b in batches] == [2] * (len(job.coords) // 2) + [len(job.coords) % 2] * (
            len(job.coords) % 2)
        assert np.array_equal(np.concatenate([b.coords for b in batches]), job.coords)
        direct = np.concatenate([f for _, f in extract_features(good, job.coords, read_level=0, read_size=TILE,
                                                                tile_size=TILE, encoder=encoder, batch_size=3,
                                                                device="cpu", progress=False)])
        np.testing.assert_allclose(np.concatenate([b.features for b in batches]), direct, rtol=1e-4, atol=1e-4)
    empty = [b for b in out if b.job.key == "empty"]
    assert len(empty) == 1 and empty[0].coords.shape == (0, 2) and empty[0].features.shape == (0, encoder.dim)
    assert multiprocessing.active_children() == []


def test_next_slide_is_planned_in_background_before_the_current_one_ends(slide_file, encoder: Encoder):
    path = slide_file("cmu-1-small-region.svs")
    events: list[str] = []
    planners: set[str] = set()

    def plan():
        for k in range(4):
            planners.add(threading.current_thread().name)
            events.append(f"plan {k}")
            yield _job(path, _grid(6, offset=k), k)

    for batch in extract_slides(plan(), encoder=encoder, batch_size=2, num_workers=1, device="cpu", progress=False):
        if batch.last:
            events.append(f"done {batch.job.key}")
    assert planners == {"slide-planner"}
    for k in range(3):  # slide k+1 was planned (and scheduled) before slide k's features were all out
        assert events.index(f"plan {k + 1}") < events.index(f"done {k}")
    assert events.index("plan 3") > events.index("plan 0")  # lazily: not all at once before the first slide
    assert multiprocessing.active_children() == []


def test_planner_errors_reach_the_caller_and_early_stops_clean_up(slide_file, encoder: Encoder):
    path = slide_file("cmu-1-small-region.svs")

    def plan():
        yield _job(path, _grid(4), 0)
        raise RuntimeError("tissue detection exploded")

    with pytest.raises(RuntimeError, match="tissue detection exploded"):
        for _ in extract_slides(plan(), encoder=encoder, batch_size=2, num_workers=1, device="cpu", progress=False):
            pass
    assert multiprocessing.active_children() == []

    stream = extract_slides([_job(path, _grid(20), 0)] * 3, encoder=encoder, batch_size=2, num_workers=1,
                            device="cpu", progress=False)
    first = next(stream)
    assert len(first.coords) == 2 and not first.last
    stream.close()  # the caller stops early: workers and the planner thread go
    assert multiprocessing.active_children() == []
    with pytest.raises(TypeError, match="SlideJob"):
        list(extract_slides([("not", "a job")], encoder=encoder, device="cpu", progress=False))


def test_slide_job_checks_its_input(slide_file):
    with pytest.raises(ValueError, match=r"integer \(n, 2\)"):
        SlideJob("x.svs", np.zeros((3, 3)), 0, TILE, TILE)
    with pytest.raises(ValueError, match="must be positive"):
        SlideJob("x.svs", _grid(1), 0, 0, TILE)
