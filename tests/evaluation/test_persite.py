"""``wsi-fl evaluate`` on a labels file spanning several sites: per-site AUC with CI, each site's split redrawn."""

from __future__ import annotations

import csv
import json

import pytest
from bagsites import make_site

from wsi_fl.cli import main
from wsi_fl.mil.fit import fit
from wsi_fl.mil.training import TrainConfig


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """A pooled model of three sites, and one features dir + labels file (with a site column) over all of them."""
    root = tmp_path_factory.mktemp("persite")
    sites = [make_site(root, name, n, seed=k) for k, (name, n) in enumerate([("a", 12), ("b", 10), ("c", 14)])]
    fit(sites, root / "run", train=TrainConfig(epochs=3, lr=1e-3, seed=0), progress=False)
    features = root / "all" / "features"
    features.mkdir(parents=True)
    rows = []
    for site in sites:
        for path in sorted(site.features_dir.glob("*.h5")):
            (features / path.name).symlink_to(path)
        with site.labels.open() as f:
            rows += [(r["slide_id"], r["label"], r["patient_id"], site.name) for r in csv.DictReader(f)]
    labels = root / "all" / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label", "patient_id", "hospital"), *rows])
    return root, features, labels


def _evaluate(root, features, labels, out, *extra):
    return main(["evaluate", "--model", str(root / "run" / "model.pt"), "--features", str(features), "--labels",
                 str(labels), "--out", str(out), "--bootstrap", "50", *extra])


@pytest.mark.slow  # a pooled fit and three evaluations
def test_per_site_scores_of_the_held_out_split_redrawn_site_by_site(pooled, capsys):
    root, features, labels = pooled
    assert _evaluate(root, features, labels, root / "eval", "--site-col", "hospital") == 0
    with (root / "run" / "splits.csv").open() as f:
        test_by_site = {}
        for r in csv.DictReader(f):
            if r["split"] == "test":
                test_by_site.setdefault(r["site"], set()).add(r["slide_id"])
    with (root / "eval" / "predictions.csv").open() as f:
        scored = {r["slide_id"] for r in csv.DictReader(f)}
    assert scored == set().union(*test_by_site.values())  # exactly the slides training held out, per site
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    per_site = metrics["per_site"]
    assert list(per_site) == ["a", "b", "c"]
    for site, m in per_site.items():
        assert m["n"] == len(test_by_site[site]) and set(m) >= {"auc", "auc_ci95", "n_positive", "accuracy"}
    with (root / "eval" / "per_site.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["site"] for r in rows] == ["a", "b", "c"] and int(rows[0]["n_slides"]) == per_site["a"]["n"]
    out = capsys.readouterr().out
    assert "site a: AUC" in out and "site c: AUC" in out and "slides" in out


@pytest.mark.slow
def test_split_all_scores_every_slide_of_every_site(pooled):
    root, features, labels = pooled
    assert _evaluate(root, features, labels, root / "all_eval", "--site-col", "hospital", "--split", "all") == 0
    per_site = json.loads((root / "all_eval" / "metrics.json").read_text())["per_site"]
    assert {s: m["n"] for s, m in per_site.items()} == {"a": 12, "b": 10, "c": 14}
    assert all(m["n_positive"] == m["n"] // 2 and m["auc_ci95"] is not None for m in per_site.values())


@pytest.mark.slow
def test_without_a_site_column_nothing_changes_and_a_named_missing_one_is_an_error(pooled, capsys):
    root, features, labels = pooled
    assert _evaluate(root, features, labels, root / "plain", "--split", "all") == 0
    assert "per_site" not in json.loads((root / "plain" / "metrics.json").read_text())
    assert not (root / "plain" / "per_site.csv").exists()
    capsys.readouterr()
    assert _evaluate(root, features, labels, root / "bad", "--site-col", "centre") != 0
    err = capsys.readouterr().err
    assert "no column 'centre' naming each slide's site" in err and str(labels) in err
