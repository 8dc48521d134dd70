"""Stain options end to end: applied before the encoder, recorded, and mixing differently normalised sites refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from models.checkpoint import ProvenanceError, check_provenance, provenance_value
from preprocessing.h5format import read_features
from preprocessing.synth import SynthConfig, generate_cohort
from wsi_fl.cli import main
from wsi_fl.mil.data import BagDataError, FeatureBagDataset, read_labels
from wsi_fl.mil.fit import Site, fit

FAST = ["--encoder", "resnet18_trunc", "--random-init", "--quiet"]
SMALL = SynthConfig(size_range=(1300, 1500), min_region_side=224)


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    """Two sites of four small slides; site_1 preprocessed without stain normalisation, site_2 with Macenko."""
    root = tmp_path_factory.mktemp("stain")
    summaries = generate_cohort(root / "cohort", sites=2, slides_per_site=4, seed=3, config=SMALL, progress=False)
    sites = []
    for summary, stain in zip(summaries, (["--stain", "none"], ["--stain", "macenko"]), strict=True):
        out = root / summary.site
        assert main(["preprocess", "--slides", str(summary.slides_dir), "--out", str(out), *stain, *FAST]) == 0
        sites.append(Site(summary.site, out / "features", summary.labels_csv))
    return root, summaries, sites


def test_stain_is_recorded_and_changes_the_features(two_sites, tmp_path):
    _, summaries, sites = two_sites
    slide = sorted(summaries[1].slides_dir.glob("*.tiff"))[0]
    feats_macenko, coords, attrs = read_features(sites[1].features_dir / f"{slide.stem}.h5")
    assert attrs["stain"].startswith("macenko:") and '"method": "macenko"' in attrs["stain_params"]
    assert main(["preprocess", "--slides", str(slide), "--out", str(tmp_path / "none"), *FAST]) == 0
    feats_none, coords_none, attrs_none = read_features(tmp_path / "none" / "features" / f"{slide.stem}.h5")
    assert attrs_none["stain"] == "none" and np.array_equal(coords, coords_none)
    assert not np.allclose(feats_macenko, feats_none, atol=1e-3)  # normalised tiles reached the encoder
    # HED jitter: seeded per slide and tile, so a rerun gives the same features; recorded in the identity
    runs = []
    for k in range(2):
        out = tmp_path / f"jitter{k}"
        assert main(["preprocess", "--slides", str(slide), "--out", str(out), "--hed-jitter", "0.05", *FAST]) == 0
        runs.append(read_features(out / "features" / f"{slide.stem}.h5"))
    assert np.array_equal(runs[0][0], runs[1][0]) and not np.allclose(runs[0][0], feats_none, atol=1e-3)
    assert runs[0][2]["stain"] == "none+hed0.05/seed0"


def test_pooling_sites_normalised_differently_is_refused_in_one_line(two_sites, tmp_path):
    _, _, sites = two_sites
    datasets = [FeatureBagDataset(read_labels(s.labels).records, s.features_dir) for s in sites]
    assert datasets[0].provenance["stain"] == "none" and datasets[1].provenance["stain"].startswith("macenko:")
    with pytest.raises(ProvenanceError) as err:
        check_provenance(datasets[0].provenance, datasets[1].provenance, "site site_2", expected_from="site site_1")
    message = str(err.value)
    assert "stain: site site_1 'none' vs features 'macenko:" in message and "\n" not in message
    assert "--stain" in message  # says what to change
    with pytest.raises(ProvenanceError, match=r"site site_2: .*stain: .*'none' vs features 'macenko:") as err:
        fit(sites, tmp_path / "model", progress=False)
    assert "\n" not in str(err.value)
    # the same site twice is fine (and missing attributes in older files mean "none")
    check_provenance(datasets[0].provenance, {k: v for k, v in datasets[0].provenance.items() if k != "stain"}, "s")
    assert provenance_value({}, "stain") == "none"


def test_one_directory_mixing_stain_settings_is_refused(two_sites, tmp_path):
    _, _, sites = two_sites
    mixed = tmp_path / "features"
    shutil.copytree(sites[0].features_dir, mixed)
    stranger = sorted(sites[1].features_dir.glob("*.h5"))[0]
    shutil.copy(stranger, mixed / stranger.name)
    records = read_labels(sites[0].labels).records
    records += [r for r in read_labels(sites[1].labels).records if r.slide_id == stranger.stem]
    with pytest.raises(BagDataError, match=r"differ in stain: 'none' vs 'macenko:"):
        FeatureBagDataset(records, mixed)
