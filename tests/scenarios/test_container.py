"""The container images, built here offline (no Docker daemon, no registry) and run for real.

``scripts/build_image.sh`` makes a Debian base with debootstrap, then builds the Dockerfile's ``site`` and
``server`` targets with buildah. A site container preprocesses a real shared slide that it sees read-only and
gives the features this environment gives; SuperNode containers join a SuperLink container over TLS with
SuperNode authentication and complete a round; a whole ``wsi-fl rehearse`` runs inside one site container.
Needs root and Debian's podman, buildah and debootstrap (``.ci/run`` installs them); elsewhere these tests
skip, under ``CI=true`` they fail.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bagsites import make_cohort, make_site

from models.checkpoint import load_checkpoint
from preprocessing.h5format import check_feature_file, read_features
from wsi_fl.deploy.containers import IMAGE_UID, Mount, grant, run_argv
from wsi_fl.engines import deployment
from wsi_fl.engines._processes import tail

pytestmark = [pytest.mark.slow, pytest.mark.container]

ROOT = Path(__file__).resolve().parents[2]
TAG = "test"
IMAGES = {"site": f"localhost/wsi-fl-site:{TAG}", "server": f"localhost/wsi-fl-server:{TAG}"}
SLIDE = "cmu-1-small-region.svs"
PREPROCESS = ["--encoder", "resnet18_trunc", "--random-init", "--device", "cpu"]


def _require_tools() -> None:
    missing = [tool for tool in ("podman", "buildah", "debootstrap") if shutil.which(tool) is None]
    problem = (f"{', '.join(missing)} not installed (apt-get install podman buildah debootstrap)" if missing
               else "building images needs root (debootstrap, rootful podman)" if os.geteuid() != 0 else None)
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Both images, built by the script the runbook gives (layers are cached: a rebuild takes seconds)."""
    _require_tools()
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_image.sh"), "--tag", TAG], capture_output=True,
                         text=True, timeout=2400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    for image in IMAGES.values():
        assert subprocess.run(["podman", "image", "exists", image]).returncode == 0, image
    return IMAGES


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_images_run_as_non_root_offline(images):
    for image in images.values():
        out = _run(run_argv(f"wsi-fl-test-id-{os.getpid()}", image, ["id", "-u"], [], network="none"))
        assert out.returncode == 0 and out.stdout.strip() == str(IMAGE_UID), out.stderr
    out = _run(run_argv(f"wsi-fl-test-cli-{os.getpid()}", images["site"],
                        ["wsi-fl", "preprocess", "--help"], [], network="none"))
    assert out.returncode == 0 and "--shard" in out.stdout, out.stderr
    for image in images.values():  # what the runbook tells an operator to run is in both images
        for command, option in (("rehearse", "--unregistered-site"), ("certs", "--hosts")):
            out = _run(run_argv(f"wsi-fl-test-{command}-{os.getpid()}", image, ["wsi-fl", command, "--help"], [],
                                network="none"))
            assert out.returncode == 0 and option in out.stdout, (image, command, out.stderr)
    inspect = _run(["podman", "image", "inspect", "--format", "{{.Config.Entrypoint}} {{.Config.Cmd}}",
                    images["server"]])
    assert "flower-superlink" in inspect.stdout and "--enable-supernode-auth" in inspect.stdout, inspect.stdout
    assert "--insecure" not in inspect.stdout  # TLS unless asked otherwise
    inspect = _run(["podman", "image", "inspect", "--format", "{{.Config.Entrypoint}}", images["site"]])
    assert "wsi-fl-site-node" in inspect.stdout, inspect.stdout  # SuperNode --isolation process + the site's runner
    out = _run(run_argv(f"wsi-fl-test-hash-{os.getpid()}", images["site"], ["cat", "/opt/wsi-fl/app.sha256"], [],
                        network="none"))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", out.stdout), out.stdout + out.stderr  # the release it carries


def test_site_container_preprocesses_a_read_only_slide_as_this_environment_does(images, slide_file, tmp_path):
    slide = slide_file(SLIDE)
    in_container, here = tmp_path / "container", tmp_path / "here"
    grant(writable=[in_container])
    argv = ["wsi-fl", "preprocess", "--slides", str(slide), "--out", str(in_container), *PREPROCESS]
    out = _run(run_argv(f"wsi-fl-test-preprocess-{os.getpid()}", images["site"], argv,
                        [Mount(slide.parent), Mount(in_container, writable=True)], network="none"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = list(csv.DictReader((in_container / "manifest.csv").open()))
    assert [(r["slide_id"], r["status"]) for r in rows] == [(slide.stem, "ok")] and int(rows[0]["n_tiles"]) > 0
    h5 = in_container / "features" / f"{slide.stem}.h5"
    check_feature_file(h5)
    assert h5.stat().st_uid == IMAGE_UID  # written by the image's user, not root

    # The same command in this environment gives the same tiles and (same torch, same CPU) the same features.
    assert subprocess.run([sys.executable, "-m", "wsi_fl", "preprocess", "--slides", str(slide), "--out",
                           str(here), *PREPROCESS], capture_output=True, timeout=600).returncode == 0
    (their_feats, their_coords, _), (our_feats, our_coords, _) = (
        read_features(h5), read_features(here / "features" / f"{slide.stem}.h5"))
    np.testing.assert_array_equal(their_coords, our_coords)
    np.testing.assert_allclose(their_feats, our_feats, rtol=1e-4, atol=1e-5)

    # The slide is mounted read-only: the container's user cannot write beside it, even where it could.
    probe = _run(run_argv(f"wsi-fl-test-ro-{os.getpid()}", images["site"],
                          ["touch", str(slide.parent / "probe")], [Mount(slide.parent)], network="none"))
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr
    assert not (slide.parent / "probe").exists()


def test_runbook_container_preprocessing_block(images, slide_file, tmp_path):
    """The runbook's ``podman run ... preprocess`` block as written, over every shared slide, good and broken."""
    import torch
    from test_runbook import manifest, run_block

    from preprocessing.tv import import_torchvision

    slides = slide_file(SLIDE).parent
    weights = tmp_path / "models" / "resnet18-test.pth"
    weights.parent.mkdir()
    torch.manual_seed(0)
    torch.save(import_torchvision().models.resnet18().state_dict(), weights)
    out = tmp_path / "site"
    grant(writable=[out])
    run = run_block("container-preprocess", SLIDES=slides, OUT=out, WEIGHTS=weights, ENCODER="resnet18_trunc",
                    SITE_IMAGE=images["site"], TMP=tmp_path)
    assert run.code == 1, run.out  # the broken slides failed, the batch went on
    rows = manifest(out)
    assert rows[Path(SLIDE).stem]["status"] == "ok" and int(rows[Path(SLIDE).stem]["n_tiles"]) > 0, rows
    # every slide has its status: the broken ones failed, and a slide with no tissue is empty, not ok
    assert {r["status"] for r in rows.values()} == {"ok", "failed", "empty"}, rows
    assert all(r["error"] for r in rows.values() if r["status"] == "empty"), rows  # with its reason
    info = check_feature_file(out / "features" / f"{Path(SLIDE).stem}.h5")
    assert info.attrs["weights"].startswith("sha256:") and info.attrs["encoder"] == "resnet18_trunc"


def test_runbook_container_supernode_block_joins_a_tls_superlink(images, tmp_path):
    """The runbook's ``podman run ... SITE_IMAGE --superlink ...`` block as written: with the site's own key
    (made and registered as the runbook says), the containerised SuperNode is admitted by a SuperLink with TLS
    and SuperNode authentication."""
    from test_runbook import _wait_for, run_block, start_block, stop, tls_superlink

    ca, certs, home = tmp_path / "ca", tmp_path / "certs", tmp_path / "flwr-home"
    assert run_block("make-certs", CA_DIR=ca, SUPERLINK_HOSTS="127.0.0.1", SITES="site_2", TMP=tmp_path).code == 0
    assert run_block("site-key", CERTS=certs, SITE="site_1").code == 0
    shutil.copy(ca / "ca.crt", certs / "ca.crt")
    grant(readable=[certs / "site_1"])  # the runbook: chown 49999:49999 the key (mode 0600)
    make_site(tmp_path / "sites", "site_1", 10, 0)
    policy = tmp_path / "policy.toml"
    policy.write_text('superlink = ["127.0.0.1"]\n')
    node = None
    with tls_superlink(ca, home, tmp_path / "superlink.log") as port:
        try:
            run = run_block("register", PUBKEY=certs / "site_1.pub", SITE="site_1", FLWR_HOME=home)
            assert run.code == 0, run.out
            log = tmp_path / "supernode.log"
            node = start_block("container-supernode", log, OUT=tmp_path / "sites" / "site_1", CERTS=certs,
                               SITE="site_1", POLICY=policy, SUPERLINK=f"127.0.0.1:{port}",
                               SITE_IMAGE=images["site"])

            def connected() -> bool:
                text = log.read_text(errors="replace")
                assert node.poll() is None, text
                return "SuperNode ID:" in text
            _wait_for(connected, 180, "the SuperNode container to connect")
        finally:
            if node is not None:
                stop(node)
            _run(["podman", "rm", "--force", "--time", "5", "wsi-fl-site_1"])
            _run(["podman", "volume", "rm", "--force", "wsi-fl-state"])
    assert "wsi-fl-site_1" not in _run(["podman", "ps", "--all", "--format", "{{.Names}}"]).stdout.split()


def test_supernode_containers_join_a_superlink_container_over_tls(images, tmp_path):
    make_cohort(tmp_path / "cohort")
    out, work = tmp_path / "out", tmp_path / "work"
    result = deployment.rehearse(
        tmp_path / "cohort", out, rounds=1, workdir=work, timeout=900, startup_timeout=180,
        run_config="min-available-nodes=3 min-train-nodes=3 min-evaluate-nodes=3 round-timeout=300.0 "
                   "test-frac=0.3 hidden-dim=32 attn-dim=16",
        site_image=images["site"], server_image=images["server"])
    logs = "\n".join(tail(p) for p in sorted(Path(result["logs"]).glob("*.log")))
    assert result["ok"] and result["status"] == "finished:completed", logs
    assert result["tls"] and result["auth"] and set(result["nodes"]) == {"site_1", "site_2", "site_3"}
    assert set(result["containers"]) == {"superlink", *(f"{kind}-site_{k}" for kind in ("supernode", "runner")
                                                        for k in (1, 2, 3))}  # each site's runner: its own container
    _, ckpt = load_checkpoint(out / "last.pt")  # written by the ServerApp inside the SuperLink's container
    assert ckpt.meta["mode"] == "federated" and ckpt.meta["round"] == 1
    assert (out / "last.pt").stat().st_uid == IMAGE_UID
    for site, log in result["audit_logs"].items():  # each site's audit log, written inside its container
        lines = Path(log).read_text().splitlines()
        assert len(lines) >= 4 and Path(log).stat().st_uid == IMAGE_UID, (site, lines)
    left = _run(["podman", "ps", "--all", "--format", "{{.Names}}"]).stdout.split()
    assert not set(result["containers"].values()) & set(left), left  # every container stopped and removed


def test_a_whole_rehearsal_runs_inside_the_site_image(images, tmp_path):
    """``wsi-fl rehearse`` inside one site container, offline: the image carries the app's sources
    (``$WSI_FL_APP``) that ``flwr run`` ships as the FAB, and every Flower command the rehearsal starts."""
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    make_cohort(cohort)
    grant(writable=[out])
    argv = ["wsi-fl", "rehearse", "--cohort", str(cohort), "--rounds", "1", "--out", str(out), "--timeout", "600",
            "--run-config", "min-available-nodes=3 test-frac=0.3 hidden-dim=32 attn-dim=16"]
    run = _run(run_argv(f"wsi-fl-test-rehearse-{os.getpid()}", images["site"], argv,
                        [Mount(cohort), Mount(out, writable=True)], network="none"), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "OK: status finished:completed, rounds 1/1" in run.stdout, run.stdout
    _, ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.meta["mode"] == "federated" and ckpt.meta["round"] == 1
