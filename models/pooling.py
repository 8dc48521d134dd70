"""Mean and max pooling over embedded instances: the baselines attention must beat.

Same embedding and classifier as the attention models, so a comparison
isolates the pooling. Neither has instance weights, so ``attention`` is None
(max pooling picks a different instance per feature; no single per-instance
weight describes it honestly).
"""

from __future__ import annotations

from torch import Tensor

from models.base import MILModel, MILOutput
from models.config import MILConfig
from models.registry import register_model


class MeanMIL(MILModel):
    """Bag embedding = mean of the valid instances' embeddings."""

    def pool(self, h: Tensor, mask: Tensor, labels: Tensor | None) -> MILOutput:
        m = mask.unsqueeze(-1)
        z = h.masked_fill(~m, 0.0).sum(dim=1) / m.sum(dim=1).to(h.dtype)
        return MILOutput(logits=self.classifier(z), attention=None)


class MaxMIL(MILModel):
    """Bag embedding = per-feature max over the valid instances' embeddings."""

    def pool(self, h: Tensor, mask: Tensor, labels: Tensor | None) -> MILOutput:
        z = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        return MILOutput(logits=self.classifier(z), attention=None)


@register_model("mean")
def mean(config: MILConfig) -> MeanMIL:
    return MeanMIL(config)


@register_model("max")
def max_(config: MILConfig) -> MaxMIL:
    return MaxMIL(config)
