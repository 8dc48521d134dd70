"""Flower's deployment engine rehearsed on this machine: one SuperLink, one SuperNode per site, ``flwr run``
(``wsi-fl rehearse``).

The simulation engine (:mod:`wsi_fl.engines.simulation`) runs every ClientApp
inside one process it controls. A hospital deployment does not: the
SuperLink, each site's SuperNode, and the ServerApp and ClientApps they launch
are separate processes that talk over the network, the app arrives as a FAB
built from ``pyproject.toml``, each site finds its data only through its
SuperNode's node config, and the run config is parsed from ``flwr run
--run-config``. :func:`rehearse` does exactly that on loopback, so that what
breaks in deployment (the FAB, imports in the app subprocesses, node config,
run config types) breaks here first, and a test can check it.

Every process gets a run-local ``FLWR_HOME`` (with the ``config.toml`` that
``flwr`` reads its SuperLink connection from) and Flower's offline settings
(:data:`wsi_fl.engines.simulation.OFFLINE_ENV`); ports are free loopback
ports, so rehearsals can run in parallel. ``flwr run --stream`` exits 0 even
when the run failed, so the verdict comes from ``flwr list --format json``.
Every process started is stopped again by its PID (terminate, wait, kill),
also on errors, Ctrl-C and SIGTERM (:mod:`wsi_fl.engines._processes`).

**TLS and SuperNode authentication are on by default**, as across a hospital
network: a CA and a server certificate for ``localhost``/``127.0.0.1`` in
``WORKDIR/tls`` (:mod:`wsi_fl.deploy.certs`; ``wsi-fl certs`` writes the same
for real hosts), the SuperLink serving HTTPS with ``--enable-supernode-auth``,
and one EC key pair per site, registered with ``flwr supernode register``
once the SuperLink is up. ``unregistered_site`` also starts an impostor
SuperNode with a key never registered, which the SuperLink must refuse (it
stops with status 1, logging Flower's exit code 305 and ``[code: 2004] Failed
to activate SuperNode``). Each SuperNode's own Runtime API for its ClientApps
stays plain HTTP on 127.0.0.1, inside the site's machine. ``insecure=True``
runs the old way, plain HTTP without authentication: loopback only.

This module imports the site's and server's code only when a rehearsal runs,
so ``wsi-fl rehearse --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from wsi_fl.engines._flower import (
    CONNECTION,
    executable,
    flower_env,
    register_supernode,
    run_flwr,
    run_status,
    started_run,
    write_flwr_config,
)
from wsi_fl.engines._processes import HOST, LocalFederationError, Processes, free_port, tail, wait_for_port
from wsi_fl.engines._sites import (
    CHECKOUT,
    SERVER_APP,
    approve_apps,
    approved_hashes,
    find_app,
    genuine_release,
    is_app,
    node_config,
    site_policy,
    toml_string,
)

if TYPE_CHECKING:
    from wsi_fl.deploy.certs import NodeKeyPair

__all__ = ["CHECKOUT", "SERVER_APP", "LocalFederationError", "build_run_config", "failure_logs", "find_app", "is_app",
           "node_config", "read_metrics", "rehearse", "site_policy", "summary", "toml_string"]

UNREGISTERED = "unregistered-"  # prefix of the process name of a SuperNode whose key was never registered
#: How Flower 1.41 reports a SuperNode the SuperLink does not know (exit code 305, API error 2004).
REFUSED_MARKERS = ("Exit Code: 305", "[code: 2004] Failed to activate SuperNode")
INSECURE_WARNING = ("WARNING: insecure local federation (plain HTTP, no TLS, no SuperNode authentication) "
                    f"on {HOST} only; never use these settings across a network.")
#: Run-config keys set by the rehearsal's own options (a passthrough run config may not set them as well).
OWN_KEYS = ("num-server-rounds", "out-dir", "seed")


def build_run_config(rounds: int, out: Path, seed: int, n_sites: int, extra: str | None) -> dict[str, Any]:
    """The run config overrides: ours, and ``min-available-nodes`` = all sites unless ``extra`` sets it.

    ``extra`` is parsed as ``flwr run --run-config`` parses it (``"key=value ..."`` or a ``.toml`` file) and
    checked with :class:`~wsi_fl.federation.config.FedConfig`, so a typo fails before any process starts.
    """
    import click
    from flwr.common.config import parse_config_args

    from wsi_fl.federation.config import FedConfig

    try:
        passed = parse_config_args([extra]) if extra else {}
    except (click.ClickException, OSError) as err:
        raise ValueError(f"--run-config {extra!r}: {err}") from err
    if extra and not passed:
        raise ValueError(f"--run-config {extra!r} holds no key=value pair")
    clash = sorted(set(passed) & set(OWN_KEYS))
    if clash:
        raise ValueError(f"set {', '.join(clash)} with --rounds/--out/--seed, not in --run-config")
    config = {"min-available-nodes": n_sites, **passed, "num-server-rounds": rounds, "out-dir": str(out),
              "seed": seed}
    FedConfig.from_run_config(config)
    return config


def refusal(procs: Processes, name: str, timeout: float) -> dict[str, Any]:
    """Wait up to ``timeout`` s for SuperNode ``name`` to end; whether it ended as one the SuperLink refused.

    Flower 1.41's SuperNode with an unregistered key ends with exit status 1 after logging ``Exit Code: 305``
    and ``[code: 2004] Failed to activate SuperNode`` (the SuperLink answers its ActivateNode with HTTP 412).
    """
    proc, log = procs.started[name], procs.logs / f"{name}.log"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        procs.check_alive()
        time.sleep(0.2)
    code = proc.poll()
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = [marker for marker in REFUSED_MARKERS if marker in text]
    return {"refused": code not in (None, 0) and len(found) == len(REFUSED_MARKERS), "exit_code": code,
            "reason": " / ".join(found) or ("still running" if code is None else f"exited with {code}")}


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The rounds in ``out/metrics.jsonl`` so far (a last line still being written, without its newline, not yet)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def rehearse(cohort: str | Path, out: str | Path, rounds: int, *, seed: int = 0, run_config: str | None = None,
             workdir: str | Path | None = None, app: str | Path | None = None, timeout: float = 1800.0,
             startup_timeout: float = 60.0, kill_site: str | None = None, kill_after_round: int = 1,
             insecure: bool = False, unregistered_site: str | None = None, policy: str | Path | None = None,
             site_image: str | None = None, server_image: str | None = None,
             approve: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Start a SuperLink and one SuperNode per site of ``cohort``, run ``app`` for ``rounds`` rounds, stop them.

    ``run_config`` (``"key=value ..."``, as for ``flwr run --run-config``) is merged with ``rounds``, ``out`` and
    ``seed``; ``app`` is the Flower app directory the FAB is built from (checked, or found: :func:`find_app`);
    ``timeout`` bounds the run in seconds.
    ``kill_site`` names a site whose SuperNode (with its app processes) is killed with SIGKILL once
    ``kill_after_round`` rounds are in ``out/metrics.jsonl``: a rehearsal of a hospital dropping out mid-run,
    which the run must survive when ``min-train-nodes`` still holds (its ``round-timeout`` bounds the wait).

    By default every connection is TLS (a CA and server certificate written to ``workdir/tls``) and the
    SuperLink admits only the SuperNodes whose public keys were registered (one key pair per site in
    ``workdir/tls/supernodes``); ``insecure=True`` runs plain HTTP without SuperNode authentication.
    ``unregistered_site`` names a site for which one more SuperNode is started with a key that was never
    registered; the SuperLink must refuse it (``result["unregistered"]["refused"]``).

    Every SuperNode's node config names the SuperLink (``superlink``), a site policy (``policy``: the file
    ``policy``, which must allow this SuperLink, else the rehearsal policy; see :func:`site_policy`) and its audit
    log (``audit-log``: ``workdir/sites/SITE/audit.jsonl``; ``result["audit_logs"]``).

    **Each site runs only what it approved**: its SuperNode starts with ``--isolation process`` and a
    ``wsi-fl site-runner`` (``runner-SITE``) runs its tasks, hashing each task's app bundle and running the
    site-installed ClientApp only for a release its policy lists under ``approved-apps``
    (:mod:`wsi_fl.site.runner`). The sites approve ``approve`` (app directories or ``sha256:`` hashes; default:
    the genuine app, :func:`find_app` without ``app``), unless the ``policy`` file lists releases itself; so an
    ``app`` other than the genuine one is refused at every site (``result["app_hash"]`` is the hash of the bundle
    shipped, ``result["approved"]`` what the sites approved) and the run fails.

    ``site_image`` / ``server_image`` run the SuperNodes / the SuperLink in those images (the Dockerfile's
    ``site`` and ``server`` targets) instead of this environment, with ``podman`` (or
    ``$WSI_FL_CONTAINER_ENGINE``) on the host network; each container sees only its own files
    (:mod:`wsi_fl.deploy.containers`): a site its features, labels, policy, CA certificate and private key read-only
    and its audit-log directory writable; the SuperLink its certificate files and ``out``.

    Returns ``ok`` (the run finished completed, ``out/metrics.jsonl`` has ``rounds`` rounds, and an
    ``unregistered_site``'s SuperNode was refused), ``status`` and
    ``run`` (the run's ``flwr list`` entry), ``rounds_completed``, ``test_auc`` (last round), ``pids`` (every
    process started here, all stopped on return), ``killed`` (``{site: round}``, or empty), ``seconds`` (the
    ``flwr run`` wall time), ``out``, ``workdir``, ``logs``, ``tls`` and ``auth`` (both ``not insecure``),
    ``nodes`` (``{site: node id}`` of the registered SuperNodes; empty when insecure), ``containers``
    (``{process: container name}``, empty without images) and ``unregistered``
    (None, or ``site``, ``refused``, ``exit_code`` and ``reason``: the log lines that show the refusal). Raises
    :class:`LocalFederationError` when a process dies, ``flwr run`` fails or the timeout passes.
    """
    from wsi_fl.site.data import discover_cohort
    from wsi_fl.site.policy import load_policy

    sites = discover_cohort(cohort)
    if kill_site is not None and kill_site not in {s.name for s in sites}:
        raise ValueError(f"--kill-site {kill_site!r}: not a site of {cohort} ({', '.join(s.name for s in sites)})")
    if unregistered_site is not None and unregistered_site not in {s.name for s in sites}:
        raise ValueError(f"--unregistered-site {unregistered_site!r}: not a site of {cohort} "
                         f"({', '.join(s.name for s in sites)})")
    if unregistered_site is not None and insecure:
        raise ValueError("--unregistered-site needs SuperNode authentication, which --insecure turns off")
    app = find_app(app)
    approve = genuine_release(approve)
    out = Path(out).resolve()
    config = build_run_config(rounds, out, seed, len(sites), run_config)
    impostor = UNREGISTERED + unregistered_site if unregistered_site is not None else None
    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="wsi-fl-federation-"))
    logs, flwr_home = work / "logs", work / "flwr-home"
    logs.mkdir(parents=True, exist_ok=True)
    (work / "run-config.toml").write_text(tomli_w.dumps(config))
    link_port = free_port()
    # Containers see the policy file through a bind mount of that file, which an atomic replace later would not
    # reach (the mount keeps the old inode): there, the sites approve before they start.
    early = approved_hashes(approve) if site_image or server_image else ()
    policy_file = approve_apps(site_policy(policy, f"{HOST}:{link_port}", work), early, work)
    audit_logs = {s.name: str(work / "sites" / s.name / "audit.jsonl") for s in sites}
    node_configs = {s.name: node_config(s.features_dir, s.labels, s.name, superlink=f"{HOST}:{link_port}",
                                        policy=str(policy_file), audit_log=audit_logs[s.name]) for s in sites}
    # The SuperNodes to start: process name -> (site, TLS and authentication arguments).
    supernodes: dict[str, tuple[str, list[str]]] = {f"supernode-{site}": (site, ["--insecure"])
                                                    for site in node_configs}
    link_tls: list[str] = ["--insecure"]
    keys: dict[str, NodeKeyPair] = {}  # each site's authentication key pair, registered with the SuperLink
    link_files: list[Path] = []  # what the SuperLink reads: its certificate and key, the CA
    node_files: dict[str, list[Path]] = {name: [] for name in supernodes}  # what each SuperNode reads
    private_keys: list[Path] = []  # of the files above, those only their owner may read (mode 0600)
    if insecure:
        write_flwr_config(flwr_home, link_port)
        print(INSECURE_WARNING, file=sys.stderr)
    else:
        from wsi_fl.deploy.certs import write_supernode_keys, write_tls_certificates

        tls = write_tls_certificates(work / "tls", ["localhost", HOST], overwrite=True)
        write_flwr_config(flwr_home, link_port, tls.ca_cert)
        link_tls = ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                    "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]
        keys = write_supernode_keys(work / "tls" / "supernodes", list(node_configs), overwrite=True)
        private = {f"supernode-{site}": pair.private_key for site, pair in keys.items()}
        if impostor is not None and unregistered_site is not None:  # a fresh key pair nobody registers
            pairs = write_supernode_keys(work / "tls" / "unregistered", [unregistered_site], overwrite=True)
            private[impostor] = pairs[unregistered_site].private_key
            supernodes[impostor] = (unregistered_site, [])
        supernodes = {name: (site, ["--root-certificates", str(tls.ca_cert),
                                    "--auth-supernode-private-key", str(private[name])])
                      for name, (site, _) in supernodes.items()}
        link_files = [tls.ca_cert, tls.server_cert, tls.server_key]
        node_files = {name: [tls.ca_cert, private[name]] for name in supernodes}
        private_keys = [tls.server_key, *private.values()]
    from wsi_fl.deploy import containers

    engine = containers.container_engine() if site_image or server_image else "podman"
    procs = Processes(logs, flower_env(flwr_home), engine)
    by_name = {s.name: s for s in sites}
    if site_image or server_image:
        containers.grant(readable=private_keys, writable=[out, *(Path(audit_logs[site]).parent for site in by_name)])

    def command(name: str, program: str, args: list[str], image: str | None,
                mounts: list[containers.Mount]) -> tuple[list[str], str | None]:
        """``program args`` here, or in a container of ``image`` that sees only ``mounts``."""
        if image is None:
            return [executable(program, procs.env), *args], None
        container = f"wsi-fl-{name}-{link_port}"
        return containers.run_argv(container, image, [program, *args], mounts, engine=engine,
                                   env={"OMP_NUM_THREADS": procs.env["OMP_NUM_THREADS"]}), container
    nodes: dict[str, int] = {}
    unregistered: dict[str, Any] | None = None
    try:
        procs.start("superlink", *command(
            "superlink", "flower-superlink", [*link_tls, "--host", HOST, "--port", str(link_port),
                                              "--disable-runtime-dependency-installation"],
            server_image, [containers.Mount(f) for f in link_files] + [containers.Mount(out, writable=True)]))
        wait_for_port(link_port, procs, startup_timeout)
        for site, pair in keys.items():
            nodes[site] = register_supernode(procs.env, pair.public_key, site)
        if impostor is not None:
            procs.may_exit.add(impostor)  # the SuperLink should refuse it, and then it ends
        for name, (site, security_args) in supernodes.items():
            mounts = [*(containers.Mount(p) for p in (by_name[site].features_dir, by_name[site].labels, policy_file,
                                                      *node_files[name])),
                      containers.Mount(Path(audit_logs[site]).parent, writable=True)]
            runtime = f"{HOST}:{free_port()}"  # the SuperNode's Runtime API, which its site's runner polls
            procs.start(name, *command(  # --isolation process: no flower-superexec, the site's runner instead
                name, "flower-supernode", [*security_args, "--superlink", f"{HOST}:{link_port}", "--host", HOST,
                                           "--port", runtime.rsplit(":", 1)[1], "--isolation", "process",
                                           "--node-config", node_configs[site]], site_image, mounts))
            if name != impostor:  # refused by the SuperLink: it gets no task
                procs.start(f"runner-{site}", *command(f"runner-{site}", "wsi-fl", [
                    "site-runner", "--runtime-api", runtime], site_image, mounts))
        security = "insecure" if insecure else f"TLS, {len(nodes)} registered SuperNode keys"
        print(f"federation up ({security}): SuperLink {HOST}:{link_port}, {len(sites)} SuperNodes, logs in {logs}",
              file=sys.stderr)
        killed: dict[str, int] = {}

        def maybe_kill() -> None:
            if kill_site is not None and not killed and len(read_metrics(out)) >= kill_after_round:
                procs.kill(f"supernode-{kill_site}")
                procs.kill(f"runner-{kill_site}")
                killed[kill_site] = len(read_metrics(out))
                print(f"killed the SuperNode of {kill_site} after round {killed[kill_site]}", file=sys.stderr)

        # Approved as late as possible (hashed just before flwr run builds its bundle): the runners read the policy
        # for every task, and a source tree edited meanwhile would be refused, rightly but confusingly.
        approved, shipped = approved_hashes(approve), approved_hashes([app])[0]
        approve_apps(policy_file, approved, work)
        start = time.monotonic()
        code, output = run_flwr(["run", str(Path(app).resolve()), CONNECTION, "--run-config",
                                 str(work / "run-config.toml"), "--stream"], procs, logs / "flwr-run.log", timeout,
                                on_poll=maybe_kill)
        seconds = time.monotonic() - start
        run_id = started_run(output)
        if code != 0 or run_id is None:
            raise LocalFederationError(f"flwr run failed (exit {code})\n{tail(logs / 'flwr-run.log')}")
        run = run_status(procs.env, run_id)
        if impostor is not None and unregistered_site is not None:  # it was refused long ago, or runs still
            unregistered = {"site": unregistered_site, **refusal(procs, impostor, startup_timeout)}
            print(f"unregistered SuperNode for {unregistered_site}: "
                  f"{'refused' if unregistered['refused'] else 'NOT refused'} ({unregistered['reason']})",
                  file=sys.stderr)
    except LocalFederationError as err:
        err.pids = procs.pids
        raise
    finally:  # also on Ctrl-C, and on SIGTERM (``wsi-fl`` turns it into KeyboardInterrupt)
        procs.stop_all()
    (work / "run-status.json").write_text(json.dumps(run, indent=2) + "\n")
    history = read_metrics(out)
    refused = unregistered is None or unregistered["refused"]
    return {"ok": run["status"] == "finished:completed" and len(history) == rounds and refused,
            "status": run["status"],
            "run": run, "rounds": rounds, "rounds_completed": len(history),
            "test_auc": history[-1].get("test-auc") if history else None, "pids": procs.pids, "killed": killed,
            "seconds": round(seconds, 1), "out": str(out),
            "workdir": str(work), "logs": str(logs), "tls": not insecure, "auth": not insecure, "nodes": nodes,
            "unregistered": unregistered, "policy": str(policy_file), "audit_logs": audit_logs,
            "approved": list(load_policy(policy_file).approved_apps), "app_hash": shipped,
            "containers": dict(procs.containers)}


def summary(result: Mapping[str, Any]) -> str:
    """The verdict in one line (``OK: status finished:completed, rounds 2/2, ...``), the last line printed."""
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    details = result["run"].get("status-details", "N/A")
    return (f"{'OK' if result['ok'] else 'FAILED'}: status {result['status']}, rounds {result['rounds_completed']}"
            f"/{result['rounds']}, last test-auc {auc}, out {result['out']}"
            + "".join(f", {site} killed after round {r}" for site, r in result.get("killed", {}).items())
            + ("" if not result.get("unregistered") else
               f", unregistered SuperNode for {result['unregistered']['site']} "
               + ("refused" if result["unregistered"]["refused"] else "NOT refused"))
            + (", TLS and SuperNode authentication" if result.get("tls") else ", insecure")
            + ("" if result["ok"] or details == "N/A" else f" ({details})"))


def failure_logs(result: Mapping[str, Any]) -> str:
    """The tails of every log of a rehearsal that did not end ``ok``: ``flwr run``, SuperLink, SuperNodes."""
    logs = Path(result["logs"])
    return "\n".join(tail(p) for p in [logs / "flwr-run.log", *sorted(logs.glob("super*.log")),
                                       *sorted(logs.glob("runner-*.log")), *sorted(logs.glob(f"{UNREGISTERED}*.log"))])
