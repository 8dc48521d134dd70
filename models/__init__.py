"""Attention-MIL model family (slide-level heads over patch embeddings).

``MILConfig`` is imported at once (standard library only); everything else is
reached lazily (PEP 562, through the project's ``wsi_fl._lazy``), because the model
modules import torch and the CLI's ``--help`` must not. The registry's own functions
import the built-in models on first use, so ``create_model(MILConfig(model=name))``
works for each of :func:`list_models` however the caller got there.
"""

from __future__ import annotations

from models.config import MILConfig
from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "MILModel": "base",
    "MILOutput": "base",
    "masked_softmax": "base",
    "create_model": "registry",
    "list_models": "registry",
    "register_model": "registry",
}

__all__ = ["MILConfig", "MILModel", "MILOutput", "create_model", "list_models", "masked_softmax", "register_model"]
__getattr__, _dir_exports = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *_dir_exports()})
