"""Name -> model factory, timm-style: adding a model is one decorated function, no if/elif chain.

Models register when their module is imported; ``import models`` imports them
all, so :func:`create_model` sees every built-in model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from models.base import MILModel
from models.config import MILConfig

ModelFactory = Callable[[MILConfig], MILModel]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering ``factory(config: MILConfig) -> MILModel`` under ``name``."""

    def decorate(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(config: MILConfig) -> MILModel:
    """Build ``config.model``; an unknown name raises ValueError listing the registered ones."""
    factory = _REGISTRY.get(config.model)
    if factory is None:
        raise ValueError(f"unknown model {config.model!r}; registered models: {', '.join(list_models())}")
    model = factory(config)
    if model.config != config:
        # A checkpoint stores model.config; it must be the config that rebuilds this exact model.
        raise RuntimeError(f"factory for {config.model!r} returned a model with a different config")
    return model
