"""Fixtures shared by the extraction tests (one-slide and streamed) and the per-tile QC tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from artifactsites import make_artifact_cohort

from preprocessing.encoders import Encoder, create_encoder


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """A small random-init encoder: fast on CPU, and its weights are recorded as ``random-init``."""
    return create_encoder("resnet18_trunc", random_init=True)


@pytest.fixture
def keep_threads():
    """Extraction sets torch's thread count for its run; put back whatever a test left behind."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def artifact_slides(tmp_path_factory) -> list[Path]:
    """The artifact cohort's slides (tests/artifactsites.py), generated once for every module that measures QC."""
    return make_artifact_cohort(tmp_path_factory.mktemp("artifact-cohort"))
