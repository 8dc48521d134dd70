"""Chowder (Courtiol et al., "Classification and disease localization in histopathology using only global
labels: a weakly-supervised approach", 2018): a score per tile, the R highest and R lowest kept, a small MLP.

Each tile gets one real number from a linear layer; the bag is summarised by its ``R`` largest and ``R``
smallest scores (``MILConfig.n_extreme``, default 5 as in the paper), sorted, so the model sees both the
strongest evidence for and against; an MLP (200 and 100 hidden units) maps these ``2R`` numbers to the logits.
The tile scores are the model's localisation map (:meth:`Chowder.tile_scores`).

Differences from the paper, on purpose:

* The score is a linear layer on the shared instance embedding (``MILModel.embed``: Linear + ReLU + Dropout),
  not directly on the encoder features, so a comparison with the other heads isolates the pooling (as for
  mean/max pooling). The paper's linear-in-features score is the special case without that layer; Owkin's own
  re-implementation offers the same hidden tile layer as an option.
* ReLU and dropout (``MILConfig.dropout``) in the MLP instead of sigmoid activations: sigmoids saturate and
  train slowly with Adam on the small bag counts we see; the paper regularised with dropout 0.5 on the MLP
  and an L2 penalty on the score layer (here: the optimiser's weight decay).
* A bag with fewer than ``R`` tiles repeats its last kept score (its lowest score among the "top" slots, its
  highest among the "bottom" slots) instead of failing, so a tiny bag gives a defined, padding-free output.
  With ``R <= n < 2R`` the top and bottom sets overlap, as in the paper.

``attention`` is None: tile scores are not a distribution over the bag (the contract of ``MILOutput``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import MILModel, MILOutput
from models.config import MILConfig
from models.registry import register_model

#: Hidden widths of the MLP on the 2R extreme scores (the paper's 200 and 100).
MLP_WIDTHS = (200, 100)


def extreme_scores(scores: Tensor, mask: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(top, bottom)``, each (B, r): a bag's r largest valid scores descending and r smallest ascending.

    Padding never enters (it is -inf for the top, +inf for the bottom, and sorts last); a bag with
    n < r valid scores repeats its n-th entry in the remaining slots.
    """
    k = min(r, scores.shape[1])
    n_valid = mask.sum(dim=1, keepdim=True)
    slots = torch.arange(r, device=scores.device).unsqueeze(0)
    last = n_valid.clamp(max=k) - 1  # index of the last valid entry among the k taken
    idx = torch.minimum(slots, last)
    top = torch.topk(scores.masked_fill(~mask, float("-inf")), k, dim=1).values.gather(1, idx)
    bottom = torch.topk(scores.masked_fill(~mask, float("inf")), k, dim=1, largest=False).values.gather(1, idx)
    return top, bottom


class Chowder(MILModel):
    """Embed -> linear tile score -> top-R and bottom-R scores -> MLP(200, 100) -> logits."""

    def __init__(self, config: MILConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.hidden_dim, 1)
        layers: list[nn.Module] = []
        width = 2 * config.n_extreme
        for hidden in MLP_WIDTHS:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        # The base's classifier reads the hidden_dim embedding; here the last layer reads the MLP.
        self.classifier = nn.Linear(width, config.n_classes)

    def tile_scores(self, h: Tensor) -> Tensor:
        """Per-tile scores (B, N) from embedded tiles ``h`` (B, N, hidden): Chowder's localisation map."""
        return self.score(h).squeeze(-1)

    def pool(self, h: Tensor, mask: Tensor, labels: Tensor | None) -> MILOutput:
        top, bottom = extreme_scores(self.tile_scores(h), mask, self.config.n_extreme)
        z = self.mlp(torch.cat([top, bottom], dim=1))
        return MILOutput(logits=self.classifier(z), attention=None)


@register_model("chowder")
def chowder(config: MILConfig) -> Chowder:
    return Chowder(config)
