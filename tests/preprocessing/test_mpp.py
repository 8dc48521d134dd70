"""MPP precedence and plausibility rules (preprocessing.mpp), and how slides report them."""

from __future__ import annotations

import pytest

from preprocessing.errors import SlideError
from preprocessing.mpp import MPP_RANGE, file_mpp, read_mpp_csv, resolve_mpp
from preprocessing.slide import open_slide

APERIO = {"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499"}


def test_file_mpp_used_when_user_gives_none():
    assert resolve_mpp("a.svs", APERIO) == (0.499, "file")


def test_user_csv_value_overrides_the_file():
    assert resolve_mpp("a.svs", APERIO, user_mpp=0.25) == (0.25, "user-csv")


def test_default_applies_only_when_the_file_has_none():
    assert resolve_mpp("a.svs", APERIO, default_mpp=0.3) == (0.499, "file")
    assert resolve_mpp("a.svs", {}, default_mpp=0.3) == (0.3, "user-default")
    assert resolve_mpp("a.svs", {}) == (None, None)


@pytest.mark.parametrize("bad", [352.78, 0.001, float("nan"), MPP_RANGE[1] * 1.01])
def test_implausible_values_refused_with_file_and_value_named(bad):
    with pytest.raises(SlideError) as err:
        resolve_mpp("scan.tiff", {}, default_mpp=bad)
    message = str(err.value)
    assert message.startswith("scan.tiff: implausible MPP") and "\n" not in message


@pytest.mark.parametrize(("kwargs", "properties", "fix"), [
    ({}, {"openslide.mpp-x": "352.78", "openslide.mpp-y": "352.78"},
     "supply the right one for this slide with --mpp-csv (it overrides the file)"),
    ({"user_mpp": 500.0}, {}, "correct this slide's row in --mpp-csv"),
    ({"default_mpp": 500.0}, {}, "correct --default-mpp"),
])
def test_an_implausible_mpp_names_the_option_that_fixes_it(kwargs, properties, fix):
    """--default-mpp never overrides a file's value, so it is not offered as the fix for one."""
    with pytest.raises(SlideError) as err:
        resolve_mpp("scan.tiff", properties, **kwargs)
    assert str(err.value).endswith(fix)
    assert "--default-mpp" not in str(err.value) or kwargs.get("default_mpp")


def test_zero_mpp_in_file_means_unknown_and_anisotropy_refused():
    assert file_mpp("a.tif", {"openslide.mpp-x": "0", "openslide.mpp-y": "0"}) is None
    with pytest.raises(SlideError, match="non-square"):
        file_mpp("a.tif", {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.5"})


def test_mpp_csv(tmp_path):
    good = tmp_path / "mpp.csv"
    good.write_text("slide_id,mpp\ns1,0.25\ns2, 0.5\n")
    assert read_mpp_csv(good) == {"s1": 0.25, "s2": 0.5}
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\ns1,0.25\n")
    with pytest.raises(ValueError, match=r"bad\.csv: needs columns slide_id,mpp"):
        read_mpp_csv(bad)
    bad.write_text("slide_id,mpp\ns1,abc\n")
    with pytest.raises(ValueError, match="line 2"):
        read_mpp_csv(bad)


def test_real_slides_report_mpp_and_source(slide_file):
    with open_slide(slide_file("cmu-1-small-region.svs")) as s:
        assert s.mpp == pytest.approx(0.499) and s.info.mpp_source == "file"
    with open_slide(slide_file("tcga-cr-7395-01a-01-ts1.svs")) as s, pytest.raises(
        SlideError, match=r"tcga-cr-7395-01a-01-ts1\.svs: no microns-per-pixel \(MPP\)"
    ):
        _ = s.mpp
    with open_slide(slide_file("tcga-cr-7395-01a-01-ts1.svs"), user_mpp=0.25) as s:
        assert s.mpp == 0.25 and s.info.mpp_source == "user-csv"
    with open_slide(slide_file("boxes.tiff")) as s:  # opens; its 352.78 µm/px is refused when needed
        assert s.level_count == 4
        with pytest.raises(SlideError, match=r"implausible MPP 352\.778"):
            _ = s.mpp
