"""End-to-end preprocessing: the shared real slides, re-runs, staleness, sharding, interruption."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocessing.h5format import check_feature_file, read_features
from preprocessing.pipeline import discover_slides, parse_shard, plan_tasks
from wsi_fl.cli import main

FAST = ["--encoder", "resnet18_trunc", "--random-init", "--quiet"]


def _manifest(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def cohort_slides(tmp_path_factory) -> Path:
    from preprocessing.synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    (site,) = generate_cohort(out, sites=1, slides_per_site=3, seed=7, progress=False)
    return site.slides_dir


@pytest.fixture(scope="module")
def shared_run(testdata, tmp_path_factory):
    """One batch over every shared real slide, with no MPP supplied by the user."""
    out = tmp_path_factory.mktemp("shared")
    code = main(["preprocess", "--slides", str(testdata / "slides"), "--out", str(out), *FAST])
    return code, out


def test_batch_goes_on_past_bad_slides_and_exit_code_says_so(shared_run):
    code, out = shared_run
    assert code == 1
    rows = _manifest(out / "manifest.csv")
    status = {k: v["status"] for k, v in rows.items()}
    assert status == {
        "boxes": "failed", "slides": "empty", "broken": "failed", "cmu-1-small-region": "ok",
        "kidney-48-5": "failed", "small": "empty", "tcga-cr-7395-01a-01-ts1": "failed",
        "unopenable": "failed", "unreadable": "failed",
    }  # boxes_0.dcm and boxes_1.dcm are one DICOM slide, named after its folder (here slides/)
    errors = {k: v["error"] for k, v in rows.items()}
    assert "no microns-per-pixel (MPP)" in errors["tcga-cr-7395-01a-01-ts1"]
    assert "no microns-per-pixel (MPP)" in errors["kidney-48-5"]
    assert "implausible MPP 352.778" in errors["boxes"]
    assert "Unsupported TIFF compression" in errors["unopenable"]
    assert "Bogus marker length" in errors["unreadable"]
    assert "cannot open as a slide" in errors["broken"]
    assert "smaller than one tile" in errors["small"] and rows["small"]["n_tiles"] == "0"
    assert errors["slides"].startswith("no tiles: slide 16x16 px is smaller than one tile")
    for slide_id, row in rows.items():
        assert "\n" not in row["error"]
        feature_file = out / "features" / f"{slide_id}.h5"
        assert feature_file.exists() == (row["status"] in ("ok", "empty"))
    assert not [p for p in (out / "features").iterdir() if p.name.startswith(".")]  # nothing half-written


def test_real_aperio_slide_features_and_provenance(shared_run, testdata):
    _, out = shared_run
    feats, coords, attrs = read_features(out / "features" / "cmu-1-small-region.h5")
    assert len(feats) > 20 and feats.shape[1] == 256 and coords.shape == (len(feats), 2)
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["mpp_source"] == "file"
    assert attrs["target_mpp"] == 0.5 and attrs["tile_size"] == 224
    assert attrs["tile_size_level0"] == pytest.approx(224 * 0.5 / 0.499)
    assert attrs["encoder"] == "resnet18_trunc" and attrs["weights"] == "random-init"
    assert attrs["source_file"] == "cmu-1-small-region.svs"
    assert attrs["source_size"] == (testdata / "slides" / "cmu-1-small-region.svs").stat().st_size
    assert attrs["source_fingerprint"].startswith("blake2b:") and attrs["created"]
    assert (coords[:, 0] + attrs["tile_size_level0"] <= 2220 + 1).all()
    assert (out / "qc" / "cmu-1-small-region.png").stat().st_size > 1000


def test_user_supplied_mpp_lets_slides_without_one_through(testdata, tmp_path):
    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\ntcga-cr-7395-01a-01-ts1,0.25\n")
    slides = [testdata / "slides" / n for n in ("tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif")]
    code = main(["preprocess", "--slides", *map(str, slides), "--out", str(tmp_path / "o"),
                 "--mpp-csv", str(mpp_csv), "--default-mpp", "1.0", *FAST])
    assert code == 0
    rows = _manifest(tmp_path / "o" / "manifest.csv")
    assert int(rows["tcga-cr-7395-01a-01-ts1"]["n_tiles"]) > 10
    tcga = check_feature_file(tmp_path / "o" / "features" / "tcga-cr-7395-01a-01-ts1.h5").attrs
    assert tcga["mpp_source"] == "user-csv" and tcga["mpp"] == 0.25 and tcga["read_level"] == 1
    kidney = check_feature_file(tmp_path / "o" / "features" / "kidney-48-5.h5").attrs
    assert kidney["mpp_source"] == "user-default" and kidney["mpp"] == 1.0


def test_rerun_skips_valid_outputs_and_redoes_stale_or_damaged_ones(cohort_slides, tmp_path):
    args = ["preprocess", "--slides", str(cohort_slides), "--out", str(tmp_path), *FAST]
    assert main(args) == 0
    first = _manifest(tmp_path / "manifest.csv")
    assert {r["status"] for r in first.values()} == {"ok"}
    assert main(args) == 0
    assert {r["status"] for r in _manifest(tmp_path / "manifest.csv").values()} == {"skipped"}
    victim = sorted(first)[0]
    damaged = tmp_path / "features" / f"{victim}.h5"
    damaged.write_bytes(damaged.read_bytes()[:4096])
    assert main(args) == 0
    rows = _manifest(tmp_path / "manifest.csv")
    assert rows[victim]["status"] == "ok" and rows[victim]["n_tiles"] == first[victim]["n_tiles"]
    assert {rows[k]["status"] for k in rows if k != victim} == {"skipped"}
    assert main([*args, "--min-tissue", "0.8"]) == 0  # a changed parameter makes every output stale
    rows = _manifest(tmp_path / "manifest.csv")
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert sum(int(r["n_tiles"]) for r in rows.values()) < sum(int(r["n_tiles"]) for r in first.values())
    assert main([*args, "--min-tissue", "0.8", "--overwrite"]) == 0
    assert {r["status"] for r in _manifest(tmp_path / "manifest.csv").values()} == {"ok"}


def test_shards_split_slides_disjointly_and_completely(cohort_slides, tmp_path):
    slides = discover_slides([cohort_slides])
    shares = [{t.slide_id for t in plan_tasks(slides, (i, 2))} for i in range(2)]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == {p.stem for p in slides}
    for i in range(2):
        assert main(["preprocess", "--slides", str(cohort_slides), "--out", str(tmp_path), "--shard", f"{i}/2",
                     *FAST]) == 0
    done = {p.stem for p in (tmp_path / "features").glob("*.h5")}
    assert done == {p.stem for p in slides}
    for i in range(2):
        assert set(_manifest(tmp_path / f"manifest.shard-{i}-of-2.csv")) == shares[i]


def test_shard_parsing():
    assert parse_shard("1/4") == (1, 4)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
                                "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    assert parse_shard("auto", {"JOB_COMPLETION_INDEX": "0", "WSI_FL_SHARD_COUNT": "2"}) == (0, 2)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def _slurm(task: int, count: int, first: int = 0, step: int | None = None, **more: str) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_COUNT": str(count),
           **more}
    return env | ({"SLURM_ARRAY_TASK_STEP": str(step)} if step is not None else {})


def test_slurm_shard_honours_step_and_min_and_resubmitted_tasks():
    # --array=0-14:2 (8 tasks) and --array=1-15:2: the same 8 shards
    assert [parse_shard("auto", _slurm(t, 8, 0, 2)) for t in range(0, 15, 2)] == [(i, 8) for i in range(8)]
    assert [parse_shard("auto", _slurm(t, 8, 1, 2)) for t in range(1, 16, 2)] == [(i, 8) for i in range(8)]
    # redoing tasks 3 and 5 of an 8-task array (--array=3,5): WSI_FL_SHARD_COUNT says which array they belong to
    assert parse_shard("auto", _slurm(5, 2, 3, 2, WSI_FL_SHARD_COUNT="8")) == (5, 8)
    # ... and without it a resubmitted task refuses instead of taking itself for the whole batch (shard 0/1)
    with pytest.raises(ValueError, match="array of one task: to redo one shard"):
        parse_shard("auto", _slurm(5, 1, 5))
    assert parse_shard("auto", _slurm(0, 1)) == (0, 1)  # a genuine one-task array
    with pytest.raises(ValueError, match="not min 1 plus a multiple of step 2"):
        parse_shard("auto", _slurm(4, 3, 1, 2))
    with pytest.raises(ValueError, match="gives shard 4/4"):
        parse_shard("auto", _slurm(4, 4))
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT='' is not a whole number"):
        parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "1"})


def test_a_slide_without_tiles_is_empty_with_its_reason_on_every_run(slide_file, tmp_path, capsys):
    args = ["preprocess", "--slides", str(slide_file("small.svs")), "--out", str(tmp_path), *FAST]
    for _ in range(2):  # the re-run finds the output done, and still says why it is empty
        assert main(args) == 0  # nothing failed
        row = _manifest(tmp_path / "manifest.csv")["small"]
        assert row["status"] == "empty" and row["n_tiles"] == "0"
        assert row["error"] == "no tiles: slide 16x16 px is smaller than one tile (224 px at level 0)"
        out = capsys.readouterr().out
        assert "1 slides: 0 ok, 0 skipped, 1 empty, 0 failed; 0 tiles" in out
        assert "  empty: small: no tiles: slide 16x16 px is smaller than one tile" in out


def test_duplicate_slide_ids_refused(tmp_path):
    with pytest.raises(ValueError, match="two slides share the id 'a'"):
        plan_tasks([tmp_path / "x" / "a.svs", tmp_path / "y" / "a.tiff"])


def _start(slides: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "wsi_fl", "preprocess", "--slides", str(slides), "--out", str(out),
           "--encoder", "resnet18_trunc", "--random-init", "--quiet", "--batch-size", "2"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_partial(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((out / "features").glob(".*.partial")) if (out / "features").exists() else []:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    raise AssertionError("no feature file was started")


def _assert_nothing_mistaken_for_complete(out: Path) -> None:
    for h5 in (out / "features").glob("*.h5"):
        check_feature_file(h5)  # every file under a final name is complete and valid


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_leaves_nothing_mistaken_for_complete_and_resumes(cohort_slides, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(cohort_slides, out)
    _wait_for_partial(out, proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0]
    _assert_nothing_mistaken_for_complete(out)
    if sig == signal.SIGTERM:  # a clean stop: exit 130, partial file removed, manifest written
        assert proc.returncode == 130, output
        assert not list((out / "features").glob(".*.partial"))
        rows = _manifest(out / "manifest.csv").values()
        interrupted = [r for r in rows if r["status"] == "failed"]
        # the slide in progress is marked; a signal landing between two slides leaves none in progress
        assert len(interrupted) <= 1 and all(r["error"] == "interrupted before completion" for r in interrupted)
        assert all(r["status"] in ("ok", "failed") for r in rows)
    before = {p.name for p in (out / "features").glob("*.h5")}
    rerun = _start(cohort_slides, out)
    assert rerun.wait(timeout=600) == 0, rerun.communicate()[0]
    rows = _manifest(out / "manifest.csv")
    assert {k for k, r in rows.items() if r["status"] == "skipped"} == {Path(n).stem for n in before}
    assert len(list((out / "features").glob("*.h5"))) == len(rows)
    assert not list((out / "features").glob(".*.partial"))  # the killed run's temporary was cleaned up
    _assert_nothing_mistaken_for_complete(out)


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["preprocess", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "no slide files found" in capsys.readouterr().err
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    assert main(["preprocess", "--slides", str(slide), "--out", str(tmp_path / "o"), "--shard", "5/2", *FAST]) == 2
    assert main(["preprocess", "--slides", str(slide), "--out", str(tmp_path / "o"), "--encoder", "nope"]) == 2
    err = capsys.readouterr().err
    assert "need 0 <= i < n" in err and "nope" in err


def test_precision_option_is_recorded_and_a_change_redoes_the_outputs(cohort_slides, tmp_path):
    import h5py

    args = ["preprocess", "--slides", str(cohort_slides), "--out", str(tmp_path), *FAST]
    assert main([*args, "--precision", "bf16"]) == 0
    files = sorted((tmp_path / "features").glob("*.h5"))
    assert files
    for f in files:
        with h5py.File(f, "r") as h5:
            assert h5.attrs["precision"] == "bf16"
        check_feature_file(f)
    assert main(args) == 0  # back to the card's fp32: nothing of the bf16 run is reused
    assert {r["status"] for r in _manifest(tmp_path / "manifest.csv").values()} == {"ok"}
    with h5py.File(files[0], "r") as h5:
        assert h5.attrs["precision"] == "fp32"
