"""Chowder and TransMIL beyond the generic contract (tests/models/test_models.py runs that for both)."""

from __future__ import annotations

import pytest
import torch

from models import MILConfig, create_model
from models.chowder import extreme_scores
from models.transmil import square_layout


def build(model: str, **kw):
    torch.manual_seed(0)
    return create_model(MILConfig(model=model, in_dim=16, hidden_dim=16, n_heads=4, **kw)).eval()


def test_extreme_scores_keep_valid_extremes_and_repeat_for_small_bags() -> None:
    scores = torch.tensor([[3.0, 99.0, -1.0, 7.0, -99.0, 0.5], [2.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, True, True, False, True], [True, True, False, False, False, False]])
    top, bottom = extreme_scores(scores, mask, 3)
    assert top.tolist() == [[7.0, 3.0, 0.5], [5.0, 2.0, 2.0]]  # padding (99) never wins; 2 tiles fill 3 slots
    assert bottom.tolist() == [[-1.0, 0.5, 3.0], [2.0, 5.0, 5.0]]
    top, bottom = extreme_scores(scores[:1, :1], mask[:1, :1], 5)  # fewer columns than R
    assert top.tolist() == bottom.tolist() == [[3.0] * 5]


def test_chowder_reads_only_the_extreme_tiles() -> None:
    """Changing a tile whose score is neither among the top-R nor the bottom-R changes nothing."""
    model = build("chowder", n_extreme=2)
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        h = model.embed(x)
        order = model.tile_scores(h)[0].argsort()
        middle = int(order[4])
        before = model(x).logits
        # Move the middle tile's features towards its neighbour in score: its score stays in the middle.
        y = x.clone()
        y[0, middle] = 0.999 * x[0, middle] + 0.001 * x[0, int(order[5])]
        assert int(model.tile_scores(model.embed(y))[0].argsort()[4]) == middle
        torch.testing.assert_close(model(y).logits, before)
        z = x.clone()
        z[0, int(order[-1])] += 1.0  # the top tile
        assert not torch.allclose(model(z).logits, before)


@pytest.mark.parametrize("n_extreme", [1, 5])
def test_chowder_default_r_is_padding_invariant_for_bags_smaller_than_r(n_extreme: int) -> None:
    model = build("chowder", n_extreme=n_extreme)
    bags = [torch.randn(n, 16) for n in (2, 7, 12)]
    x = torch.full((3, 12, 16), float("nan"))
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    with torch.no_grad():
        batched = model(x, mask).logits
        for i, b in enumerate(bags):
            torch.testing.assert_close(batched[i], model(b.unsqueeze(0)).logits[0], atol=1e-6, rtol=0)


def test_square_layout_repeats_the_first_tokens_like_the_paper() -> None:
    mask = torch.tensor([[True] * 5 + [False] * 2, [False, True, False, True, False, False, False]])
    source, valid, cell, side = square_layout(mask)
    assert side == 3 and source.shape == (2, 9)
    assert source[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]  # 5 tokens -> a 3x3 square
    assert valid[0].all() and cell[0].tolist() == list(range(9))
    assert source[1, :4].tolist() == [1, 3, 1, 3] and valid[1].tolist() == [True] * 4 + [False] * 5
    assert cell[1, :4].tolist() == [0, 1, 3, 4]  # a 2x2 square in the top-left of the 3x3 canvas
    assert (cell[1, 4:] == 9).all()  # the spare cell


def test_transmil_ignores_where_the_padding_is() -> None:
    """Valid instances anywhere in the row (not only a prefix) give the bag's own output."""
    model = build("transmil")
    bag = torch.randn(6, 16)
    x = torch.full((2, 10, 16), 1e4)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    where = [0, 2, 3, 5, 8, 9]
    x[0, where], mask[0, where] = bag, True
    x[1, :3], mask[1, :3] = bag[:3], True
    with torch.no_grad():
        out = model(x, mask).logits
        torch.testing.assert_close(out[0], model(bag.unsqueeze(0)).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], model(bag[:3].unsqueeze(0)).logits[0], atol=1e-5, rtol=0)


def test_transmil_sees_tile_order_through_its_position_encoding() -> None:
    """PPEG makes the model order-aware (unlike attention pooling): a permuted bag gives another output."""
    model = build("transmil")
    bag = torch.randn(9, 16)
    with torch.no_grad():
        a = model(bag.unsqueeze(0)).logits
        b = model(bag.flip(0).unsqueeze(0)).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_transmil_heads_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="n_heads=8 must divide hidden_dim=12"):
        MILConfig(model="transmil", hidden_dim=12)
    with pytest.raises(ValueError, match="n_extreme must be >= 1"):
        MILConfig(model="chowder", n_extreme=0)
    assert MILConfig(model="mean", hidden_dim=12).n_heads == 8  # only transmil uses heads
    assert MILConfig.from_dict({"model": "chowder"}).n_extreme == 5  # checkpoints written before the fields
