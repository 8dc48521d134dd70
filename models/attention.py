"""Attention-based MIL pooling (Ilse, Tomczak & Welling, ICML 2018), plain and gated.

Each instance gets a score from a small MLP; a softmax over the bag's valid
instances turns scores into weights; the bag embedding is the weighted sum.
Memory is linear in N: one score per instance, never an N x N matrix, so a
100,000-tile slide fits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import MILModel, MILOutput, masked_softmax
from models.config import MILConfig
from models.registry import register_model


class AttentionScorer(nn.Module):
    """``a = w^T tanh(V h)``, or with ``gated``: ``a = w^T (tanh(V h) * sigmoid(U h))``.

    The gate (sigmoid branch) lets the score depend non-linearly on h beyond
    tanh's near-linear range around 0, which Ilse et al. found helps.
    """

    def __init__(self, hidden_dim: int, attn_dim: int, gated: bool) -> None:
        super().__init__()
        self.attention_V = nn.Linear(hidden_dim, attn_dim)
        self.attention_U = nn.Linear(hidden_dim, attn_dim) if gated else None
        self.attention_w = nn.Linear(attn_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        """Raw scores (B, N) for instances ``h`` (B, N, hidden)."""
        a = torch.tanh(self.attention_V(h))
        if self.attention_U is not None:
            a = a * torch.sigmoid(self.attention_U(h))
        return self.attention_w(a).squeeze(-1)


class AttentionMIL(MILModel):
    """Embed -> attention scores -> masked softmax -> weighted sum -> classifier."""

    def __init__(self, config: MILConfig, gated: bool) -> None:
        super().__init__(config)
        self.scorer = AttentionScorer(config.hidden_dim, config.attn_dim, gated)

    def attend(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(scores, attention, bag_embedding)``: raw scores (B, N), weights (B, N), z (B, hidden)."""
        scores = self.scorer(h)
        attention = masked_softmax(scores, mask, dim=1)
        # Padded h is finite (embedding of a zero row) and its weight is exactly 0, so it adds exactly 0.
        z = torch.bmm(attention.unsqueeze(1), h).squeeze(1)
        return scores, attention, z

    def pool(self, h: Tensor, mask: Tensor, labels: Tensor | None) -> MILOutput:
        _, attention, z = self.attend(h, mask)
        return MILOutput(logits=self.classifier(z), attention=attention)


@register_model("attention")
def attention(config: MILConfig) -> AttentionMIL:
    return AttentionMIL(config, gated=False)


@register_model("gated_attention")
def gated_attention(config: MILConfig) -> AttentionMIL:
    return AttentionMIL(config, gated=True)
