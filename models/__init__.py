"""Attention-MIL model family (slide-level heads over patch embeddings).

Importing this package registers every built-in model, so
``create_model(MILConfig(model=name))`` works for each of :func:`list_models`.
"""

from models import attention, clam, pooling  # noqa: F401  (imported to register the models)
from models.base import MILModel, MILOutput, masked_softmax
from models.config import MILConfig
from models.registry import create_model, list_models, register_model

__all__ = [
    "MILConfig",
    "MILModel",
    "MILOutput",
    "create_model",
    "list_models",
    "masked_softmax",
    "register_model",
]
