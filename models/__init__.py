"""Attention-MIL model family (slide-level heads over patch embeddings).

``MILConfig`` is imported at once (standard library only); everything else is
reached lazily (PEP 562), because the model modules import torch and the CLI's
``--help`` must not. The first access to any other public name imports the
built-in models, so ``create_model(MILConfig(model=name))`` works for each of
:func:`list_models` however the caller got there.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.config import MILConfig

_EXPORTS = {
    "MILModel": "base",
    "MILOutput": "base",
    "masked_softmax": "base",
    "create_model": "registry",
    "list_models": "registry",
    "register_model": "registry",
}

__all__ = ["MILConfig", "MILModel", "MILOutput", "create_model", "list_models", "masked_softmax", "register_model"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from models.registry import load_builtin_models

    load_builtin_models()
    return getattr(importlib.import_module(f"models.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
