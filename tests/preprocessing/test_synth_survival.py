"""``synth-cohort --task survival``: times from the planted tumour burden, independent censoring, deterministic."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from preprocessing._synth_survival import SURVIVAL_LABELS_HEADER, SurvivalModel, survival_rows
from preprocessing.errors import InputError
from preprocessing.synth import generate_cohort
from wsi_fl.cli import main
from wsi_fl.evaluation.survival import harrell_c
from wsi_fl.mil.survival_labels import read_survival_labels


def fake_site(n: int, seed: int) -> tuple[list, list, np.ndarray]:
    """Plans of ``n`` single-slide patients and two-slide patient pairs, with planted rectangles on responders."""
    rng = np.random.default_rng(seed)
    plans, planted, burden = [], [], []
    for i in range(n):
        label = int(rng.random() < 0.5)
        patient = f"p{i // 2}" if i < 10 else f"p{i}"
        if i % 2 and i < 10:
            label = plans[-1].label  # a patient's two slides share the label
        plans.append(SimpleNamespace(slide_id=f"s{i:03d}", patient_id=patient, label=label, width=1000,
                                     height=1000))
        b = rng.uniform(0.04, 0.15) if label else 0.0
        if label:
            planted.append((f"s{i:03d}", 0, 0, 500, int(2000 * b)))
        burden.append(b)
    return plans, planted, np.array(burden)


def test_survival_rows_are_deterministic_per_patient_and_follow_the_burden() -> None:
    plans, planted, burden = fake_site(400, 0)
    rows = survival_rows(plans, planted, seed=7, site=1)
    assert rows == survival_rows(plans, planted, seed=7, site=1)
    assert rows != survival_rows(plans, planted, seed=8, site=1)
    assert [r[0] for r in rows] == [p.slide_id for p in plans] and len(rows[0]) == len(SURVIVAL_LABELS_HEADER)
    # the slide order does not change any patient's draw
    shuffled = survival_rows(plans[::-1], planted, seed=7, site=1)
    assert sorted(shuffled) == sorted(rows)
    outcome: dict[str, set] = {}
    for _slide, _label, patient, time, event in rows:
        outcome.setdefault(patient, set()).add((time, event))
    assert all(len(v) == 1 for v in outcome.values())  # a patient's slides share time and event
    time = np.array([float(r[3]) for r in rows])
    event = np.array([r[4] for r in rows])
    assert (time > 0).all() and set(event.tolist()) == {0, 1} and 0.1 < 1 - event.mean() < 0.6
    labels = np.array([p.label for p in plans])
    assert np.median(time[labels == 1]) < np.median(time[labels == 0]) / 3  # responders die much sooner
    responders = labels == 1
    assert harrell_c(time[responders], event[responders], burden[responders]) > 0.6  # and sooner with more tumour
    assert harrell_c(time, event, burden + labels) > 0.75


def test_censoring_does_not_depend_on_the_outcome() -> None:
    """Censoring times are drawn whatever the hazard: the same censoring with any tumour effect."""
    plans, planted, _ = fake_site(200, 1)
    strong = survival_rows(plans, planted, 3, 1, SurvivalModel(beta_responder=3.0))
    none = survival_rows(plans, planted, 3, 1, SurvivalModel(beta_responder=0.0, beta_burden=0.0))
    for a, b in zip(strong, none, strict=True):
        if not a[4] and not b[4]:  # censored in both: at the same censoring time
            assert a[3] == b[3]
    with pytest.raises(InputError, match="SurvivalModel"):
        SurvivalModel(shape=0.0)


@pytest.mark.slow
def test_synth_cohort_cli_survival_labels_beside_the_unchanged_cohort(tmp_path: Path, capsys) -> None:
    code = main(["synth-cohort", "--task", "survival", "--out", str(tmp_path / "surv"), "--sites", "1",
                 "--slides-per-site", "3", "--seed", "4", "--quiet"])
    assert code == 0 and "site_1: 3 slides" in capsys.readouterr().out
    generate_cohort(tmp_path / "cls", sites=1, slides_per_site=3, seed=4, progress=False)
    site_s, site_c = tmp_path / "surv" / "site_1", tmp_path / "cls" / "site_1"
    with open(site_s / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(SURVIVAL_LABELS_HEADER)
    with open(site_c / "labels.csv") as f:
        assert [(r["slide_id"], r["label"], r["patient_id"]) for r in rows] == \
            [(r["slide_id"], r["label"], r["patient_id"]) for r in csv.DictReader(f)]
    assert (site_s / "planted.csv").read_bytes() == (site_c / "planted.csv").read_bytes()
    outcomes = read_survival_labels(site_s / "labels.csv")  # what wsi-fl train --task survival reads
    assert len(outcomes) == 3 and all(t > 0 for t, _ in outcomes.values())
    with pytest.raises(InputError, match="task"):
        generate_cohort(tmp_path / "x", sites=1, slides_per_site=1, task="regression", progress=False)
