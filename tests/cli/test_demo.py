"""``wsi-fl demo``, the main job: every stage on a small realistic cohort, and the command's input checks.

The end-to-end test runs the real pipeline (synthetic slides through OpenSlide, resnet18_trunc features, MIL
training, the real Flower ServerApp/ClientApp in-process, the leave-one-site-out evaluation) on small slides and
few of them; it checks what the job promises to write and that the figures are consistent, not their values
(which a cohort this small cannot pin down).
"""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

from preprocessing.synth import PRESETS
from wsi_fl import demo
from wsi_fl.cli._common import EXIT_USAGE
from wsi_fl.cli.main import build_parser, dispatch
from wsi_fl.demo import Timer, compare_demo_models, format_unseen, run_demo, train_demo_model, unseen_demo
from wsi_fl.evaluation.compare import format_table, plot_comparison

SMALL_REALISTIC = replace(PRESETS["realistic"], size_range=(1000, 1100), min_region_side=256)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_demo_job_end_to_end_on_a_small_realistic_cohort(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "EPOCHS", 3)  # every model and round count reads it: the stages, not the figures
    timer = Timer()
    reports = run_demo(tmp_path, slides_per_site=8, preset=SMALL_REALISTIC, progress=False, timer=timer,
                       preprocess_options={"qc": False})
    assert [r.slides for r in reports] == [16, 8, 3] and not any(r.failed for r in reports)  # sizes 2 : 1 : 0.4
    train_demo_model(tmp_path, reports, progress=False, timer=timer)
    scored = compare_demo_models(tmp_path, reports, progress=False, engine="inline", timer=timer)
    assert [s.name for s in scored] == ["federated (FedAvg)", "pooled", "local site_1", "local site_2",
                                        "local site_3"]
    assert len({s.n for s in scored}) == 1 and len({s.n_positive for s in scored}) == 1  # one shared test set
    table = rows(tmp_path / "comparison.csv")
    assert [r["model"] for r in table] == [s.name for s in scored]
    for s, r in zip(scored, table, strict=True):
        assert float(r["test_auc"]) == pytest.approx(s.auc, abs=1e-4) and int(r["n_slides"]) == s.n
        if s.ci:
            assert float(r["ci_low"]) <= float(r["ci_high"]) and 0 <= s.ci[0] <= s.ci[1] <= 1
    assert "95% CI" in format_table(scored)

    unseen = unseen_demo(tmp_path, reports, progress=False, timer=timer)
    assert {(r.held_out, r.mode) for r in unseen} == {(f"site_{k}", m) for k in (1, 2, 3)
                                                     for m in ("pooled", "federated")}
    by_site = {r.held_out: r.n_slides for r in unseen}
    assert by_site == {r.site: r.slides for r in reports}  # every slide of the site left out is scored
    csv_rows = rows(tmp_path / "unseen_sites.csv")
    assert len(csv_rows) == 6 and set(csv_rows[0]) >= {"held_out", "mode", "auc", "ci_low", "ci_high"}
    assert "site_3" in format_unseen(unseen)
    png = plot_comparison(scored, tmp_path / "comparison.png", unseen=unseen)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(timer.stages) == ["synthesis", "preprocessing", "pooled", "local", "federated",
                                  "leave-one-site-out"]
    assert all(np.isfinite(v) and v >= 0 for v in timer.stages.values())


@pytest.mark.parametrize("argv, message", [
    (["demo", "--sites", "1"], "--sites >= 2"),
    (["synth-cohort", "--out", "x", "--shortcut-strength", "0.5"], "--shortcut-site"),
    (["synth-cohort", "--out", "x", "--sites", "2", "--shortcut-site", "3"], "1..2"),
])
def test_bad_options_are_one_line_usage_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dispatch(build_parser().parse_args(argv)) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_synth_cohort_preset_and_shortcut_options(tmp_path, capsys):
    args = build_parser().parse_args(["synth-cohort", "--out", str(tmp_path), "--sites", "2", "--slides-per-site",
                                      "1", "--preset", "realistic", "--shortcut-site", "2", "--quiet"])
    assert args.preset == "realistic"
    assert build_parser().parse_args(["demo"]).preset == "realistic"  # the main job's default cohort
    assert build_parser().parse_args(["synth-cohort", "--out", "x"]).preset == "default"
    assert dispatch(args) == 0
    out = capsys.readouterr().out
    assert "shortcut: responders of site_2" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_1", "site_2"]
