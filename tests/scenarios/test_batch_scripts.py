"""The cluster batch kit: scripts/slurm/preprocess_array.sbatch and scripts/k8s/*.yaml, run for real.

Each sharded run (the SLURM script executed with bash once per array task, as
SLURM would; the Kubernetes Job's container command run once per completion
index) is merged and compared with one unsharded ``wsi-fl preprocess`` over
the same shared real slides: same manifest rows, and bit-identical feature
files apart from their ``created`` attribute.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from preprocessing.h5format import read_features
from preprocessing.pipeline import merge_manifests
from wsi_fl.cli import main

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "scripts" / "slurm" / "preprocess_array.sbatch"
K8S_JOB = ROOT / "scripts" / "k8s" / "preprocess-job.yaml"
K8S_MERGE = ROOT / "scripts" / "k8s" / "merge-manifests-job.yaml"
ENCODER = ["--encoder", "resnet18_trunc", "--random-init"]  # the fast options of test_pipeline.py
SHARD_ENV = ("SLURM_", "JOB_COMPLETION_INDEX", "WSI_FL_")


def _manifest(path: Path) -> dict[str, dict[str, str]]:
    """Rows by slide id, without the timing column."""
    with path.open() as f:
        return {row["slide_id"]: {k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(SHARD_ENV)}


def _wsi_fl_bin() -> str:
    exe = Path(sys.executable).with_name("wsi-fl")
    return str(exe) if exe.exists() else f"{sys.executable} -m wsi_fl"


@pytest.fixture(scope="module")
def reference(testdata, tmp_path_factory) -> Path:
    """One unsharded run over every shared slide (some fail, some have no tiles, one has tiles)."""
    out = tmp_path_factory.mktemp("unsharded")
    assert main(["preprocess", "--slides", str(testdata / "slides"), "--out", str(out), *ENCODER, "--quiet"]) == 1
    return out


def _assert_same_as(reference: Path, out: Path) -> None:
    expected = _manifest(reference / "manifest.csv")
    assert _manifest(out / "manifest.csv") == expected
    assert {r["status"] for r in expected.values()} == {"ok", "empty", "failed"}
    made = sorted(p.name for p in (reference / "features").glob("*.h5"))
    assert made == sorted(p.name for p in (out / "features").glob("*.h5"))
    qc = [sorted(p.name for p in (d / "qc").glob("*.png")) for d in (reference, out)]
    assert qc[0] == qc[1]
    tiles = 0
    for name in made:
        feats, coords, attrs = read_features(reference / "features" / name)
        feats2, coords2, attrs2 = read_features(out / "features" / name)
        # Bit-identical: each slide is encoded alone in the same batches whatever the shard, and on this
        # project's CPUs torch gives the same floats with 1 thread (a pinned task) as with 2 (the reference).
        assert np.array_equal(coords, coords2) and np.array_equal(feats, feats2), name
        attrs.pop("created"), attrs2.pop("created")
        assert attrs == attrs2, name
        tiles += len(feats)
    assert tiles > 20  # the comparison covered real features


# -- SLURM --------------------------------------------------------------------------------------------------


def _sbatch(env: dict[str, str], *args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = ["bash", str(SBATCH), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_slurm_array_then_merge_equals_unsharded_run(reference, testdata, tmp_path):
    n = 2
    out = tmp_path / "out"
    site = {**_clean_env(), "WSI_FL_SLIDES": str(testdata / "slides"), "WSI_FL_OUT": str(out),
            "WSI_FL_BIN": _wsi_fl_bin(), "WSI_FL_ENCODER": "resnet18_trunc", "WSI_FL_EXTRA_ARGS": "--random-init"}
    # the array's tasks, started together as SLURM would (ids 3 and 5 of an array submitted as --array=3-5:2):
    # wsi-fl finds its shard itself, (id - min) / step, and sizes its threads to the task's one CPU
    tasks = [_sbatch({**site, "SLURM_ARRAY_TASK_ID": str(3 + 2 * i), "SLURM_ARRAY_TASK_MIN": "3",
                      "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": str(n), "SLURM_CPUS_PER_TASK": "1"},
                     wait=False) for i in range(n)]
    logs = [t.communicate(timeout=300)[0] for t in tasks]
    for i, (task, log) in enumerate(zip(tasks, logs, strict=True)):
        assert task.returncode == 1, log  # every shard has a failing slide: wsi-fl's exit code comes through
        assert "--shard auto" in log and (out / f"manifest.shard-{i}-of-{n}.csv").exists(), log
    assert not (out / "manifest.csv").exists()
    # the merge step (`... preprocess_array.sbatch merge`): the script's command, run in this process to save a
    # second start of wsi-fl (exit codes coming through the script is checked above)
    merge = _sbatch({**site, "WSI_FL_BIN": "printf %s\\n"}, "merge")
    assert merge.returncode == 0, merge.stderr
    argv = merge.stdout.splitlines()
    assert argv[0] == "preprocess" and "--merge-manifests" in argv
    assert main(argv) == 1  # merged; some slides failed
    _assert_same_as(reference, out)


def test_slurm_script_settings_and_refusals(tmp_path):
    env = _clean_env()
    r = _sbatch(env)
    assert r.returncode == 2 and "set WSI_FL_SLIDES" in r.stderr and len(r.stderr.splitlines()) == 1
    env |= {"WSI_FL_SLIDES": str(tmp_path), "WSI_FL_OUT": str(tmp_path / "out"), "WSI_FL_BIN": "false"}
    r = _sbatch(env)
    assert r.returncode == 2 and "not a job-array task" in r.stderr
    r = _sbatch(env | {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert r.returncode == 1  # the command's own exit code (here `false`) is the script's
    # no shard arithmetic, no pinning, no thread variables: wsi-fl reads SLURM's variables itself
    r = _sbatch(env | {"WSI_FL_BIN": "printf %s\\n", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
                       "SLURM_ARRAY_TASK_STEP": "2", "SLURM_CPUS_PER_TASK": "8"})
    assert r.returncode == 0 and r.stdout.startswith("preprocess\n") and "--shard\nauto\n" in r.stdout
    assert "taskset" not in r.stdout and "--threads" not in r.stdout
    # a resubmitted task (sbatch --array=5) refuses rather than take itself for the whole batch; the real wsi-fl
    env |= {"WSI_FL_BIN": _wsi_fl_bin(), "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "5",
            "SLURM_ARRAY_TASK_COUNT": "1"}
    r = _sbatch(env)
    assert r.returncode == 2 and "array of one task: to redo one shard of an earlier array, set WSI_FL_SHARD_COUNT" \
        in r.stderr, r.stderr


# -- Kubernetes ---------------------------------------------------------------------------------------------


def _container(job: dict) -> tuple[dict, dict[str, str], dict[str, str]]:
    """The Job's only container, its env, and its mount paths by volume name."""
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert container["image"] == "localhost/wsi-fl-site:latest" and container["command"][0] == "wsi-fl"
    sec = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    assert sec["allowPrivilegeEscalation"] is False and sec["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[next(n for n, m in mounts.items() if m["mountPath"] == "/tmp")]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    argv = container["command"] + container["args"]
    slides_mount = next(m for m in mounts.values() if m["mountPath"] == argv[argv.index("--slides") + 1])
    assert slides_mount.get("readOnly") is True
    assert volumes[slides_mount["name"]]["persistentVolumeClaim"].get("readOnly") is True
    out_mount = next(m for m in mounts.values() if m["mountPath"] == argv[argv.index("--out") + 1])
    assert not out_mount.get("readOnly")
    return container, env, {m["mountPath"]: name for name, m in mounts.items()}


def _map(value: str, paths: dict[str, Path]) -> str:
    """A container path under one of the mount paths -> the same path under its local directory."""
    for mount, path in paths.items():
        if value == mount or value.startswith(mount + "/"):
            return str(path) + value[len(mount):]
    return value


def _local_argv(container: dict, paths: dict[str, Path]) -> list[str]:
    """command + args with the volumes' mount paths replaced by local directories; encoder options -> the fast ones."""
    argv = container["command"] + container["args"]
    assert argv[:2] == ["wsi-fl", "preprocess"]
    local: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip or arg in ("--encoder", "--weights"):
            skip = not skip
            continue
        local.append(_map(arg, paths))
    return local + (ENCODER if "--shard" in local else [])


def test_k8s_indexed_job_then_merge_equals_unsharded_run(reference, testdata, tmp_path, monkeypatch):
    job = yaml.safe_load(K8S_JOB.read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    n = spec["completions"]
    assert n >= 2 and spec["parallelism"] == n
    container, env, mounts = _container(job)
    assert env["WSI_FL_SHARD_COUNT"] == str(n)
    for rule in spec.get("podFailurePolicy", {}).get("rules", []):
        assert rule.get("onExitCodes", {}).get("containerName", container["name"]) == container["name"]
    argv = container["command"] + container["args"]
    assert argv[argv.index("--shard") + 1] == "auto"
    out = tmp_path / "out"
    paths = {mount: {"slides": testdata / "slides", "out": out}.get(name, tmp_path / name)
             for mount, name in mounts.items()}
    local = _local_argv(container, paths)
    for k in os.environ:
        if k.startswith(SHARD_ENV):
            monkeypatch.delenv(k)
    for k, v in env.items():  # HOME=/tmp etc.: mount paths mapped like the arguments
        monkeypatch.setenv(k, _map(v, paths))
    for index in range(n):  # what each pod runs: the container's command, JOB_COMPLETION_INDEX set by Kubernetes
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        assert main(local) in (0, 1)
        assert (out / f"manifest.shard-{index}-of-{n}.csv").exists()
    monkeypatch.delenv("JOB_COMPLETION_INDEX")

    merge_job = yaml.safe_load(K8S_MERGE.read_text())
    assert merge_job["kind"] == "Job" and merge_job["spec"].get("completionMode", "NonIndexed") == "NonIndexed"
    merge_container, _, merge_mounts = _container(merge_job)
    assert {p for p, name in merge_mounts.items() if name in ("slides", "out")} == {
        p for p, name in mounts.items() if name in ("slides", "out")}  # same volumes at the same paths
    assert main(_local_argv(merge_container, paths)) == 1  # merged; some slides failed
    _assert_same_as(reference, out)


# -- merge errors ---------------------------------------------------------------------------------------------


def _fake_shards(out: Path, n: int, ids: list[str], only: list[int] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n) if only is None else only:
        rows = "".join(f"{s},ok,3,1.00,,/slides/{s}.svs\n" for s in sorted(ids)[i::n])
        (out / f"manifest.shard-{i}-of-{n}.csv").write_text("slide_id,status,n_tiles,seconds,error,source\n" + rows)


@pytest.mark.parametrize(("case", "message"), [
    ("none", "no shard manifests"),
    ("missing", "2 of 3 shard manifests"),
    ("mixed", "different shard counts"),
    ("unfinished", "1 slide(s) with no row (e)"),
])
def test_merge_refuses_with_one_line_error(tmp_path, capsys, case, message):
    ids = ["a", "b", "c", "d", "e"]
    out = tmp_path / "out"
    slides = [str(tmp_path / f"{s}.svs") for s in ids]  # only the names matter to the merge
    if case == "missing":
        _fake_shards(out, 3, ids, only=[0, 2])
    elif case == "mixed":
        _fake_shards(out, 3, ids)
        _fake_shards(out, 2, ids, only=[1])
    elif case == "unfinished":
        _fake_shards(out, 2, ids[:-1])
    out.mkdir(exist_ok=True)
    assert main(["preprocess", "--slides", *slides, "--out", str(out), "--merge-manifests"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "manifest.csv").exists()


def test_merge_api_and_cli_options(tmp_path, capsys):
    ids = ["a", "b", "c", "d", "e"]
    _fake_shards(tmp_path, 2, ids)
    path = merge_manifests(tmp_path)  # no slide list: no completeness check
    assert list(_manifest(path)) == ids
    slides = [str(tmp_path / f"{s}.svs") for s in ids]
    assert main(["preprocess", "--slides", *slides, "--out", str(tmp_path), "--merge-manifests"]) == 0
    assert main(["preprocess", "--slides", *slides, "--out", str(tmp_path), "--merge-manifests", "--shard", "0/2"]) == 2
    assert "leave out --shard" in capsys.readouterr().err
