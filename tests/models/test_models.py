"""The MIL models' contract: padding is invisible, attention is a distribution, CLAM's loss respects the mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import MILConfig, MILModel, create_model, list_models, masked_softmax, register_model
from models.base import standardize_within_bag
from models.clam import pseudo_label_indices

BUILTIN = ("attention", "chowder", "clam_sb", "gated_attention", "max", "mean", "transmil")
ATTENTION_MODELS = ("attention", "clam_sb", "gated_attention")


def tiny(model: str, **kw) -> MILConfig:
    return MILConfig(**{"model": model, "in_dim": 16, "hidden_dim": 12, "attn_dim": 8, "k_sample": 3, "n_heads": 4,
                        "n_extreme": 2, **kw})


def build(config: MILConfig, seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    return create_model(config)


def pad(bags: list[torch.Tensor], fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch bags of different lengths; padding is garbage (NaN by default) that must not matter."""
    n = max(len(b) for b in bags)
    x = torch.full((len(bags), n, bags[0].shape[1]), fill)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


def random_bags(lengths: tuple[int, ...], dim: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lengths]


def test_registry_lists_the_builtin_models() -> None:
    assert set(BUILTIN) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'transformer'") as err:
        create_model(MILConfig(model="transformer"))
    for name in BUILTIN:
        assert name in str(err.value)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("mean")(lambda config: None)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("fill", [float("nan"), 1e4])
@pytest.mark.parametrize("input_norm", ["none", "slide"])
def test_padded_batch_equals_each_bag_alone(name: str, fill: float, input_norm: str) -> None:
    model = build(tiny(name, input_norm=input_norm)).eval()
    bags = random_bags((5, 1, 8, 3))
    x, mask = pad(bags, fill)
    with torch.no_grad():
        batched = model(x, mask)
        for i, bag in enumerate(bags):
            alone = model(bag.unsqueeze(0))
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-6, rtol=0)
            if name in ATTENTION_MODELS:
                n = len(bag)
                torch.testing.assert_close(batched.attention[i, :n], alone.attention[0], atol=1e-6, rtol=0)
                assert torch.all(batched.attention[i, n:] == 0)
            else:
                assert batched.attention is None
    assert torch.isfinite(batched.logits).all()


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_attention_is_a_distribution_over_valid_instances(name: str) -> None:
    model = build(tiny(name)).eval()
    x, mask = pad(random_bags((7, 2, 4)), fill=0.0)
    with torch.no_grad():
        a = model(x, mask).attention
    assert a.shape == mask.shape
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3))
    assert torch.all(a[mask] > 0) and torch.all(a[~mask] == 0)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("n_classes", [2, 4])
def test_output_shapes(name: str, n_classes: int) -> None:
    model = build(tiny(name, n_classes=n_classes)).eval()
    out = model(torch.randn(3, 6, 16))
    assert out.logits.shape == (3, n_classes)
    assert out.attention is None or out.attention.shape == (3, 6)
    assert out.aux_loss is None


@pytest.mark.parametrize("name", BUILTIN)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = build(tiny(name, n_classes=3)).train()
    x, mask = pad(random_bags((5, 4, 6)))
    labels = torch.tensor([0, 1, 2])  # every class, so each CLAM instance classifier is used
    out = model(x, mask, labels)
    loss = F.cross_entropy(out.logits, labels) + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname  # NaN padding did not leak into any gradient
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", BUILTIN)
def test_deterministic_given_seed(name: str) -> None:
    x = torch.randn(2, 5, 16)
    a, b = build(tiny(name), seed=3).train(), build(tiny(name), seed=3).train()
    torch.manual_seed(7)
    out_a = a(x).logits
    torch.manual_seed(7)
    out_b = b(x).logits  # same init and same dropout draws
    assert torch.equal(out_a, out_b)


def test_clam_aux_loss_only_in_training_with_labels() -> None:
    model = build(tiny("clam_sb"))
    x, labels = torch.randn(2, 10, 16), torch.tensor([0, 1])
    out = model.train()(x, labels=labels)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0 and out.aux_loss.requires_grad
    assert model.train()(x).aux_loss is None
    assert model.eval()(x, labels=labels).aux_loss is None
    for name in ("attention", "chowder", "gated_attention", "mean", "max", "transmil"):
        assert build(tiny(name)).train()(x, labels=labels).aux_loss is None


def test_clam_instance_loss_ignores_padding() -> None:
    """Batched with garbage padding, the instance loss is the mean of each bag's own loss (k clipped per bag)."""
    model = build(tiny("clam_sb", dropout=0.0, inst_weight=1.0)).train()
    bags, labels = random_bags((2, 9, 5)), torch.tensor([1, 0, 1])
    x, mask = pad(bags, fill=1e4)  # huge padded rows would win a top-k over the unmasked batch
    batched = model(x, mask, labels).aux_loss
    alone = [model(b.unsqueeze(0), labels=labels[i : i + 1]).aux_loss for i, b in enumerate(bags)]
    torch.testing.assert_close(batched, torch.stack(alone).mean())


def test_clam_k_is_clipped_for_a_two_instance_bag() -> None:
    model = build(tiny("clam_sb", k_sample=8)).train()
    out = model(torch.randn(1, 2, 16), labels=torch.tensor([1]))
    assert torch.isfinite(out.aux_loss)
    # One instance has nothing to contrast: a zero loss, not NaN or a crash.
    out = model(torch.randn(1, 1, 16), labels=torch.tensor([1]))
    assert out.aux_loss == 0


def test_pseudo_labels_pick_valid_extremes_disjointly() -> None:
    scores = torch.tensor([9.0, 0.5, -1.0, 99.0, 2.0, -99.0])
    valid = torch.tensor([False, True, True, False, True, False])
    top, bottom = pseudo_label_indices(scores, valid, 1)
    assert top.tolist() == [4] and bottom.tolist() == [2]
    top, bottom = pseudo_label_indices(torch.zeros(4), torch.ones(4, dtype=torch.bool), 2)  # all tied
    assert sorted(top.tolist() + bottom.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="needs at least 4"):
        pseudo_label_indices(scores, valid, 2)


def test_masked_softmax() -> None:
    scores = torch.tensor([[1e30, 3.0, float("nan")], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, False], [True, True, False]])
    a = masked_softmax(scores, mask)
    assert a.tolist() == [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="no valid entry"):
        masked_softmax(scores, torch.tensor([[True, False, False], [False, False, False]]))
    torch.testing.assert_close(masked_softmax(scores[1:], None), torch.full((1, 3), 1 / 3))


def test_bad_inputs_are_explained() -> None:
    model = build(tiny("gated_attention"))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(5, 16))
    with pytest.raises(ValueError, match="in_dim=16"):
        model(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="no valid instance"):
        model(torch.randn(2, 3, 16), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(TypeError, match="bool"):
        model(torch.randn(1, 3, 16), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        model(torch.randn(1, 3, 16), labels=torch.tensor([2]))


def test_standardize_within_bag_uses_only_the_valid_instances() -> None:
    bags = [b * 3 + 7 for b in random_bags((6, 2, 9))]
    x, mask = pad(bags, fill=0.0)
    z = standardize_within_bag(x, mask)
    for i, bag in enumerate(bags):
        n = len(bag)
        torch.testing.assert_close(z[i, :n].mean(dim=0), torch.zeros(16), atol=1e-5, rtol=0)
        torch.testing.assert_close(z[i, :n].var(dim=0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
        assert torch.all(z[i, n:] == 0)


@pytest.mark.parametrize("name", BUILTIN)
def test_slide_input_norm_ignores_what_all_of_a_slides_tiles_share(name: str) -> None:
    """A per-slide shift and scale of every feature (stain, scanner, an encoder's offset) changes nothing."""
    bag = random_bags((12,))[0]
    g = torch.Generator().manual_seed(5)
    shifted = bag * (0.5 + torch.rand(16, generator=g)) + 10 * torch.randn(16, generator=g)
    with torch.no_grad():
        norm = build(tiny(name, input_norm="slide")).eval()
        torch.testing.assert_close(norm(shifted.unsqueeze(0)).logits, norm(bag.unsqueeze(0)).logits,
                                   atol=1e-4, rtol=0)
        plain = build(tiny(name)).eval()
        assert not torch.allclose(plain(shifted.unsqueeze(0)).logits, plain(bag.unsqueeze(0)).logits, atol=1e-2)


def test_config_round_trip_and_validation() -> None:
    config = MILConfig(model="clam_sb", in_dim=384, n_classes=3, dropout=0.1, k_sample=4)
    assert MILConfig.from_dict(config.to_dict()) == config
    assert MILConfig.from_dict({"dropout": 0}).dropout == 0.0  # JSON may give an int for a float
    with pytest.raises(ValueError, match="unknown MILConfig keys: hiden_dim"):
        MILConfig.from_dict({**config.to_dict(), "hiden_dim": 64})
    with pytest.raises(ValueError, match="n_classes"):
        MILConfig(n_classes=1)
    with pytest.raises(ValueError, match="input_norm must be one of none, slide, not 'batch'"):
        MILConfig(input_norm="batch")
    assert MILConfig.from_dict({"model": "mean"}).input_norm == "none"  # checkpoints written before the field
    with pytest.raises(ValueError, match="in_dim must be int"):
        MILConfig(in_dim="1024")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.in_dim = 3


def test_a_100k_instance_bag_trains_in_linear_memory() -> None:
    """One forward+backward of a slide-sized bag; any N x N tensor here would need 40 GB."""
    torch.manual_seed(0)
    model = create_model(MILConfig(model="clam_sb", in_dim=1024, hidden_dim=64, attn_dim=32)).train()
    x = torch.randn(1, 100_000, 1024)
    out = model(x, labels=torch.tensor([1]))
    (F.cross_entropy(out.logits, torch.tensor([1])) + out.aux_loss).backward()
    assert out.attention.shape == (1, 100_000)
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("instance_classifiers.0.")}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())  # class 0 is not in the labels
