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


# -- torch.export programs (.pt2) and model-card encoders ----------------------------------------------------------


def _export(module: nn.Module, path: Path, batch: int = 2, dynamic: bool = True) -> Path:
    x = torch.zeros(batch, 3, 32, 32)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    torch.export.save(torch.export.export(module, (x,), dynamic_shapes=shapes), str(path))
    return path


def test_exported_program_file(tmp_path: Path):
    torch.manual_seed(0)
    module = _Tiny().eval()
    path = _export(module, tmp_path / "tiny.pt2")
    enc = create_encoder(str(path), input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (enc.dim, enc.input_size, enc.name, enc.fixed_input_size) == (7, 32, "tiny.pt2", True)
    assert enc.weights == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    x = _tiles(5, size=48)  # another batch size than exported, and resized to 32 px first
    scaled = nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), size=(32, 32), mode="bilinear",
                                       antialias=True, align_corners=False)
    with torch.no_grad():
        expected = module((scaled / 255 - 0.5) / 0.25)
    torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-5)


def test_exported_program_errors_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture):
    static = _export(_Tiny().eval(), tmp_path / "static.pt2", batch=1, dynamic=False)
    with pytest.raises(EncoderError, match=r"exported for one batch size.*Dim\('batch'\)"):
        create_encoder(str(static), input_size=32)
    with pytest.raises(EncoderError, match=r"fails on a 2x3x224x224 input \(set the input size\)"):
        create_encoder(str(_export(_Tiny().eval(), tmp_path / "dyn.pt2")))  # exported at 32 px
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(EncoderError, match=r"junk\.pt2 is not a torch\.export program"):
        create_encoder(str(junk))
    script = tmp_path / "script.pt2"  # a zip, but TorchScript's
    torch.jit.script(_Tiny().eval()).save(str(script))
    with pytest.raises(EncoderError, match=r"script\.pt2 is not a loadable torch\.export program") as info:
        create_encoder(str(script))
    assert "\n" not in str(info.value) and "Traceback" not in capfd.readouterr().err


def test_card_encoder_records_card_precision_and_transform():
    enc = create_encoder("kaiko-vits16", random_init=True)
    assert (enc.card, enc.weights, enc.dim, enc.input_size, enc.fixed_input_size) == (
        "kaiko-vits16", "random-init", 384, 224, True)
    assert (enc.precision, enc.precision_on("cuda"), enc.dtype) == ("fp32", "fp32", torch.float32)
    assert enc.transform == {"resize": 224, "interpolation": "bilinear", "antialias": True,
                             "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    from preprocessing.cards import get_card
    from preprocessing.encoders import encoder_for_card

    assert encoder_for_card(get_card("uni_v1"), nn.Identity(), "x").precision_on("cuda") == "fp16"
    a = enc(_tiles(2, size=256))  # 256-px tiles (the card's) resized to 224
    torch.manual_seed(99)  # the random init is seeded by itself, and leaves the caller's RNG alone
    state = torch.get_rng_state()
    b = create_encoder("kaiko-vits16", random_init=True)(_tiles(2, size=256))
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    resnet = create_encoder("resnet18_trunc", random_init=True)
    assert resnet.transform["resize"] is None and resnet.card == "resnet18_trunc" and resnet.precision == "fp32"


def test_encoder_runs_in_its_cards_precision_on_the_device():
    """A card saying bf16 for a device gets a bf16 model and bf16 inputs there (CPU stands in for a GPU here)."""
    from preprocessing.cards import get_card
    from preprocessing.encoders import encoder_for_card
    from preprocessing.foundation import build_network

    card = get_card("kaiko-vits16")
    torch.manual_seed(0)
    enc = encoder_for_card(card, build_network(card, depth=1), "x")
    full = enc(_tiles(2, size=224))
    enc.precisions = {"cpu": "bf16"}
    enc.to("cpu")
    assert enc.precision == "bf16" and next(enc.model.parameters()).dtype == torch.bfloat16
    half = enc(_tiles(2, size=224))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.1, atol=0.1)


def test_precision_override_runs_bf16_on_cpu_and_is_refused_where_it_cannot_apply(tmp_path: Path):
    """``precision="bf16"`` is the CPU speed option (AVX512-BF16/AMX): the model runs in it, the features stay
    close to fp32's, and what ran is what the encoder reports (and the feature files record)."""
    fp32 = create_encoder("resnet18_trunc", random_init=True)
    bf16 = create_encoder("resnet18_trunc", random_init=True, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    tiles = _tiles(4, size=224)
    a, b = fp32(tiles), bf16(tiles).float()
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    with pytest.raises(EncoderError, match="unknown precision 'int8'"):
        create_encoder("resnet18_trunc", random_init=True, precision="int8")
    scripted = tmp_path / "m.pt"
    torch.jit.script(nn.Flatten()).save(str(scripted))
    with pytest.raises(EncoderError, match="runs in the precision it was saved in"):
        create_encoder(scripted, precision="bf16")
