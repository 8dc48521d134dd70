"""The sites' side of a rehearsal: which app the coordinator ships, each SuperNode's node config, the site policy
every site gets and the app releases it approves.

Kept apart from :mod:`wsi_fl.engines.deployment`, which starts and stops the processes. The approval is what
``wsi-fl site-runner`` (:mod:`wsi_fl.site.runner`) enforces: a rehearsal stands in for hospitals that reviewed
the genuine release and listed its hash (``wsi-fl app-hash``) under ``approved-apps``, so any other app directory
given to the coordinator (``--app``) is refused at every site unless it is approved as well (``--approve``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import tomli_w
import tomllib

#: The source checkout this module runs from, when it runs from one (an installed wheel has no pyproject.toml).
CHECKOUT = Path(__file__).resolve().parents[2]
#: What a wsi-fl app's pyproject.toml names as its ServerApp (``[tool.flwr.app.components]``).
SERVER_APP = "wsi_fl.server.app:app"


def is_app(directory: Path) -> bool:
    """Whether ``directory`` holds this Flower app: its ``pyproject.toml`` names wsi-fl's ServerApp."""
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError):
        config = tomllib.loads((Path(directory) / "pyproject.toml").read_text())
        return config["tool"]["flwr"]["app"]["components"].get("serverapp") == SERVER_APP
    return False


def find_app(app: str | Path | None = None, environ: Mapping[str, str] = os.environ,
             cwd: Path | None = None) -> Path:
    """The Flower app directory a rehearsal ships as its FAB: ``app``, checked, or where one is found.

    Without ``app``: ``$WSI_FL_APP`` (the images set it to the app's sources they carry), else the checkout this
    package runs from (an editable install), else the current directory (a checkout with ``pip install .``, as
    the runbook has it). Checked because ``flwr run`` ships whatever directory it is given, and a wrong one
    would fail only in the SuperNodes' app processes. Raises :class:`ValueError` (one line) when none is this app.
    """
    if app is not None:
        if not is_app(Path(app)):
            raise ValueError(f"--app {app}: not the wsi-fl Flower app (no pyproject.toml naming {SERVER_APP})")
        return Path(app).resolve()
    candidates = [Path(environ["WSI_FL_APP"])] if environ.get("WSI_FL_APP") else [CHECKOUT, cwd or Path.cwd()]
    for directory in candidates:
        if is_app(directory):
            return directory.resolve()
    raise ValueError(f"no wsi-fl Flower app in {' or '.join(map(str, candidates))}: pass --app, "
                     "a checkout of wsi-fl")


def toml_string(value: str) -> str:
    """``value`` quoted for Flower's ``key=value`` parser (which cannot keep a quote of the enclosing kind)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: a path with both kinds of quotes cannot be passed in a node config")


def node_config(features: Path, labels: Path, site_name: str, **extra: str) -> str:
    """A SuperNode's ``--node-config``: where its site's data is (:func:`wsi_fl.site.data.site_from_node_config`).

    ``extra``: more string keys (``superlink``, ``policy``, ``audit_log`` for ``audit-log``).
    """
    pairs = {"data-path": str(features.resolve()), "labels": str(labels.resolve()), "site-name": site_name,
             **{k.replace("_", "-"): v for k, v in extra.items()}}
    return " ".join(f"{k}={toml_string(v)}" for k, v in pairs.items())


def site_policy(policy: str | Path | None, superlink: str, work: Path) -> Path:
    """The policy file every SuperNode gets; ValueError (one line) if it does not allow ``superlink``.

    Without ``policy`` it is the rehearsal policy (:func:`wsi_fl.site.policy.rehearsal_policy`: synthetic sites of
    a few slides, evaluation reported) restricted to this SuperLink, written to ``work/site-policy.toml``.
    """
    from dataclasses import replace

    from wsi_fl.site.policy import load_policy, rehearsal_policy

    if policy is None:
        path = work / "site-policy.toml"
        path.write_text(tomli_w.dumps(replace(rehearsal_policy(), superlink=(superlink,)).to_dict()))
        return path
    path = Path(policy).resolve()
    allowed = load_policy(path)  # PolicyError is a ValueError: a bad file stops here, before any process starts
    if not allowed.allows_superlink(superlink):
        raise ValueError(f"--policy {path}: SuperLink {superlink} is not allowed (superlink: "
                         f"{', '.join(allowed.superlink)}); no SuperNode started")
    return path


def genuine_release(approve: Sequence[str | Path] | None) -> list[str | Path]:
    """What the rehearsal's sites approve: ``approve`` (app directories or ``sha256:`` hashes), checked, or else
    the genuine app (:func:`find_app` without ``--app``: the release this environment installed).

    Raises :class:`ValueError` (one line) for an entry that is neither, before any process starts.
    """
    from wsi_fl.site.policy import APP_HASH

    if approve is None:
        try:
            return [find_app(None)]
        except ValueError as err:
            raise ValueError(f"{err}; or name the releases the sites approve with --approve") from None
    for entry in approve:
        if not APP_HASH.fullmatch(str(entry)) and not is_app(Path(entry)):
            raise ValueError(f"--approve {entry}: neither sha256:<64 hex> nor the wsi-fl Flower app directory")
    return list(approve)


def approved_hashes(approve: Sequence[str | Path]) -> tuple[str, ...]:
    """The ``sha256:`` names of the releases in ``approve``: hashes as given, app directories built and hashed."""
    from wsi_fl.site.approval import app_hash
    from wsi_fl.site.policy import APP_HASH

    return tuple(dict.fromkeys(str(a) if APP_HASH.fullmatch(str(a)) else app_hash(a) for a in approve))


def approve_apps(policy_file: Path, approved: Sequence[str], work: Path) -> Path:
    """The sites' policy file with ``approved`` added to ``approved-apps`` when it lists none.

    A policy that lists releases already is the site's decision and stays as it is; otherwise the rehearsal
    plays the hospital that reviewed ``approved`` and writes ``work/site-policy.toml`` (the file the SuperNodes
    were given, so the runners read it at their next task: policies are read per task).
    """
    from dataclasses import replace

    from wsi_fl.site.policy import load_policy

    policy = load_policy(policy_file)
    if policy.approved_apps:
        return policy_file
    path = work / "site-policy.toml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(replace(policy, approved_apps=tuple(approved)).to_dict()))
    tmp.replace(path)  # atomic: a runner reading it now sees the old file or the new one, never half of one
    return path
