"""Encoder registry, weights handling (explicit file, hub cache, random init) and TorchScript files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from preprocessing.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderError,
    create_encoder,
    list_encoders,
    resnet_trunc,
)
from preprocessing.tv import import_torchvision

# The tests script/trace models themselves; torch >= 2.10 deprecates TorchScript (still the format we load).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch hub cache with no checkpoints in it (TORCH_HOME is read on every get_dir())."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _tiles(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def _random_resnet18_state(path: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = import_torchvision().models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so folding them is really exercised
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    state = net.state_dict()
    torch.save(state, path)
    return state


def test_registry_lists_both_trunks():
    assert {"resnet50_trunc", "resnet18_trunc"} <= set(list_encoders())


@pytest.mark.parametrize(("name", "dim"), [("resnet18_trunc", 256), ("resnet50_trunc", 1024)])
def test_trunk_dims_and_random_init_record(name: str, dim: int):
    enc = create_encoder(name, random_init=True)
    assert (enc.dim, enc.input_size, enc.weights) == (dim, 224, "random-init")
    assert (enc.mean, enc.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not enc.model.training
    feats = enc(_tiles(2))
    assert feats.shape == (2, dim) and feats.dtype == torch.float32


def test_random_init_is_deterministic():
    a = create_encoder("resnet18_trunc", random_init=True)
    torch.manual_seed(123)  # global RNG state must not matter
    b = create_encoder("resnet18_trunc", random_init=True)
    x = _tiles(2)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_missing_weights_says_where_it_looked_and_what_to_do(empty_hub: Path):
    with pytest.raises(EncoderError, match="--random-init") as info:
        create_encoder("resnet50_trunc")
    message = str(info.value)
    assert str(empty_hub) in message and "resnet50-0676ba61.pth" in message and "--weights" in message
    assert "\n" not in message


def test_weights_from_explicit_path_match_plain_model(tmp_path: Path, empty_hub: Path):
    path = tmp_path / "r18.pth"
    state = _random_resnet18_state(path)
    enc = create_encoder("resnet18_trunc", weights=path)
    assert enc.weights == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    reference = resnet_trunc("resnet18", state)  # plain torchvision trunk, unfolded, NCHW
    x = _tiles(3)
    with torch.no_grad():
        expected = reference(((x.permute(0, 3, 1, 2).float() / 255) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                             / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-4)


def test_weights_found_in_hub_cache_are_hash_checked(tmp_path: Path, empty_hub: Path):
    empty_hub.mkdir(parents=True)
    _random_resnet18_state(empty_hub / "resnet18-f37072fd.pth")  # right name, wrong bytes
    with pytest.raises(EncoderError, match="damaged"):
        create_encoder("resnet18_trunc")


def test_weights_for_another_architecture_are_refused(tmp_path: Path):
    path = tmp_path / "r18.pth"
    _random_resnet18_state(path)
    with pytest.raises(EncoderError, match="does not fit resnet50"):
        create_encoder("resnet50_trunc", weights=path)
    with pytest.raises(EncoderError, match="not found"):
        create_encoder("resnet18_trunc", weights=tmp_path / "nope.pth")
    with pytest.raises(EncoderError, match="not both"):
        create_encoder("resnet18_trunc", weights=path, random_init=True)


def test_unknown_name_lists_the_registry():
    with pytest.raises(EncoderError, match="resnet18_trunc"):
        create_encoder("vit_giant_from_nowhere")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.head = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_torchscript_file(tmp_path: Path):
    torch.manual_seed(0)
    module = _Tiny().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(module).save(str(path))
    enc = create_encoder(str(path), input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (enc.dim, enc.input_size, enc.name) == (7, 32, "tiny.pt")
    assert enc.weights == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    x = _tiles(2, size=48)  # not the input size: resized to 32 px first
    got = enc(x)
    scaled = nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), size=(32, 32), mode="bilinear",
                                       antialias=True, align_corners=False)
    with torch.no_grad():
        expected = module((scaled / 255 - 0.5) / 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_torchscript_must_return_batch_by_dim(tmp_path: Path):
    path = tmp_path / "conv.pt"
    torch.jit.trace(nn.Conv2d(3, 2, 3).eval(), torch.zeros(1, 3, 16, 16)).save(str(path))
    with pytest.raises(EncoderError, match=r"must return a \(batch, dim\) tensor"):
        create_encoder(str(path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(EncoderError, match="not a loadable TorchScript file"):
        create_encoder(str(junk))


def test_preprocess_is_normalised_channels_last():
    enc = create_encoder("resnet18_trunc", random_init=True)
    x = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    x[..., 0] = 255
    out = enc.preprocess(x)
    assert out.shape == (1, 3, 4, 4) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                -IMAGENET_MEAN[2] / IMAGENET_STD[2]]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(torch.zeros(1, 4, 4, 3))
