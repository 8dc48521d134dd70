"""Build the network a model card describes, from its public definition (torch side of :mod:`preprocessing.cards`).

A card names an architecture in a well-kept library (timm for the ViTs,
transformers where the release is a transformers checkpoint) and this module
instantiates it from those facts alone: random init, nothing downloaded, no
remote code. Weights are loaded afterwards, strictly, by the caller;
:attr:`FoundationNet.trunk` is the module whose ``state_dict()`` keys are the
release file's keys once ``card.key_prefix`` is stripped, so a checkpoint for
another architecture cannot load silently.

Pooling is done here, once, from the model's own count of prefix tokens (CLS
plus register tokens: timm's ``num_prefix_tokens``, transformers'
``num_register_tokens``), so register tokens never leak into a ``cls+mean``
embedding and the count cannot drift from the architecture.

``device="meta"`` builds the giant cards without allocating (shape checks in
CI); ``depth`` builds a shallower copy (fewer transformer blocks) that runs the
same code path on a real tile in a fraction of the time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preprocessing.cards import ModelCard
from preprocessing.tv import import_torchvision

__all__ = ["FoundationNet", "build_network", "pool_tokens"]


def pool_tokens(tokens: Tensor, pooling: str, num_prefix_tokens: int) -> Tensor:
    """``(n, prefix + patches, d)`` final tokens -> ``(n, d)`` or ``(n, 2d)``.

    Prefix tokens are the CLS token first, then any register tokens; registers are
    never part of an embedding.
    """
    if pooling == "cls":
        return tokens[:, 0]
    patches = tokens[:, num_prefix_tokens:]
    if pooling == "mean":
        return patches.mean(dim=1)
    if pooling == "cls+mean":
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
    raise ValueError(f"pooling {pooling!r} needs the network's own head")


class AttentionPool(nn.Module):
    """Learned queries cross-attending over all of a trunk's tokens (a CoCa-style pooler, as in CONCH).

    Parameter names follow the CONCH v1.5 release (``query``, ``ln_q``, ``ln_k``,
    ``to_q``, ``to_kv``, ``to_out``) so its state dict loads as is.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(n, L, context_dim)`` -> ``(n, queries, dim)``."""
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q = self.to_q(self.ln_q(self.query)).expand(tokens.shape[0], -1, -1)
        heads = [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads)  # default scale: head_dim ** -0.5
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH v1.5's image tower: ViT-L/16 tokens -> attention pool (1 query) -> LayerNorm, 768-d."""

    def __init__(self, trunk: nn.Module, dim: int = 768, heads: int = 8) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionPool(dim, trunk.embed_dim, heads, queries=1)
        self.ln_contrast = nn.LayerNorm(dim)

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens

    def forward_features(self, x: Tensor) -> Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(x))[:, 0])


class FoundationNet(nn.Module):
    """A card's network: ``trunk`` (the release's state-dict layout) plus the card's pooling.

    ``forward`` takes normalised float NCHW ``(n, 3, input_size, input_size)`` and
    returns ``(n, card.dim)``.
    """

    def __init__(self, card: ModelCard, trunk: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.card = card
        self.trunk = trunk
        self.num_prefix_tokens = num_prefix_tokens
        self._transformers = card.library == "transformers"

    def forward_features(self, x: Tensor) -> Tensor:
        """The trunk's final (normed) tokens, ``(n, prefix + patches, d)``: CLS, registers, patches."""
        if self._transformers:
            return self.trunk(pixel_values=x).last_hidden_state
        return self.trunk.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.card.pooling == "pooled":
            return self.trunk(x)
        return pool_tokens(self.forward_features(x), self.card.pooling, self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"card={self.card.name!r}, dim={self.card.dim}, pooling={self.card.pooling!r}"


def _resolve_layers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Cards spell layers as names (they are stdlib-only); turn them into timm/torch classes."""
    from timm.layers import SwiGLUPacked

    named = {"swiglu_packed": SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}
    out = dict(kwargs)
    for key in ("mlp_layer", "act_layer"):
        if key in out:
            out[key] = named[out[key]]
    return out


def _timm_trunk(card: ModelCard, depth: int | None) -> tuple[nn.Module, int]:
    import_torchvision()  # timm imports torchvision; the shim must run first
    import timm

    kwargs = _resolve_layers(card.arch_kwargs)
    if depth is not None:
        kwargs["depth"] = depth
    vit = timm.create_model(card.arch, pretrained=False, **kwargs)
    if card.head == "conch_attn_pool":
        return ConchVisionTower(vit, dim=card.dim), vit.num_prefix_tokens
    if card.head:
        raise ValueError(f"model card {card.name!r}: unknown head {card.head!r}")
    return vit, vit.num_prefix_tokens


# -- transformers releases: keep the trunk's state dict in the release layout ----------------
# The releases (Phikon, Phikon-v2, Hibou, Midnight) were saved by transformers 4.x. transformers 5
# renamed the modules (``attention.attention.query`` -> ``attention.q_proj``, ViT's ``encoder.layer``
# -> ``layers``, DINOv2's fused SwiGLU ``weights_in`` -> ``gate_proj`` + ``up_proj``) and converts
# only inside ``from_pretrained``, which would also reach for the hub. Two state-dict hooks on the
# trunk translate both ways instead, so ``trunk.state_dict()`` *is* the release layout and a strict
# ``load_state_dict`` of the release file works (checked against transformers' own loader in tests).

_ATTENTION = (
    ("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."),
)
_RELEASE_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {  # (release, transformers 5), applied in order
    "ViTModel": (("encoder.layer.", "layers."), *_ATTENTION, ("intermediate.dense.", "mlp.fc1."),
                 ("output.dense.", "mlp.fc2.")),
    "Dinov2Model": (*_ATTENTION, ("mlp.weights_out.", "mlp.down_proj.")),
    "Dinov2WithRegistersModel": (*_ATTENTION, ("mlp.weights_out.", "mlp.down_proj.")),
}
_FUSED, _GATE, _UP = "mlp.weights_in.", "mlp.gate_proj.", "mlp.up_proj."


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        key = key.replace(old, new, 1)
    return key


def _release_layout_hooks(model: nn.Module, pairs: tuple[tuple[str, str], ...]) -> None:
    backwards = tuple((new, old) for old, new in reversed(pairs))

    def to_release(module, state_dict, prefix, local_metadata) -> None:
        ours = [k for k in state_dict if k.startswith(prefix)]
        items = {k[len(prefix):]: state_dict.pop(k) for k in ours}
        for key, value in items.items():
            if _UP in key:
                continue  # emitted with its gate half
            if _GATE in key:
                value = torch.cat([value, items[key.replace(_GATE, _UP)]], dim=0)
                key = key.replace(_GATE, _FUSED)
            state_dict[prefix + _rename(key, backwards)] = value

    def from_release(module, state_dict, prefix, *args) -> None:
        for full in [k for k in state_dict if k.startswith(prefix)]:
            key, value = full[len(prefix):], state_dict.pop(full)
            if _FUSED in key:
                gate, up = value.chunk(2, dim=0)
                state_dict[prefix + _rename(key.replace(_FUSED, _GATE), pairs)] = gate
                state_dict[prefix + _rename(key.replace(_FUSED, _UP), pairs)] = up
            else:
                state_dict[prefix + _rename(key, pairs)] = value

    model.register_state_dict_post_hook(to_release)
    model.register_load_state_dict_pre_hook(from_release)


def _transformers_trunk(card: ModelCard, depth: int | None) -> tuple[nn.Module, int]:
    import_torchvision()  # transformers' image utilities import torchvision too
    import transformers

    kwargs = dict(card.arch_kwargs)
    if depth is not None:
        kwargs["num_hidden_layers"] = depth
    model_cls = getattr(transformers, card.arch)
    config = model_cls.config_class(**kwargs)
    extra = {"add_pooling_layer": False} if card.arch == "ViTModel" else {}
    model = model_cls(config, **extra)
    if card.arch in _RELEASE_RENAMES:
        _release_layout_hooks(model, _RELEASE_RENAMES[card.arch])
    return model, 1 + int(getattr(config, "num_register_tokens", 0))


def build_network(card: ModelCard, *, device: str | torch.device = "cpu", depth: int | None = None) -> FoundationNet:
    """The card's network with random init (seeded by the caller's ``torch.manual_seed``), in eval mode.

    ``device="meta"`` allocates nothing (shapes only); ``depth`` keeps only the
    first ``depth`` transformer blocks (tests). Weights are the caller's to load
    into ``.trunk``. ``torchvision`` cards (CNN trunks) are built by
    :mod:`preprocessing.encoders`, not here.
    """
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    builders = {"timm": _timm_trunk, "transformers": _transformers_trunk}
    if card.library not in builders:
        raise NotImplementedError(f"model card {card.name!r}: {card.library} trunks live in preprocessing.encoders")
    with torch.device(device):
        trunk, prefix = builders[card.library](card, depth)
    return FoundationNet(card, trunk, prefix).eval()
