"""Name -> model factory, timm-style: adding a model is one decorated function, no if/elif chain.

Models register when their module is imported. The built-in ones are imported
on first use of the registry (:func:`list_models`, :func:`create_model`,
``MODELS``) rather than by ``import models``: their modules import torch, and
``wsi-fl train --help`` reads only :class:`models.config.MILConfig`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from models.config import MILConfig
from wsi_fl._registry import Registry

if TYPE_CHECKING:
    from models.base import MILModel

ModelFactory = Callable[[MILConfig], "MILModel"]
F = TypeVar("F", bound=ModelFactory)

#: Modules whose import registers the built-in models.
BUILTIN_MODULES = ("models.attention", "models.chowder", "models.clam", "models.pooling", "models.transmil")

_MODELS: Registry[ModelFactory] = Registry("model")


def load_builtin_models() -> None:
    """Import the built-in model modules (registering them); a no-op once done."""
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


def __getattr__(name: str) -> Any:
    # ``MODELS`` is reached through here so that whoever reads it sees every built-in model
    # (register_model itself writes to _MODELS, so a model module importing it causes no cycle).
    if name == "MODELS":
        load_builtin_models()
        return _MODELS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering ``factory(config: MILConfig) -> MILModel`` under ``name``."""
    return _MODELS.register(name)


def list_models() -> list[str]:
    load_builtin_models()
    return _MODELS.names()


def create_model(config: MILConfig) -> MILModel:
    """Build ``config.model``; an unknown name raises UnknownNameError (a ValueError) listing the registered ones."""
    load_builtin_models()
    model = _MODELS.get(config.model)(config)
    if model.config != config:
        # A checkpoint stores model.config; it must be the config that rebuilds this exact model.
        raise RuntimeError(f"factory for {config.model!r} returned a model with a different config")
    return model
