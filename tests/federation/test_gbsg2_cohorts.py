"""The GBSG2 federated benchmark's cohorts: real HDF5 one-instance bags, three grade sites, one fixed split.

The benchmark itself (scripts/bench_survival.py --federated) takes minutes; this checks what it trains on.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from preprocessing.h5format import check_feature_file, read_features
from wsi_fl.benchmarks.survival_federated import write_gbsg2_cohorts
from wsi_fl.site.data import discover_cohort


@pytest.mark.slow  # 686 HDF5 files
def test_gbsg2_cohorts_split_by_grade_with_the_same_test_patients_everywhere(tmp_path):
    sizes = write_gbsg2_cohorts(tmp_path)
    assert {g: sum(s[k] for k in ("train", "val", "test")) for g, s in sizes.items()} == {"I": 81, "II": 444,
                                                                                          "III": 161}
    assert [s.name for s in discover_cohort(tmp_path / "federated")] == ["grade_I", "grade_II", "grade_III"]
    assert [s.name for s in discover_cohort(tmp_path / "local_I")] == ["grade_I"]
    rows = {}
    for site in discover_cohort(tmp_path / "federated"):
        with site.labels.open() as f:
            for r in csv.DictReader(f):
                rows[r["slide_id"]] = r
        x, _, _ = read_features(site.features_dir / f"{r['slide_id']}.h5")
        assert x.shape[0] == 1 and check_feature_file(site.features_dir / f"{r['slide_id']}.h5")
    with (tmp_path / "pooled" / "all" / "labels.csv").open() as f:
        pooled = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert pooled == rows and len(pooled) == 686  # the pooled arm splits exactly as the sites do
    assert sum(r["split"] == "test" for r in rows.values()) == 173
    assert np.isclose(np.mean([int(r["event"]) for r in rows.values()]), 299 / 686)
