"""``wsi-fl encoders`` (the catalogue, licence flags, installed weights) and the card defaults of ``wsi-fl preprocess``.

The listing is file look-ups only: it must answer without importing torch, so
that is checked in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from preprocessing.cards import get_card, list_cards
from preprocessing.weights import ENV_VAR
from wsi_fl.cli.main import build_parser, main
from wsi_fl.cli.preprocess import _card_tiling

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_site_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))


def _rows(capsys: pytest.CaptureFixture, *argv: str) -> list[dict]:
    assert main(["encoders", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_card_is_listed_with_its_licence_flags(capsys):
    assert main(["encoders"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith(("0 of", " "))}
    assert set(by_name) >= {c.name for c in list_cards()}
    assert lines[0].split() == ["encoder", "dim", "tile", "licence", "use", "weights"]
    uni = by_name["uni_v1"]
    assert "1024" in uni and "256 px @ 0.5 µm/px" in uni and "CC-BY-NC-ND-4.0" in uni
    assert "non-commercial, gated" in uni and uni.rstrip().endswith("-")  # no weights installed here
    assert "Apache-2.0" in by_name["hibou_b"] and " commercial " in by_name["hibou_b"] + " "
    assert "gated" not in by_name["hibou_b"]
    assert "$WSI_FL_WEIGHTS_DIR not set" in lines[-1] and f"0 of {len(list_cards())}" in lines[-1]
    rows = {r["name"]: r for r in _rows(capsys)}
    assert (rows["virchow2"]["commercial"], rows["virchow2"]["gated"], rows["virchow2"]["dim"]) == (False, True, 2560)
    assert rows["gigapath"]["use"] == get_card("gigapath").licence_flag == "commercial, gated"
    assert all(r["weights"] is None for r in rows.values())


def test_installed_weights_are_found_and_shown(tmp_path, capsys, monkeypatch):
    site = tmp_path / "weights"
    (site / "uni_v1").mkdir(parents=True)
    (site / "uni_v1" / "pytorch_model.bin").write_bytes(b"")  # finding is by name only; loading checks the file
    hub = site / "models--owkin--phikon-v2" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    (hub / "model.safetensors").write_bytes(b"")
    (site / "weights.json").write_text(json.dumps({"virchow2": "/approved/virchow2.bin", "hibou_b": str(hub)}))
    assert main(["encoders", "--weights-dir", str(site)]) == 2  # a mapped file that is not there: exit 2
    err = capsys.readouterr().err
    assert "maps virchow2 to /approved/virchow2.bin" in err and len(err.strip().splitlines()) == 1
    (site / "weights.json").write_text(json.dumps({"hibou_b": "models--owkin--phikon-v2/snapshots/abc"}))
    monkeypatch.setenv(ENV_VAR, str(site))
    rows = {r["name"]: r for r in _rows(capsys)}
    assert (rows["uni_v1"]["weights"], rows["uni_v1"]["found_in"]) == (
        str(site / "uni_v1" / "pytorch_model.bin"), "catalogue")
    assert rows["phikon_v2"]["found_in"] == "catalogue (hub layout)"
    assert (rows["hibou_b"]["weights"], rows["hibou_b"]["found_in"]) == (str(hub / "model.safetensors"), "weights.json")
    assert sum(r["weights"] is not None for r in rows.values()) == 3
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert f"{site / 'uni_v1' / 'pytorch_model.bin'} (catalogue)" in out and f"${ENV_VAR} {site}" in out
    assert main(["encoders", "--weights-dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_listing_imports_no_torch(tmp_path):
    code = ("import json, sys\nfrom wsi_fl.cli.main import main\nmain(['encoders', '--json'])\n"
            "print(json.dumps(sorted(m for m in ('torch', 'timm', 'transformers', 'numpy') if m in sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == []
    assert len(json.loads("\n".join(run.stdout.splitlines()[:-1]))) == len(list_cards())


def _args(*extra: str):
    return build_parser().parse_args(["preprocess", "--slides", "s.svs", "--out", "o", *extra])


def test_preprocess_takes_tile_size_and_resolution_from_the_card(tmp_path):
    assert _card_tiling(_args("--encoder", "uni_v1")) == {"target_mpp": 0.5, "tile_size": 256}
    assert _card_tiling(_args("--encoder", "conch_v15")) == {"target_mpp": 0.5, "tile_size": 512}
    assert _card_tiling(_args("--encoder", "uni_v1", "--tile-size", "224", "--target-mpp", "1.0")) == {
        "target_mpp": 1.0, "tile_size": 224}
    assert _card_tiling(_args()) == {"target_mpp": 0.5, "tile_size": 224}  # resnet50_trunc's card
    assert _card_tiling(_args("--encoder", str(tmp_path / "model.pt2"))) == {"target_mpp": 0.5, "tile_size": 224}
    assert _args("--weights-dir", str(tmp_path)).weights_dir == tmp_path


def test_preprocess_records_the_card_and_uses_its_tile_size(slide_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["preprocess", "--slides", str(slide_file("cmu-1-small-region.svs")), "--out", str(out),
                 "--encoder", "kaiko-vits16", "--random-init", "--target-mpp", "1.0", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr()
    with h5py.File(out / "features" / "cmu-1-small-region.h5") as f:
        attrs, shape = dict(f.attrs), f["features"].shape
    assert (attrs["encoder"], attrs["weights"], attrs["precision"]) == ("kaiko-vits16", "random-init", "fp32")
    assert attrs["tile_size"] == 256 and attrs["target_mpp"] == 1.0  # the card's tile size, the given µm/px
    assert json.loads(attrs["transform"]) == {"resize": 224, "interpolation": "bilinear", "antialias": True,
                                              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert shape[0] > 0 and shape[1] == 384


@pytest.mark.slow
def test_preprocess_uni_v1_with_a_full_release_file_on_a_real_slide(slide_file, tmp_path, capsys):
    """The issue's "done when": ``wsi-fl preprocess --encoder uni_v1 --weights .../pytorch_model.bin`` on a real
    slide. The release file is made here (a random ViT-L/16 in UNI's layout, 1.2 GB): the real one is gated."""
    import torch

    from preprocessing.foundation import build_network
    from preprocessing.weights import file_fingerprint

    card = get_card("uni_v1")
    torch.manual_seed(0)
    weights = tmp_path / "UNI" / "pytorch_model.bin"
    weights.parent.mkdir()
    torch.save(build_network(card).trunk.state_dict(), weights)
    start = time.perf_counter()
    code = main(["preprocess", "--slides", str(slide_file("cmu-1-small-region.svs")), "--out", str(tmp_path / "out"),
                 "--encoder", "uni_v1", "--weights", str(weights), "--target-mpp", "2.0", "--quiet",
                 "--device", "cpu"])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    print(f"{out.strip()} in {seconds:.0f} s")
    assert code == 0, out
    with h5py.File(tmp_path / "out" / "features" / "cmu-1-small-region.h5") as f:
        attrs, n = dict(f.attrs), f["features"].shape
    assert attrs["encoder"] == "uni_v1" and attrs["weights"] == file_fingerprint(weights)
    assert attrs["precision"] == "fp32" and attrs["tile_size"] == 256 and attrs["feature_dim"] == 1024
    assert json.loads(attrs["transform"])["resize"] == 224
    assert n[0] > 0 and n[1] == 1024
