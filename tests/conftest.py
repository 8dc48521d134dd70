"""Shared fixtures: the real test data under ``WSI_FL_TESTDATA`` (default ``../shared/data``).

Under ``CI=true`` a missing file is a failure, never a skip: CI must not go
green because the data it is meant to test did not arrive.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bagsites import make_cohort

ROOT = Path(__file__).resolve().parent.parent


def _testdata_root() -> Path:
    return Path(os.environ.get("WSI_FL_TESTDATA", ROOT.parent / "shared" / "data")).resolve()


def _require(path: Path) -> Path:
    if path.exists():
        return path
    message = f"test data missing: {path} (set WSI_FL_TESTDATA)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def testdata() -> Path:
    return _require(_testdata_root())


@pytest.fixture(scope="session")
def slide_file():
    """``slide_file("cmu-1-small-region.svs")`` -> path of a shared real slide (fails under CI if absent)."""

    def get(name: str) -> Path:
        return _require(_testdata_root() / "slides" / name)

    return get


@pytest.fixture(scope="session")
def mil_file():
    def get(name: str) -> Path:
        return _require(_testdata_root() / "mil" / name)

    return get


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three sites of synthetic bags (10, 12 and 14 slides; :func:`bagsites.make_cohort`), made once per module."""
    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root, sizes=(10, 12, 14))
    return root
