"""TransMIL (Shao et al., "TransMIL: Transformer based correlated multiple instance learning for whole slide
image classification", NeurIPS 2021): self-attention between a slide's tiles, with a convolutional position
encoding on the tiles laid out as a square.

Pipeline (the paper's, layer by layer): the shared embedding (Linear to ``hidden_dim``, 512 by default, + ReLU)
-> the sequence padded to the next square ``s*s`` by repeating its first tokens -> a class token in front ->
TransLayer -> PPEG (the tokens as an ``s x s`` image, ``x + dw7(x) + dw5(x) + dw3(x)`` with depthwise convs) ->
TransLayer -> LayerNorm -> the class token -> classifier. A TransLayer is ``x + MSA(LayerNorm(x))`` (no MLP
block, as in the paper's code).

Differences from the paper, on purpose:

* Exact softmax attention (``torch.nn.functional.scaled_dot_product_attention``) instead of the Nyström
  approximation (256 landmarks, 6 pseudo-inverse iterations). Exact attention is what Nyström approximates, it
  has no landmark count that depends on the bag length, and it makes padding exactly invisible (Nyström's
  landmarks are means over segments of the padded sequence). The cost: time is quadratic in the number of
  tiles; memory stays linear where SDPA picks a flash or memory-efficient kernel (GPU), but a plain CPU run on
  a 100,000-tile slide materialises N x N scores per head. Subsample tiles (``max-instances``) for such slides.
* Dropout ``MILConfig.dropout`` after the embedding and on the attention output (the paper: 0.1 in Nyström's
  output only); ``MILConfig.n_heads`` heads of ``hidden_dim / n_heads`` (the paper: 8 of 64).

Batches: each bag has its own square side ``s_b = ceil(sqrt(n_b))``. Its tokens go to the top-left ``s_b x s_b``
corner of a zero canvas of the batch's largest side; a zero-padded convolution sees the same neighbours there as
on the bag's own grid, and masked keys get no attention weight, so a padded bag gives the output of the same bag
alone (up to float rounding).

``attention`` is None: the class token's attention is per head and per layer and covers repeated tokens, not a
distribution over the bag's tiles (the contract of ``MILOutput``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import MILModel, MILOutput
from models.config import MILConfig
from models.registry import register_model


class TransLayer(nn.Module):
    """``x + MSA(LayerNorm(x))`` with key padding: ``valid`` (B, L) bool, True = a real token."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return x + self.out(attn.transpose(1, 2).reshape(b, n, d))


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + dw7(x) + dw5(x) + dw3(x)`` on the tokens as a square image."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, grid: Tensor) -> Tensor:
        """``grid`` (B, C, S, S), zero outside each bag's own square."""
        return grid + sum(conv(grid) for conv in self.convs)


def square_layout(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Where each bag's squared sequence comes from and goes to.

    Returns ``(source, valid, cell, side)``: for token j of bag b (j < L = the batch's largest ``s_b^2``),
    ``source[b, j]`` is the instance index it copies (the j-th valid instance, then the first ones again,
    as the paper pads), ``valid[b, j]`` whether ``j < s_b^2``, and ``cell[b, j]`` its flat position
    ``row * side + col`` on the batch canvas of side ``side`` (``side * side`` for tokens that are not valid:
    a spare cell that is dropped).
    """
    n_valid = mask.sum(dim=1)
    s = torch.ceil(torch.sqrt(n_valid.to(torch.float64))).to(torch.long)
    side = int(s.max())
    length = int((s * s).max())
    j = torch.arange(length, device=mask.device).unsqueeze(0)
    valid = j < (s * s).unsqueeze(1)
    rank = torch.where(j < n_valid.unsqueeze(1), j, j - n_valid.unsqueeze(1)).clamp(0, mask.shape[1] - 1)
    # Indices of the valid instances, in order, then the padding: a stable sort of "is padding".
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    source = order.gather(1, rank.clamp(max=mask.shape[1] - 1))
    cell = (j // s.unsqueeze(1)) * side + j % s.unsqueeze(1)
    cell = torch.where(valid, cell, torch.full_like(cell, side * side))
    return source, valid, cell, side


class TransMIL(MILModel):
    """Embed -> square padding + class token -> TransLayer -> PPEG -> TransLayer -> LayerNorm -> class token."""

    def __init__(self, config: MILConfig) -> None:
        super().__init__(config)
        dim = config.hidden_dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, config.n_heads, config.dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, config.n_heads, config.dropout)
        self.norm = nn.LayerNorm(dim)

    def pool(self, h: Tensor, mask: Tensor, labels: Tensor | None) -> MILOutput:
        b, _, d = h.shape
        source, valid, cell, side = square_layout(mask)
        tokens = h.gather(1, source.unsqueeze(-1).expand(-1, -1, d))
        tokens = tokens.masked_fill(~valid.unsqueeze(-1), 0.0)
        keys = torch.cat([valid.new_ones(b, 1), valid], dim=1)
        x = self.layer1(torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1), keys)
        cls, tokens = x[:, :1], x[:, 1:].masked_fill(~valid.unsqueeze(-1), 0.0)
        canvas = tokens.new_zeros(b, side * side + 1, d).scatter(1, cell.unsqueeze(-1).expand(-1, -1, d), tokens)
        grid = canvas[:, : side * side].transpose(1, 2).reshape(b, d, side, side)
        encoded = self.ppeg(grid).reshape(b, d, side * side).transpose(1, 2)
        spare = encoded.new_zeros(b, 1, d)
        tokens = torch.cat([encoded, spare], dim=1).gather(1, cell.unsqueeze(-1).expand(-1, -1, d))
        x = self.layer2(torch.cat([cls, tokens], dim=1), keys)
        return MILOutput(logits=self.classifier(self.norm(x[:, 0])), attention=None)


@register_model("transmil")
def transmil(config: MILConfig) -> TransMIL:
    return TransMIL(config)
