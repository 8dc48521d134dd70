"""CLAM single-branch (Lu et al., Nature BME 2021): gated attention + instance-level clustering.

On top of gated-attention pooling, CLAM adds one binary instance classifier
per class. In training, for a bag of class y, the k most attended instances
are pseudo-labelled "positive" and the k least attended "negative" for
classifier y, and their cross-entropy is an extra loss. This pushes the
embedding to separate the evidence attention relies on, which is what makes
CLAM data-efficient with slide-level labels only.

Differences from the reference implementation, on purpose:

* Only CLAM's in-class loss (its ``subtyping=False`` setting). The
  out-of-class term (top-k of a bag labelled "negative" for every other
  class's classifier) assumes mutually exclusive subtypes, which a binary
  tumour/normal task does not have.
* ``k = min(k_sample, n_valid // 2)`` per bag, so the positive and negative
  sets are disjoint even for tiny bags (the reference crashes when a bag has
  fewer than k instances). A 1-instance bag has nothing to contrast and adds no
  instance loss; if no bag in the batch can, ``aux_loss`` is a zero tensor.
* The instance loss is averaged over the eligible bags of the batch (the
  reference works on one bag at a time), and ``aux_loss`` is
  ``inst_weight * loss``, to be *added* to the bag loss. The reference mixes
  ``0.7 * bag + 0.3 * inst``; the same up to a factor 0.7 on the bag term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import AttentionMIL
from models.base import MILOutput
from models.config import MILConfig
from models.registry import register_model


def pseudo_label_indices(scores: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices (into the bag) of the ``k`` highest- and ``k`` lowest-scored valid instances.

    ``scores`` (N,) raw attention scores of one bag, ``valid`` (N,) bool. Raw
    scores, not softmax weights: weights can underflow to equal zeros and tie.
    One stable sort, so the two sets are disjoint whenever ``2k <= n_valid``,
    even with tied scores (two ``topk`` calls could pick the same instance).
    """
    idx = valid.nonzero().squeeze(1)
    if not 0 <= 2 * k <= idx.numel():
        raise ValueError(f"k={k} needs at least {2 * k} valid instances, the bag has {idx.numel()}")
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    return idx[order[:k]], idx[order[idx.numel() - k :]]


class ClamSB(AttentionMIL):
    """Gated attention MIL with CLAM's per-class instance classifiers (hidden -> 2)."""

    def __init__(self, config: MILConfig) -> None:
        super().__init__(config, gated=True)
        self.instance_classifiers = nn.ModuleList(nn.Linear(config.hidden_dim, 2) for _ in range(config.n_classes))

    def pool(self, h: Tensor, mask: Tensor, labels: Tensor | None) -> MILOutput:
        scores, attention, z = self.attend(h, mask)
        aux = None
        if self.training and labels is not None:
            aux = self.config.inst_weight * self.instance_loss(h, scores.detach(), mask, labels)
        return MILOutput(logits=self.classifier(z), attention=attention, aux_loss=aux)

    def instance_loss(self, h: Tensor, scores: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Mean over eligible bags of the in-class pseudo-label cross-entropy (see module docstring)."""
        losses = []
        for b, n_valid in enumerate(mask.sum(dim=1).tolist()):
            k = min(self.config.k_sample, n_valid // 2)
            if k == 0:
                continue
            top, bottom = pseudo_label_indices(scores[b], mask[b], k)
            targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(h.device)
            logits = self.instance_classifiers[int(labels[b])](h[b, torch.cat([top, bottom])])
            losses.append(F.cross_entropy(logits, targets))
        if not losses:
            return h.new_zeros(())
        return torch.stack(losses).mean()


@register_model("clam_sb")
def clam_sb(config: MILConfig) -> ClamSB:
    return ClamSB(config)
