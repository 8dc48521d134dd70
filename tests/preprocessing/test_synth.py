"""The synthetic cohort: layout, slide readability, cohort rules, determinism and pixel properties.

Pixel checks read the written TIFFs back through OpenSlide, so they test what
the pipeline will see (JPEG-compressed, pyramidal), not the in-memory render.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from preprocessing.slide import open_slide
from preprocessing.synth import PRESETS, SiteSummary, SynthConfig, generate_cohort, preset

# Small slides keep the module fixture to a couple of seconds.
SMALL = SynthConfig(size_range=(1100, 1500), min_region_side=256)
TINY = SynthConfig(size_range=(1024, 1100), min_region_side=256)
TISSUE_GREY = 225  # tissue is darker than this; the glass is ~235-245


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def rects_by_slide(site_dir: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    for row in read_csv(site_dir / "planted.csv")[1]:
        out.setdefault(row["slide_id"], []).append(tuple(int(row[k]) for k in ("x", "y", "width", "height")))
    return out


def labels_of(site_dir: Path) -> dict[str, int]:
    return {row["slide_id"]: int(row["label"]) for row in read_csv(site_dir / "labels.csv")[1]}


def thumb_masks(path: Path, rects, ds: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thumbnail, tissue mask, planted mask) at ``ds`` level-0 px per thumbnail px."""
    with open_slide(path) as slide:
        thumb, _ = slide.thumbnail(ds)
    tissue = thumb.mean(axis=-1) < TISSUE_GREY
    planted = np.zeros_like(tissue)
    for x, y, w, h in rects:
        planted[y // ds : (y + h) // ds, x // ds : (x + w) // ds] = True
    return thumb, tissue, planted


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[SiteSummary]]:
    out = tmp_path_factory.mktemp("cohort")
    return out, generate_cohort(out, sites=3, slides_per_site=3, seed=0, config=SMALL, progress=False)


def test_layout_and_csv_headers(cohort):
    out, summaries = cohort
    assert [s.site for s in summaries] == ["site_1", "site_2", "site_3"]
    all_ids = []
    for s in summaries:
        assert s.slides_dir == out / s.site / "slides"
        assert s.labels_csv == out / s.site / "labels.csv"
        header, rows = read_csv(s.labels_csv)
        assert header == ["slide_id", "label", "patient_id"]
        assert read_csv(out / s.site / "planted.csv")[0] == ["slide_id", "x", "y", "width", "height"]
        ids = [r["slide_id"] for r in rows]
        assert len(ids) == s.n_slides
        assert sorted(p.stem for p in s.slides_dir.glob("*.tiff")) == sorted(ids)
        assert all(i.startswith(f"{s.site}_s") for i in ids)
        assert {r["label"] for r in rows} <= {"0", "1"}
        assert sum(int(r["label"]) for r in rows) == s.n_positive
        assert len({r["patient_id"] for r in rows}) == s.n_patients
        all_ids += ids
    assert len(all_ids) == len(set(all_ids))
    assert not list(out.rglob(".*.partial"))


def test_slides_open_as_pyramids_with_mpp(cohort):
    _, summaries = cohort
    lo, hi = SMALL.size_range
    for path in (p for s in summaries for p in s.slides_dir.glob("*.tiff")):
        with open_slide(path) as slide:
            assert slide.level_count > 1
            assert slide.mpp == pytest.approx(0.5)
            assert slide.info.mpp_source == "file"
            assert all(lo <= d <= hi for d in slide.dimensions)
            # Lower levels show the same slide: the coarsest level matches box-downsampled level 0.
            level = slide.level_count - 1
            ds = round(slide.level_downsamples[level])
            w, h = (min(256, d) for d in slide.level_dimensions[level])
            x0, y0 = (d // 4 // ds * ds for d in slide.dimensions)  # inside the slide, on the level's grid
            low = slide.read_region((x0, y0), level, (w, h)).astype(float)
            full = slide.read_region((x0, y0), 0, (w * ds, h * ds)).astype(float)
            box = full.reshape(h, ds, w, ds, 3).mean(axis=(1, 3))
            assert np.abs(low - box).mean() < 4


def test_sites_differ_in_size_and_prevalence_and_have_both_classes(cohort):
    _, summaries = cohort
    assert [s.n_slides for s in summaries] == [3, 4, 5]  # slides_per_site + k - 1
    prevalences = [s.n_positive / s.n_slides for s in summaries]
    assert len(set(prevalences)) > 1
    assert prevalences[0] < prevalences[-1]  # prevalence rises across sites
    assert all(0 < s.n_positive < s.n_slides for s in summaries)


def test_patients_share_labels_and_some_have_two_slides(cohort):
    _, summaries = cohort
    for s in summaries:
        rows = read_csv(s.labels_csv)[1]
        by_patient: dict[str, set[str]] = {}
        for r in rows:
            assert r["patient_id"].startswith(f"{s.site}_p")
            by_patient.setdefault(r["patient_id"], set()).add(r["label"])
        assert all(len(labels) == 1 for labels in by_patient.values())
        assert s.n_patients < s.n_slides  # at least one patient with two slides


def test_planted_rectangles_only_on_positives_inside_slide_and_tissue(cohort):
    out, summaries = cohort
    for s in summaries:
        labels = labels_of(out / s.site)
        rects = rects_by_slide(out / s.site)
        assert set(rects) == {sid for sid, label in labels.items() if label == 1}
        for sid, slide_rects in rects.items():
            with open_slide(s.slides_dir / f"{sid}.tiff") as slide:
                width, height = slide.dimensions
                for x, y, w, h in slide_rects:
                    assert w >= SMALL.min_region_side and h >= SMALL.min_region_side
                    assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
                    region = slide.read_region((x, y), 0, (w, h))
                    assert (region.mean(axis=-1) < TISSUE_GREY).mean() > 0.98
            for a, b in itertools.combinations(slide_rects, 2):  # regions do not overlap
                assert (
                    a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
                )


def test_planted_regions_look_different_from_normal_tissue(cohort):
    out, summaries = cohort
    for s in summaries:
        for sid, rects in rects_by_slide(out / s.site).items():
            thumb, tissue, planted = thumb_masks(s.slides_dir / f"{sid}.tiff", rects)
            tumour = thumb[planted].astype(float).mean(axis=0)
            normal = thumb[tissue & ~planted].astype(float).mean(axis=0)
            assert np.linalg.norm(tumour - normal) > 30
            assert tumour.mean() < normal.mean() - 20  # denser, darker nuclei


def test_tissue_covers_a_plausible_fraction_on_a_bright_background(cohort):
    _, summaries = cohort
    for path in (p for s in summaries for p in s.slides_dir.glob("*.tiff")):
        thumb, tissue, _ = thumb_masks(path, [])
        assert 0.25 < tissue.mean() < 0.65
        glass = thumb[~tissue].astype(float)
        assert 232 < np.median(glass) < 248


def test_site_colour_shift_is_measurable(cohort):
    out, summaries = cohort
    means = []
    for s in summaries:
        negatives = [sid for sid, label in labels_of(out / s.site).items() if label == 0]
        colours = []
        for sid in negatives:
            thumb, tissue, _ = thumb_masks(s.slides_dir / f"{sid}.tiff", [])
            colours.append(thumb[tissue].astype(float).mean(axis=0))
        means.append(np.mean(colours, axis=0))
    for a, b in itertools.combinations(means, 2):
        assert np.linalg.norm(a - b) > 5


def test_same_seed_same_cohort_other_seed_differs(tmp_path):
    def make(name: str, seed: int) -> Path:
        generate_cohort(tmp_path / name, sites=2, slides_per_site=2, seed=seed, config=TINY, progress=False)
        return tmp_path / name

    a, b, c = make("a", 7), make("b", 7), make("c", 8)
    for site in ("site_1", "site_2"):
        for name in ("labels.csv", "planted.csv"):
            assert (a / site / name).read_bytes() == (b / site / name).read_bytes()
    slides_a = sorted(a.rglob("*.tiff"))
    assert [p.relative_to(a) for p in slides_a] == [p.relative_to(b) for p in sorted(b.rglob("*.tiff"))]
    differs = []
    for pa in slides_a:
        rel = pa.relative_to(a)
        with open_slide(pa) as sa, open_slide(b / rel) as sb, open_slide(c / rel) as sc:
            pixels_a = sa.read_region((0, 0), 0, sa.dimensions)
            assert sa.dimensions == sb.dimensions
            assert np.array_equal(pixels_a, sb.read_region((0, 0), 0, sb.dimensions))
            differs.append(
                sa.dimensions != sc.dimensions
                or not np.array_equal(pixels_a, sc.read_region((0, 0), 0, sc.dimensions))
            )
    assert all(differs)


def test_default_config_gives_demo_sized_slides(tmp_path):
    """Default slides hold ~60-200 tissue tiles of 224 px, and a responder's regions hold whole tiles."""
    (summary,) = generate_cohort(tmp_path, sites=1, slides_per_site=2, progress=False)
    rects = rects_by_slide(tmp_path / "site_1")
    assert summary.n_positive == 1 and len(rects) == 1
    tile, ds = 224, 8
    for path in summary.slides_dir.glob("*.tiff"):
        _, tissue, planted = thumb_masks(path, rects.get(path.stem, []), ds)
        rows, cols = tissue.shape[0] * ds // tile, tissue.shape[1] * ds // tile
        k = tile // ds
        cells = tissue[: rows * k, : cols * k].reshape(rows, k, cols, k).mean(axis=(1, 3))
        assert 60 <= (cells > 0.5).sum() <= 200
        for x, y, w, h in rects.get(path.stem, []):
            # A tile of the 224-px grid counts as planted if most of it lies inside the rectangle.
            ox = np.clip(
                np.minimum(np.arange(cols) * tile + tile, x + w) - np.maximum(np.arange(cols) * tile, x),
                0,
                None,
            )
            oy = np.clip(
                np.minimum(np.arange(rows) * tile + tile, y + h) - np.maximum(np.arange(rows) * tile, y),
                0,
                None,
            )
            assert (np.outer(oy, ox) > tile * tile / 2).sum() >= 1
        if path.stem in rects:
            assert 0.1 <= planted.sum() / tissue.sum() <= 0.3


@pytest.mark.parametrize(
    "kwargs",
    [{"size_range": (3000, 2000)}, {"tissue_fraction": (0.5, 0.95)}, {"min_region_side": 5000}, {"mpp": 0}],
)
def test_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError, match="SynthConfig"):
        SynthConfig(**kwargs)


def test_generate_rejects_empty_cohort(tmp_path):
    with pytest.raises(ValueError):
        generate_cohort(tmp_path, sites=0, progress=False)


# -- presets and artifacts ------------------------------------------------------------------------
REALISTIC_SMALL = replace(
    PRESETS["realistic"], size_range=(1300, 1500), min_region_side=256, pen_strokes=(1, 1), folds=(0, 1)
)


def test_default_cohort_has_header_only_artifacts(cohort):
    out, summaries = cohort
    for s in summaries:
        assert (out / s.site / "artifacts.csv").read_text() == "slide_id,kind,x0,y0,x1,y1\n"


@pytest.mark.slow
def test_realistic_preset_is_deterministic_with_ground_truth(tmp_path):
    def make(name: str, seed: int) -> Path:
        generate_cohort(tmp_path / name, sites=3, slides_per_site=1, seed=seed, config=REALISTIC_SMALL, progress=False)
        return tmp_path / name

    a, b, c = make("a", 5), make("b", 5), make("c", 6)
    kinds = {"pen_blue", "pen_green", "pen_black", "fold", "blur"}
    for site, n_slides, mpp in [("site_1", 2, 0.5), ("site_2", 2, 0.5), ("site_3", 2, 0.4532)]:
        for name in ("labels.csv", "planted.csv", "artifacts.csv"):
            assert (a / site / name).read_bytes() == (b / site / name).read_bytes()
        assert (a / site / "artifacts.csv").read_bytes() != (c / site / "artifacts.csv").read_bytes()
        header, rows = read_csv(a / site / "artifacts.csv")
        assert header == ["slide_id", "kind", "x0", "y0", "x1", "y1"]
        assert len(labels_of(a / site)) == n_slides
        by_slide: dict[str, set[str]] = {}
        for r in rows:
            by_slide.setdefault(r["slide_id"], set()).add(r["kind"])
        assert set(by_slide) == set(labels_of(a / site))  # every slide has at least its pen stroke
        for sid, slide_kinds in by_slide.items():
            assert slide_kinds <= kinds and slide_kinds & {"pen_blue", "pen_green", "pen_black"}
            with open_slide(a / site / "slides" / f"{sid}.tiff") as slide:
                assert slide.mpp == pytest.approx(mpp)
                width, height = slide.dimensions
            for r in (r for r in rows if r["slide_id"] == sid):
                x0, y0, x1, y1 = (int(r[k]) for k in ("x0", "y0", "x1", "y1"))
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    for p, q in zip(sorted(a.rglob("*.tiff")), sorted(b.rglob("*.tiff")), strict=True):
        assert p.read_bytes() == q.read_bytes()


def test_pen_ink_darkens_its_boxes(tmp_path):
    generate_cohort(tmp_path, sites=1, slides_per_site=2, seed=1, config=REALISTIC_SMALL, progress=False)
    rows = read_csv(tmp_path / "site_1" / "artifacts.csv")[1]
    pens = [r for r in rows if r["kind"].startswith("pen")]
    assert pens
    for r in pens:
        with open_slide(tmp_path / "site_1" / "slides" / f"{r['slide_id']}.tiff") as slide:
            x0, y0, x1, y1 = (int(r[k]) for k in ("x0", "y0", "x1", "y1"))
            region = slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).astype(float)
        assert (region.mean(axis=-1) < 120).mean() > 0.15  # the stroke covers a good part of its box


def test_presets_and_per_site_validation(tmp_path):
    assert set(PRESETS) >= {"default", "realistic"} and PRESETS["default"] == SynthConfig()
    assert not PRESETS["default"].has_artifacts and PRESETS["realistic"].has_artifacts
    with pytest.raises(ValueError, match="preset"):
        preset("nope")
    with pytest.raises(ValueError, match="site_mpp"):
        SynthConfig(site_mpp=(0.1,))
    with pytest.raises(ValueError, match="pen_strokes"):
        SynthConfig(pen_strokes=(2, 1))


# -- site-specific shortcut -----------------------------------------------------------------------
def test_shortcut_darkens_responders_of_one_site_only_and_keeps_ground_truth(tmp_path):
    """The cue is colour alone: same labels, rectangles and non-responder pixels; darker responders at one site."""
    plain, cued = tmp_path / "plain", tmp_path / "cued"
    generate_cohort(plain, sites=2, slides_per_site=3, seed=3, config=TINY, progress=False)
    generate_cohort(cued, sites=2, slides_per_site=3, seed=3, progress=False,
                    config=replace(TINY, shortcut_site=2, shortcut_strength=0.4))
    for site in ("site_1", "site_2"):
        for name in ("labels.csv", "planted.csv", "artifacts.csv"):
            assert (plain / site / name).read_bytes() == (cued / site / name).read_bytes()
    for site in ("site_1", "site_2"):
        labels = labels_of(plain / site)
        assert set(labels.values()) == {0, 1}
        for sid, label in labels.items():
            a, b = (d / site / "slides" / f"{sid}.tiff" for d in (plain, cued))
            if site == "site_1" or label == 0:
                assert a.read_bytes() == b.read_bytes()
                continue
            thumb_a, tissue, _ = thumb_masks(a, [])
            thumb_b = thumb_masks(b, [])[0]
            # visibly darker tissue: the shortcut a local model can learn
            assert thumb_b[tissue].mean() < thumb_a[tissue].mean() - 5


def test_shortcut_validation_and_presets():
    with pytest.raises(ValueError, match="shortcut"):
        SynthConfig(shortcut_strength=1.5)
    with pytest.raises(ValueError, match="shortcut"):
        SynthConfig(shortcut_site=-1)
    realistic = PRESETS["realistic"]
    assert realistic.shortcut_site == 3 and realistic.shortcut_strength > 0  # the small centre, as the demo needs
    assert PRESETS["default"].shortcut_site == 0
