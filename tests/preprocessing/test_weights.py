"""Weights from local files only: release layouts reload strictly, hub caches and catalogues resolve, no network.

Every timm/transformers card is exercised at ``depth=1`` (one transformer block):
the same code path as the full network, in a fraction of the time and memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from bagsites import make_site
from safetensors.torch import save_file

from preprocessing.cards import ModelCard, get_card, list_cards
from preprocessing.encoders import EncoderError, create_encoder, encoder_for_card
from preprocessing.foundation import build_network
from preprocessing.slide import open_slide
from preprocessing.tv import import_torchvision
from preprocessing.weights import (
    ENV_VAR,
    file_fingerprint,
    find_local,
    load_network,
    resolve_weights,
    search_description,
)

FOUNDATION = [c for c in list_cards() if c.library in ("timm", "transformers")]


@pytest.fixture(autouse=True)
def _no_site_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No catalogue and empty caches: only what a test installs is found."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))


@pytest.fixture(scope="module")
def tile(slide_file) -> torch.Tensor:
    """Two real H&E tiles (uint8 NHWC), 256 px: resized by the ViTs to their input size."""
    with open_slide(slide_file("cmu-1-small-region.svs")) as slide:
        tiles = [slide.read_region((x, 1200), 0, (256, 256)) for x in (800, 1100)]
    return torch.from_numpy(np.stack(tiles))


def save_release(card: ModelCard, net: torch.nn.Module, folder: Path, name: str | None = None) -> Path:
    """``net.trunk`` saved as the card's release file: its file name, its format, its key prefix."""
    name = name or card.weight_files[0]
    state = {card.key_prefix + k: v.contiguous() for k, v in net.trunk.state_dict().items()}
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def small_net(card: ModelCard, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(card, depth=1)


# -- release layouts reload strictly -----------------------------------------------------------------------------


@pytest.mark.parametrize("card", FOUNDATION, ids=lambda c: c.name)
def test_each_card_reloads_its_release_layout_and_gives_the_same_features(card, tile, tmp_path):
    net = small_net(card)
    snapshot = tmp_path / "snapshot"
    saved = save_release(card, net, snapshot)
    located = resolve_weights(card, snapshot)  # a snapshot folder: the card's own file name is found in it
    assert located is not None and located.path == saved
    loaded = load_network(card, located.path, depth=1)
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    fresh, again = encoder_for_card(card, net, "x"), encoder_for_card(card, loaded, file_fingerprint(saved))
    want, got = fresh(tile[:1]), again(tile[:1])  # one real tile: the forward is most of this test's time
    assert got.shape == (1, card.dim) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_key_prefix_is_stripped_and_other_towers_are_left_out(tile, tmp_path):
    card = dataclasses.replace(get_card("kaiko-vits16"), key_prefix="visual.trunk.")
    net = small_net(card)
    path = save_release(card, net, tmp_path)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "text.proj.weight": torch.zeros(3, 3)}, path)  # a text tower beside the image one
    loaded = load_network(card, path, depth=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_wrapped_and_half_precision_checkpoints_load(tmp_path):
    card = get_card("kaiko-vits16")
    net = small_net(card)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {k: v.half() for k, v in net.trunk.state_dict().items()}, "epoch": 3}, path)
    loaded = load_network(card, path, depth=1)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # the network's dtype, not the file's
    torch.testing.assert_close(loaded.trunk.cls_token, net.trunk.cls_token.half().float())
    legacy = tmp_path / "legacy.pth"  # torch's pre-1.6 format cannot be memory-mapped: read whole instead
    torch.save({"state_dict": net.trunk.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    torch.testing.assert_close(load_network(card, legacy, depth=1).trunk.cls_token, net.trunk.cls_token)


@pytest.mark.parametrize("recompute", [True, False], ids=["timm-recomputes", "cpu-twin"])
def test_buffers_no_file_holds_are_computed_after_a_meta_build(recompute, tmp_path, monkeypatch):
    """Rotary tables and fixed zero biases are non-persistent: neither in the file nor made on ``meta``."""
    import_torchvision()  # before timm
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
    from timm.models.eva import EvaAttention

    if not recompute:  # a layer that cannot recompute its buffers: they come from a CPU-built twin
        for cls in (RotaryEmbeddingCat, EvaAttention):
            owner = next(c for c in cls.__mro__ if "init_non_persistent_buffers" in vars(c))
            monkeypatch.delattr(owner, "init_non_persistent_buffers")
    card = dataclasses.replace(get_card("kaiko-vits16"), name="eva-rope", arch="eva02_tiny_patch14_224",
                               arch_kwargs={"num_classes": 0}, dim=192)
    net = small_net(card)
    assert set(dict(net.named_buffers())) - {f"trunk.{k}" for k in net.trunk.state_dict()}  # there are some
    loaded = load_network(card, save_release(card, net, tmp_path), depth=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize(("file_card", "counts"), [
    ("kaiko-vits16", r"\d+ missing \(e\.g\. blocks\.0\.ls1\.gamma\).*\d+ of another shape \(e\.g\. cls_token: "
                     r"file \(1, 1, 384\), network \(1, 1, 1024\)\)"),
    ("phikon", r"of \d+ keys, \d+ missing \(e\.g\. cls_token\), \d+ unexpected \(e\.g\. embeddings\.cls_token\)"),
])
def test_another_cards_checkpoint_is_refused_in_one_line(file_card, counts, tmp_path):
    other = get_card(file_card)
    path = save_release(other, small_net(other), tmp_path / file_card)
    with pytest.raises(EncoderError) as info:
        load_network(get_card("uni_v1"), path, depth=1)
    message = str(info.value)
    assert "\n" not in message and "uni_v1" in message and str(path) in message
    assert re.search(counts, message), message
    with pytest.raises(EncoderError, match="does not fit encoder uni_v1"):  # also at full size, nothing allocated
        create_encoder("uni_v1", weights=path)


def test_unreadable_files_are_one_line_errors(tmp_path):
    junk = tmp_path / "pytorch_model.bin"
    junk.write_bytes(b"not weights at all")
    with pytest.raises(EncoderError, match=r"cannot read weights .*pytorch_model\.bin") as info:
        create_encoder("uni_v1", weights=junk)
    assert "\n" not in str(info.value)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(EncoderError, match="not a state dict"):
        create_encoder("uni_v1", weights=tmp_path / "list.pt")


# -- where weights are found ---------------------------------------------------------------------------------------


def hub_cache_layout(root: Path, card: ModelCard, payload: Path, *, revs: tuple[str, ...] = ("a1", "b2"),
                     main: str = "a1", blob_name: str | None = None) -> Path:
    """``root/models--ORG--NAME`` as the hub client writes it: blobs by SHA-256, snapshots of symlinks, refs/main."""
    org, name = card.repo_id.split("/")
    models = root / f"models--{org}--{name}"
    blob = models / "blobs" / (blob_name or hashlib.sha256(payload.read_bytes()).hexdigest())
    blob.parent.mkdir(parents=True)
    blob.write_bytes(payload.read_bytes())
    for rev in revs:
        snap = models / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / card.weight_files[0]).symlink_to(os.path.relpath(blob, snap))
    (models / "refs").mkdir()
    (models / "refs" / "main").write_text(main)
    return models


@pytest.fixture(scope="module")
def vits16_release(tmp_path_factory) -> Path:
    """A full-size kaiko-vits16 release file (ViT-S/16, 87 MB): small enough to build and load for real."""
    card = get_card("kaiko-vits16")
    torch.manual_seed(2)
    return save_release(card, build_network(card), tmp_path_factory.mktemp("release"))


def test_hub_cache_layouts_resolve_to_the_main_snapshot(vits16_release, tmp_path, monkeypatch):
    card = get_card("kaiko-vits16")
    models = hub_cache_layout(tmp_path / "hub", card, vits16_release)
    want = models / "snapshots" / "a1" / card.weight_files[0]
    for given in (tmp_path / "hub", models, models / "snapshots" / "a1"):  # cache root, repo folder, snapshot
        assert resolve_weights(card, given).path == want
    assert find_local(card, weights_dir=tmp_path / "hub").path == want  # a hub cache as the site catalogue
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # the hub client's own cache, read as files
    found = find_local(card)
    assert found.path == want and found.source == "hub cache"
    enc = create_encoder("kaiko-vits16")
    assert enc.weights == file_fingerprint(vits16_release) and enc.card == "kaiko-vits16"
    (models / "refs" / "main").unlink()  # no ref: the newest snapshot
    os.utime(models / "snapshots" / "b2", (2e9, 2e9))
    assert find_local(card).path == models / "snapshots" / "b2" / card.weight_files[0]


def test_damaged_hub_blob_is_refused(vits16_release, tmp_path):
    card = get_card("kaiko-vits16")
    hub_cache_layout(tmp_path / "hub", card, vits16_release, blob_name="0" * 64)
    with pytest.raises(EncoderError, match="damaged"):
        create_encoder("kaiko-vits16", weights=tmp_path / "hub")


def test_catalogue_folders_and_weights_json(vits16_release, tmp_path, monkeypatch):
    card = get_card("kaiko-vits16")
    site = tmp_path / "weights"
    (site / card.name).mkdir(parents=True)
    (site / card.name / card.weight_files[0]).symlink_to(vits16_release)
    assert find_local(card, weights_dir=site).source == "catalogue"
    monkeypatch.setenv(ENV_VAR, str(site))
    assert find_local(card).path == site / card.name / card.weight_files[0]
    # weights.json: any file name, relative to the catalogue; it takes precedence over the folders
    (site / "approved").mkdir()
    (site / "approved" / "vit-s.bin").write_bytes(vits16_release.read_bytes())
    (site / "weights.json").write_text(json.dumps({card.name: "approved/vit-s.bin", "uni_v1": str(tmp_path)}))
    found = find_local(card)
    assert (found.path, found.source) == (site / "approved" / "vit-s.bin", "weights.json")
    assert create_encoder(card.name).weights == file_fingerprint(vits16_release)
    with pytest.raises(EncoderError, match=r"maps uni_v1 to .* not a weight file or a folder holding pytorch_model"):
        find_local(get_card("uni_v1"))
    (site / "weights.json").write_text("{not json")
    with pytest.raises(EncoderError, match=r"weights\.json is not readable JSON"):
        find_local(card)
    with pytest.raises(EncoderError, match=r"--weights-dir .*nowhere is not a directory"):
        find_local(card, weights_dir=tmp_path / "nowhere")


def test_no_weights_says_where_it_looked_and_how_to_go_on(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(EncoderError) as info:
        create_encoder("uni_v1")
    message = str(info.value)
    assert "\n" not in message
    for part in ("pytorch_model.bin", f"${ENV_VAR} {tmp_path}", "uni_v1/", "models--MahmoodLab--UNI",
                 str(tmp_path / "empty-hf-cache"), "--weights FILE|DIR", "--random-init", "non-commercial, gated"):
        assert part in message, part
    with pytest.raises(EncoderError, match="holds no weights for uni_v1"):
        create_encoder("uni_v1", weights=tmp_path)
    monkeypatch.delenv(ENV_VAR)
    assert "--weights-dir and $WSI_FL_WEIGHTS_DIR not set" in search_description(get_card("uni_v1"))


def test_nothing_touches_the_network(vits16_release, tile, tmp_path, monkeypatch):
    """Networking disabled: building and loading from a hub cache, then extracting, needs no connection."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))
    card = get_card("kaiko-vits16")
    hub_cache_layout(tmp_path / "hub", card, vits16_release)
    enc = create_encoder(card.name, weights_dir=tmp_path / "hub")
    feats = enc(tile)
    assert feats.shape == (2, card.dim) and torch.isfinite(feats).all()


# -- memory ------------------------------------------------------------------------------------------------------

_RSS_PROBE = textwrap.dedent("""
    import json, resource, sys
    from preprocessing.tv import import_torchvision
    import_torchvision()  # before timm (see preprocessing.tv)
    import safetensors.torch, timm, torch, transformers  # noqa: F401  (imports are not the load's memory)
    from preprocessing.cards import get_card
    from preprocessing.foundation import build_network
    from preprocessing.weights import load_network

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    card = get_card(sys.argv[2])
    build_network(card, device="meta")  # timm's first-call caches, not the load's memory either
    torch.set_num_threads(1)
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    base = rss()
    net = load_network(card, sys.argv[1])
    with torch.inference_mode():  # a forward reads every weight: the mapped file is now all in memory
        out = net(torch.zeros(1, 3, card.input_size, card.input_size))
    print(json.dumps({"base": base, "peak": max(peak(), rss()), "dim": out.shape[1]}))
""")


@pytest.mark.slow
def test_loading_costs_about_one_copy_of_the_weights(tmp_path):
    """Peak RSS of load + one forward, above the RSS after imports, <= 1.3 x the safetensors file (ViT-B, ~340 MB)."""
    card = get_card("kaiko-vitb16")
    torch.manual_seed(0)
    path = save_release(card, build_network(card), tmp_path, name="model.safetensors")
    size = path.stat().st_size
    assert size > 300e6
    run = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), card.name], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    growth = result["peak"] - result["base"]
    print(f"weights {size / 2**20:.0f} MiB, peak RSS above imports {growth / 2**20:.0f} MiB ({growth / size:.2f}x)")
    assert result["dim"] == card.dim
    assert growth <= 1.3 * size, f"{growth / size:.2f} x the file"


# -- provenance across sites -------------------------------------------------------------------------------------


def test_sites_whose_weights_differ_are_refused(tmp_path):
    """Two hospitals, same encoder card, different weight files: the federation stops before round 1."""
    from wsi_fl.engines.inline import InlineGrid
    from wsi_fl.federation.config import FedConfig
    from wsi_fl.server.loop import run_server
    from wsi_fl.site.app import make_client_app

    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    common = {"encoder": "uni_v1", "transform": "{}"}
    make_site(tmp_path / "cohort", "site_1", 8, 0, weights=a, precision="fp16", **common)
    make_site(tmp_path / "cohort", "site_2", 8, 1, weights=b, precision="fp32", **common)
    grid = InlineGrid(make_client_app(tmp_path / "cohort"), [{"partition-id": i} for i in range(2)])
    cfg = FedConfig(num_server_rounds=1, min_available_nodes=2, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError) as info:
        run_server(grid, cfg)
    message = str(info.value)
    shas = f"({a}|{b})"  # whichever site answered first is the reference
    assert re.search(rf"site \d+: features do not match site \d+'s feature space: weights: site \d+ '{shas}' vs"
                     rf" features '{shas}'; features must come from the same weight file", message), message
    assert a in message and b in message
    assert "\n" not in message
    assert "precision" not in message  # fp16 on a GPU and fp32 on a CPU are one feature space
    assert not (tmp_path / "run" / "last.pt").exists()
