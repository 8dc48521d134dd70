"""Slide access on the shared real files: formats, fallbacks and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.errors import SlideError
from preprocessing.pipeline import discover_slides, plan_tasks
from preprocessing.slide import content_fingerprint, open_slide, slide_id_for


@pytest.mark.parametrize(
    ("name", "vendor", "levels"),
    [
        ("cmu-1-small-region.svs", "aperio", 1),
        ("tcga-cr-7395-01a-01-ts1.svs", "aperio", 2),
        ("kidney-48-5.tif", "ImageSlide", 1),  # not pyramidal: OpenSlide's PIL fallback
        ("boxes.tiff", "generic-tiff", 4),
        ("boxes_0.dcm", "dicom", 1),
        ("small.svs", "aperio", 1),
    ],
)
def test_formats_open(slide_file, name, vendor, levels):
    with open_slide(slide_file(name)) as s:
        assert s.info.vendor == vendor
        assert s.level_count == levels
        path = slide_file(name)
        assert s.slide_id == (path.parent.name if name.endswith(".dcm") else path.stem)  # DICOM: its folder


def test_a_dicom_slide_is_named_after_its_folder(slide_file, tmp_path):
    """Scanners export a DICOM slide as a folder of files named by UIDs: the folder's name is the slide's id,
    whichever of its files is found or given."""
    series = tmp_path / "archive" / "B-2022-0003"
    series.mkdir(parents=True)
    for k, name in enumerate(("boxes_0.dcm", "boxes_1.dcm")):
        (series / f"1.2.826.0.1.3680043.{k}.dcm").symlink_to(slide_file(name))
    (tmp_path / "archive" / "B-2021-0042.svs").symlink_to(slide_file("small.svs"))
    found = discover_slides([tmp_path / "archive"])
    assert sorted(t.slide_id for t in plan_tasks(found)) == ["B-2021-0042", "B-2022-0003"]
    given = discover_slides(sorted(series.iterdir()))  # both files of the slide named on the command line
    assert [t.slide_id for t in plan_tasks(given)] == ["B-2022-0003"]
    assert slide_id_for("B-2021-0042.svs") == "B-2021-0042"
    with open_slide(given[0]) as s:
        assert s.info.vendor == "dicom" and s.slide_id == "B-2022-0003"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("unopenable.tiff", "Unsupported TIFF compression"),
        ("broken.svs", "cannot open as a slide"),
        ("does-not-exist.svs", "file not found"),
    ],
)
def test_unopenable_files_give_one_line_errors(slide_file, tmp_path, name, problem):
    path = tmp_path / name if name == "does-not-exist.svs" else slide_file(name)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert str(err.value).startswith(f"{name}: ") and problem in str(err.value) and "\n" not in str(err.value)


def test_corrupt_tile_data_fails_on_read_not_open(slide_file):
    with open_slide(slide_file("unreadable.svs")) as s, pytest.raises(
        SlideError, match=r"unreadable\.svs: cannot read pixels: .*Bogus marker length"
    ):
        s.read_region((0, 0), 0, (16, 16))


def test_thumbnail_matches_downsampled_read(slide_file):
    with open_slide(slide_file("tcga-cr-7395-01a-01-ts1.svs")) as s:
        thumb, (dsx, dsy) = s.thumbnail(8)
        w, h = s.dimensions
        assert thumb.shape == (round(h / 8), round(w / 8), 3)
        assert dsx == pytest.approx(8, rel=0.01) and dsy == pytest.approx(8, rel=0.01)
        full = s.read_region((0, 0), 1, s.level_dimensions[1])  # level 1 is ~2x; thumbnail is 4x of it
        coarse = full[: thumb.shape[0] * 4 : 4, : thumb.shape[1] * 4 : 4]
        assert abs(float(coarse.mean()) - float(thumb.mean())) < 3


def test_fingerprint_changes_with_content(tmp_path, slide_file):
    src = slide_file("cmu-1-small-region.svs").read_bytes()
    a, b = tmp_path / "a.svs", tmp_path / "b.svs"
    a.write_bytes(src)
    b.write_bytes(src[:-1] + bytes([src[-1] ^ 1]))
    assert content_fingerprint(a) == content_fingerprint(slide_file("cmu-1-small-region.svs"))
    assert content_fingerprint(a) != content_fingerprint(b)


def test_transparent_pixels_become_white():
    from PIL import Image

    from preprocessing.slide import rgba_to_rgb

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgb = rgba_to_rgb(Image.fromarray(rgba, "RGBA"))
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[1, 1].tolist() == [255, 255, 255]
