"""Fixtures shared by the extraction tests (one-slide and streamed)."""

from __future__ import annotations

import pytest
import torch

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
