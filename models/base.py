"""What every MIL model shares: the input contract, the instance embedding, the output type.

A batch is ``x`` (B, N, D) with ``mask`` (B, N) marking real instances; bags
shorter than N are padded. The contract every model keeps is that padding is
invisible: a padded bag gives the output of the same bag alone. The base class
enforces the part that is common (validation, zeroing padded inputs so that
even NaN padding cannot leak into gradients); subclasses only pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.config import MILConfig


@dataclass
class MILOutput:
    """``logits`` (B, n_classes); ``attention`` (B, N) or None; ``aux_loss`` scalar or None.

    ``attention`` is a softmax over each bag's valid instances (sums to 1 there,
    exactly 0 at padding); models without instance weights (mean, max) give
    None. ``aux_loss`` is an extra training loss to add to the bag loss; it is
    set only by models that have one, in training mode, when labels are given.
    """

    logits: Tensor
    attention: Tensor | None
    aux_loss: Tensor | None = None


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax of ``scores`` over the entries where ``mask`` is True; exactly 0 elsewhere.

    Padding is filled with -inf (not a large negative number), so padded entries
    get exactly zero weight whatever the scale of the scores. A slice with no
    valid entry would be 0/0; it raises instead of returning NaN.
    """
    if mask is None:
        return torch.softmax(scores, dim=dim)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid), not {mask.dtype}")
    if not bool(mask.any(dim=dim).all()):
        raise ValueError("masked_softmax: a slice has no valid entry (empty bag)")
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)
    # softmax already gives 0 at -inf; the where also cleans NaN scores at padding.
    return torch.where(mask, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))


def check_inputs(config: MILConfig, x: Tensor, mask: Tensor | None, labels: Tensor | None) -> None:
    """Fail with a message that says what was wrong, rather than a shape error deep in a matmul."""
    if x.dim() != 3:
        hint = " (one bag? use x.unsqueeze(0))" if x.dim() == 2 else ""
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, not {x.dtype}")
    batch, n, dim = x.shape
    if dim != config.in_dim:
        raise ValueError(f"x has feature dimension {dim}, the model expects in_dim={config.in_dim}")
    if mask is None:
        if n == 0:
            raise ValueError("empty bag: x has N=0 instances")
    else:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real instance), not {mask.dtype}")
        if tuple(mask.shape) != (batch, n):
            raise ValueError(f"mask must have shape (B, N) = {(batch, n)}, got {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("a bag in the batch has no valid instance (mask all False)")
    if labels is not None:
        if tuple(labels.shape) != (batch,) or labels.dtype != torch.long:
            raise ValueError(f"labels must be a ({batch},) long tensor, got {tuple(labels.shape)} {labels.dtype}")
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= config.n_classes):
            raise ValueError(f"labels must be in [0, {config.n_classes}), got {labels.tolist()}")


def standardize_within_bag(x: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """Each feature to mean 0 and variance 1 over its own bag's valid instances; padding stays 0.

    Why: it puts every encoder's features on one scale and removes what is common to all of a slide's tiles
    (stain, scanner, an encoder's constant offset), so a small model can learn which tiles stand out. Small models
    are what DP-SGD needs, since its noise grows with the number of weights (the synthetic cohort's random-init
    features sit at 1.16 +- 0.1, where a 4k-weight model learns nothing without it). It uses no other slide, so it
    costs no privacy. What it loses: anything shared by all of a slide's tiles, e.g. a slide that is all tumour
    looks like one with none, and a one-tile bag becomes zeros. A choice for the task, not a default.
    """
    valid = mask.unsqueeze(-1).to(x.dtype)
    count = valid.sum(dim=1, keepdim=True)
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    centred = (x - mean) * valid
    var = centred.square().sum(dim=1, keepdim=True) / count
    return centred / torch.sqrt(var + eps)


class MILModel(nn.Module, ABC):
    """Base of the registered models: instance embedding + classifier; subclasses define :meth:`pool`.

    The embedding Linear(in_dim -> hidden) + ReLU + Dropout is CLAM's ``fc``
    layer; the classifier maps the pooled bag embedding to ``n_classes`` logits.
    """

    def __init__(self, config: MILConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout))
        self.classifier = nn.Linear(config.hidden_dim, config.n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None, labels: Tensor | None = None) -> MILOutput:
        """``x`` (B, N, D) float; ``mask`` (B, N) bool, True = real (None = all real); ``labels`` (B,) long."""
        check_inputs(self.config, x, mask, labels)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            # Zero padded rows before the Linear: its weight gradient is x^T @ grad, where a NaN/Inf
            # in padding would poison every weight even though its output gradient is 0.
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        if self.config.input_norm == "slide":
            x = standardize_within_bag(x, mask)
        return self.pool(self.embed(x), mask, labels)

    @abstractmethod
    def pool(self, h: Tensor, mask: Tensor, labels: Tensor | None) -> MILOutput:
        """Bag logits from embedded instances ``h`` (B, N, hidden); ``mask`` (B, N) bool, never None here.

        ``h`` at padded positions is finite but not zero (it is the embedding of a
        zero vector): implementations must give those positions no weight.
        """
