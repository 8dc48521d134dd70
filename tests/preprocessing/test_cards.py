"""The model-card catalogue (stdlib facts) and the networks built from it (``preprocessing.foundation``).

Every card's network is built with random init: at full size on the ``meta``
device (parameter count and token width checked against the card, nothing
allocated) and, for a real forward pass on tiles of a real slide, at full depth
for the ViT-S cards, at depth 1 for the others (full-depth ViT-B cards: a slow
test). The release layout is checked by saving ``trunk.state_dict()`` under the
card's first weight-file name and loading it back strictly, and for
transformers checkpoints also through transformers' own loader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preprocessing.cards import ModelCard, get_card, list_cards
from preprocessing.foundation import build_network

REQUIRED = (
    "uni_v1", "uni_v2", "conch_v15", "virchow", "virchow2", "hoptimus0", "hoptimus1", "h0-mini", "gigapath",
    "phikon", "phikon_v2", "kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14",
    "lunit-vits8", "hibou_b", "hibou_l", "midnight12k",
)
NETS = [c for c in list_cards() if c.library != "torchvision"]
SMALL_M = 25.0  # ViT-S cards run at full depth in every run; the rest at depth 1 (full ViT-B: a slow test)
SLIDE = "cmu-1-small-region.svs"
_BUILT: dict[str, torch.nn.Module] = {}


def _depth(card: ModelCard) -> int | None:
    return None if card.params_m <= SMALL_M else 1


_REUSED = {"virchow2", "midnight12k", "uni_v2", "hoptimus1", "hibou_b", "phikon", "phikon_v2", "hibou_l",
           "conch_v15"}  # used by several tests below


def seeded_net(name: str) -> torch.nn.Module:
    """The card's network at test depth, seed 0; kept for reuse when several tests need it (init is slow)."""
    if name in _BUILT:
        return _BUILT[name]
    card = get_card(name)
    torch.manual_seed(0)
    net = build_network(card, depth=_depth(card))
    if name in _REUSED:
        _BUILT[name] = net
    return net


@pytest.fixture(scope="module")
def regions(slide_file) -> list[Image.Image]:
    """Two 512 px level-0 regions (0.5 µm/px) of tissue from a real Aperio slide."""
    import openslide

    with openslide.OpenSlide(str(slide_file(SLIDE))) as slide:
        crops = [slide.read_region(xy, 0, (512, 512)).convert("RGB") for xy in ((600, 900), (1200, 1800))]
    for crop in crops:  # tissue, not blank glass: the features below are of something
        assert np.asarray(crop).std() > 10
    return crops


def tiles(card: ModelCard, regions: list[Image.Image]) -> torch.Tensor:
    """The card's input: a ``tile_size`` crop resized to ``input_size`` and normalised, ``(2, 3, s, s)``."""
    out = []
    for region in regions:
        tile = region.crop((0, 0, card.tile_size, card.tile_size)).resize((card.input_size,) * 2, Image.BICUBIC)
        x = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - torch.tensor(card.mean)[:, None, None]) / torch.tensor(card.std)[:, None, None])
    return torch.stack(out)


# -- the catalogue (standard library) --------------------------------------------------


def test_catalogue_holds_the_trident_names():
    names = {c.name for c in list_cards()}
    assert len(names) >= 18
    assert set(REQUIRED) <= names
    assert {"resnet50_trunc", "resnet18_trunc"} <= names
    assert get_card("resnet50_trunc").tile_size == 224


@pytest.mark.parametrize("card", list_cards(), ids=lambda c: c.name)
def test_card_facts_are_complete(card):
    assert card.library in ("timm", "transformers", "torchvision") and card.arch
    assert card.repo_id and card.licence and card.title and card.reference.startswith("https://")
    assert isinstance(card.commercial, bool) and isinstance(card.gated, bool)
    assert card.licence_flag.startswith("commercial" if card.commercial else "non-commercial")
    assert card.precision["cpu"] == "fp32" and card.precision["cuda"] in ("fp32", "fp16", "bf16")
    assert 0.2 <= card.mpp <= 2.0 and card.tile_size >= card.input_size >= 112
    assert all(0 < v < 1 for v in (*card.mean, *card.std))
    assert card.weight_files and all("/" not in f and "." in f for f in card.weight_files)
    assert card.params_m > 0
    if card.pooling == "cls+mean":
        assert card.dim % 2 == 0
    if card.head:
        assert card.pooling == "pooled"
    json.dumps(dict(card.arch_kwargs))  # plain data: readable without torch, recordable in provenance


def test_card_refuses_impossible_facts():
    base = get_card("kaiko-vits16")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    for bad in ({"pooling": "max"}, {"head": "conch_attn_pool"}, {"weight_files": ("dir/model.bin",)},
                {"precision": {"cuda": "fp16"}}, {"dim": 0}):
        with pytest.raises(ValueError, match="kaiko-vits16"):
            ModelCard(**{**fields, **bad})


def test_cards_module_imports_no_torch():
    code = ("import sys, preprocessing.cards as c; assert len(c.CARDS) >= 18; "
            "print(sorted(m for m in ('torch', 'numpy', 'timm', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


# -- the networks ----------------------------------------------------------------------


def _width(net) -> int:
    """The trunk's token width, read from the architecture (not from the card)."""
    trunk = net.trunk
    if net.card.library == "transformers":
        return trunk.config.hidden_size
    if net.card.head:
        return trunk.ln_contrast.normalized_shape[0]
    return trunk.embed_dim


@pytest.mark.parametrize("card", NETS, ids=lambda c: c.name)
def test_full_size_network_on_meta_matches_its_card(card):
    net = build_network(card, device="meta")
    params = sum(p.numel() for p in net.trunk.parameters()) / 1e6
    assert params == pytest.approx(card.params_m, rel=0.002)
    assert all(p.device.type == "meta" for p in net.parameters())
    assert not net.training
    assert _width(net) * (2 if card.pooling == "cls+mean" else 1) == card.dim


def _embeds_real_tiles(net, card, regions) -> None:
    with torch.inference_mode():
        out = net(tiles(card, regions))
    assert out.shape == (2, card.dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # two different tissue tiles, two different embeddings


@pytest.mark.parametrize("card", NETS, ids=lambda c: c.name)
def test_network_embeds_a_real_tile(card, regions):
    _embeds_real_tiles(seeded_net(card.name), card, regions)


@pytest.mark.slow
@pytest.mark.parametrize("card", [c for c in NETS if SMALL_M < c.params_m <= 100], ids=lambda c: c.name)
def test_full_depth_base_network_embeds_a_real_tile(card, regions):
    torch.manual_seed(0)
    _embeds_real_tiles(build_network(card), card, regions)


@pytest.mark.parametrize(("name", "block"), [("kaiko-vits16", "blocks"), ("hibou_b", "encoder.layer")])
def test_build_is_seeded_and_reduced_depth_is_shallower(name, block):
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(build_network(get_card(name), depth=2).trunk.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    blocks = {k[len(block) + 1:].split(".")[0] for k in states[0] if k.startswith(block + ".")}
    assert blocks == {"0", "1"}


def test_build_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="depth"):
        build_network(get_card("kaiko-vits16"), depth=0)
    with pytest.raises(NotImplementedError, match="resnet50_trunc"):
        build_network(get_card("resnet50_trunc"))


# -- pooling: prefix tokens counted by the model itself ---------------------------------


@pytest.mark.parametrize(("name", "prefix"), [("virchow2", 5), ("midnight12k", 1)])
def test_cls_plus_mean_is_cls_and_mean_of_patch_tokens_only(name, prefix, regions):
    card = get_card(name)
    net = seeded_net(name)
    x = tiles(card, regions)
    with torch.inference_mode():
        tokens = net.forward_features(x)
        out = net(x)
    grid = (card.input_size // card.arch_kwargs.get("patch_size", 14)) ** 2
    assert net.num_prefix_tokens == prefix and tokens.shape[1] == prefix + grid
    by_hand = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    if prefix > 1:  # the registers really are excluded: with them the mean differs
        assert not torch.allclose(out[:, card.dim // 2:], tokens[:, 1:].mean(1))


@pytest.mark.parametrize(("name", "prefix"), [("uni_v2", 9), ("hoptimus1", 5), ("hibou_b", 5), ("phikon", 1)])
def test_cls_cards_count_their_registers(name, prefix, regions):
    card = get_card(name)
    net = seeded_net(name)
    x = tiles(card, regions)
    with torch.inference_mode():
        tokens = net.forward_features(x)
        out = net(x)
    assert net.num_prefix_tokens == prefix
    torch.testing.assert_close(out, tokens[:, 0], rtol=0, atol=0)


# -- release layout --------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def _load(path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


RELEASE_KEYS = {  # a key each release file is known to hold, in its own naming
    "virchow2": "reg_token",  # timm ViT with registers and SwiGLU
    "phikon": "encoder.layer.0.attention.attention.query.weight",  # transformers 4.x ViT
    "conch_v15": "attn_pool_contrast.to_kv.weight",  # trunk + attention-pool head
    "midnight12k": "encoder.layer.0.mlp.weights_in.weight",  # transformers 4.x DINOv2, fused SwiGLU
}


@pytest.mark.parametrize("name", sorted(RELEASE_KEYS))
def test_release_layout_round_trip_loads_strictly(name, regions, tmp_path):
    card = get_card(name)
    net = seeded_net(name)
    state = {card.key_prefix + k: v for k, v in net.trunk.state_dict().items()}
    assert card.key_prefix + RELEASE_KEYS[name] in state
    path = tmp_path / card.weight_files[0]
    _save(state, path)

    torch.manual_seed(1)  # different random init, then the file's weights
    again = build_network(card, depth=1)
    loaded = {k.removeprefix(card.key_prefix): v for k, v in _load(path).items()}
    assert set(loaded) == set(again.trunk.state_dict())
    again.trunk.load_state_dict(loaded, strict=True)
    x = tiles(card, regions)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", [c.name for c in NETS if c.library == "transformers"])
def test_transformers_release_layout_is_what_transformers_itself_loads(name, regions, tmp_path, monkeypatch):
    """Our 4.x-style keys go through transformers' own checkpoint conversion to the same network."""
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = get_card(name)
    net = seeded_net(name)
    net.trunk.config.save_pretrained(tmp_path)
    _save(net.trunk.state_dict(), tmp_path / "model.safetensors")
    extra = {"add_pooling_layer": False} if card.arch == "ViTModel" else {}
    reference = getattr(transformers, card.arch).from_pretrained(tmp_path, local_files_only=True, **extra).eval()
    x = tiles(card, regions)
    with torch.inference_mode():
        torch.testing.assert_close(net.forward_features(x), reference(pixel_values=x).last_hidden_state)


def test_a_checkpoint_of_another_architecture_does_not_load():
    phikon = seeded_net("phikon").trunk.state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        build_network(get_card("kaiko-vitb16"), depth=1).trunk.load_state_dict(phikon, strict=True)
