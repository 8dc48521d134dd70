"""Checkpoints: a saved model comes back identical, saves are atomic, and a foreign feature space is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import MILConfig, create_model, list_models
from models.checkpoint import (
    PROVENANCE_KEYS,
    CheckpointError,
    ProvenanceError,
    check_provenance,
    load_checkpoint,
    provenance_from_attrs,
    save_checkpoint,
)

PROVENANCE = {
    "encoder": "resnet50_trunc",
    "weights": "resnet50-11ad3fa6.pth",
    "feature_dim": 16,
    "target_mpp": 0.5,
    "tile_size": 256,
    "schema_version": 1,
    "stain": "none",
}


def tiny_model(name: str = "clam_sb", n_classes: int = 3):
    torch.manual_seed(0)
    return create_model(MILConfig(model=name, in_dim=16, hidden_dim=12, attn_dim=8, n_classes=n_classes,
                                   n_heads=4))


def save(path: Path, model, **kw) -> Path:
    args = {"classes": [str(i) for i in range(model.config.n_classes)], "provenance": PROVENANCE, "meta": {}} | kw
    return save_checkpoint(path, model, **args)


@pytest.mark.parametrize("name", list_models())
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    model = tiny_model(name).eval()
    meta = {"epochs": 3, "seed": 0, "metrics": {"val_auc": 0.91}, "package_version": "0.1.0"}
    path = save(tmp_path / "model.pt", model, classes=["normal", "tumor", "other"], meta=meta)
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training
    assert ckpt.config == model.config and ckpt.classes == ["normal", "tumor", "other"]
    assert ckpt.provenance == PROVENANCE and ckpt.meta == meta
    x, mask = torch.randn(2, 7, 16), torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, mask).logits, model(x, mask).logits)


def test_feature_file_attrs_are_stored_as_plain_types(tmp_path: Path) -> None:
    """HDF5 attrs are numpy scalars; stored as such, weights_only loading would refuse the file."""
    attrs = {"encoder": np.str_("resnet50_trunc"), "feature_dim": np.int64(16), "target_mpp": np.float64(0.5)}
    attrs |= {"tile_size": np.int32(256), "slide_id": "slide-1", "created": "2024-01-01"}
    provenance = provenance_from_attrs(attrs)
    assert set(provenance) == {"encoder", "feature_dim", "target_mpp", "tile_size"}
    meta = {"created": "now", "lr": np.float32(1e-4), "sizes": (1, 2)}
    _, ckpt = load_checkpoint(save(tmp_path / "m.pt", tiny_model(), provenance=provenance, meta=meta))
    assert ckpt.provenance == {"encoder": "resnet50_trunc", "feature_dim": 16, "target_mpp": 0.5, "tile_size": 256}
    assert type(ckpt.provenance["feature_dim"]) is int and ckpt.meta["sizes"] == [1, 2]


def test_save_leaves_no_temp_file_and_a_failed_save_keeps_the_old_one(tmp_path: Path) -> None:
    path = save(tmp_path / "ckpt" / "model.pt", tiny_model())
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]
    with pytest.raises(TypeError, match=r"meta\['fn'\]"):
        save(path, tiny_model("mean"), meta={"fn": print})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]
    assert load_checkpoint(path)[1].config.model == "clam_sb"


def test_save_rejects_inconsistent_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_classes=3"):
        save(tmp_path / "a.pt", tiny_model(), classes=["0", "1"])
    with pytest.raises(ValueError, match="strings"):
        save(tmp_path / "a.pt", tiny_model(n_classes=2), classes=[0, 1])
    with pytest.raises(ValueError, match="slide_id"):
        save(tmp_path / "a.pt", tiny_model(), provenance={**PROVENANCE, "slide_id": "s1"})
    assert not list(tmp_path.iterdir())


def test_provenance_mismatch_names_the_source_and_every_key() -> None:
    found = {**PROVENANCE, "encoder": "resnet18_trunc", "tile_size": np.int64(224), "target_mpp": 0.5 + 1e-12}
    with pytest.raises(ProvenanceError) as err:
        check_provenance(PROVENANCE, found, "site_a/slide_7.h5")
    message = str(err.value)
    assert message.startswith("site_a/slide_7.h5:")
    assert "encoder: checkpoint 'resnet50_trunc' vs features 'resnet18_trunc'" in message
    assert "tile_size: checkpoint 256 vs features 224" in message
    assert "target_mpp" not in message and "\n" not in message  # float within tolerance; one line


def test_provenance_checks_only_the_expected_keys() -> None:
    check_provenance({"encoder": "uni"}, {"encoder": "uni", "tile_size": 999}, "s.h5")  # extra found keys: fine
    check_provenance({}, {"encoder": "anything"}, "s.h5")
    with pytest.raises(ProvenanceError, match=r"target_mpp: checkpoint 0\.5 vs features 1\.0"):
        check_provenance({"target_mpp": 0.5}, {"target_mpp": 1.0}, "s.h5")
    with pytest.raises(ProvenanceError, match=r"weights: checkpoint 'w.pth' vs features \(missing\)"):
        check_provenance({"weights": "w.pth"}, {}, "s.h5")
    assert set(PROVENANCE) == set(PROVENANCE_KEYS)


def test_missing_and_corrupt_files_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(save(tmp_path / "good.pt", tiny_model()).read_bytes()[:2000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    pickled = tmp_path / "pickled_module.pt"
    torch.save(tiny_model(), pickled)  # a whole pickled nn.Module: loading it would run code
    for path in (garbage, truncated, foreign, pickled):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert message.startswith(str(path)) and "\n" not in message
        assert "weights_only" not in message  # not torch's advice to load untrusted pickles


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "m.pt", tiny_model())
    payload = torch.load(path, weights_only=True)
    payload["config"]["hidden_dim"] = 13
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not rebuild its model"):
        load_checkpoint(path)
