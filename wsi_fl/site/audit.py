"""A site's own record of what its ClientApp was asked and what it sent: one JSON line per message.

A hospital's governance needs to show, after the fact, what left the
building. Every instruction received gets a ``received`` line (its settings
and the shapes of the arrays it brought) and is followed by exactly one line
for what went back: ``sent`` (the names, shapes, dtypes and sizes of what the
reply held), ``refused`` (the site policy's reason; an error reply went back)
or ``failed`` (the handler raised; an error reply went back with the
exception's type only). Lines hold settings, names and sizes, never data:
no array contents, no metric values (a histogram of a few slides is close to
their scores), no paths, slide or patient ids. Example::

    {"time": "2025-05-01T10:00:00.123+00:00", "event": "sent", "message-type": "train", "run-id": 7,
     "node-id": 42, "reply-to": "…", "server-round": 3,
     "content": {"arrays": {"kind": "arrays", "items": {"fc.weight": {"shape": [2, 32], "dtype": "float32",
     "bytes": 384}}}, "metrics": {"kind": "metrics", "items": {"num-examples": 1, "train-loss": 1}}}}

(For a reply, a metric's or info key's number is its size: 1 for a scalar, the length of a list.)

A survival evaluation reply (``task = "survival"``) also gets, per split, what its two count grids hold:
``"survival-histograms": {"test": {"grid": [2, 64, 64], "patients": 120, "events": 41}}``, the grid's shape (event
and censored, time bins, risk bins) and how many patients and events were counted. That is what left the site,
as counts; the grid's cells (which patient had which follow-up and risk, to a bin) are never logged.

Where: node config ``audit-log``. Without it, ``wsi-fl-audit.jsonl`` in the
site directory (the parent of ``data-path``), or, if that cannot be written
(data mounted read-only), ``$XDG_STATE_HOME/wsi-fl/audit-<site-name>.jsonl``
(``~/.local/state`` by default) with a warning. An explicit path that cannot
be written fails every instruction: a site that cannot keep its record does
not send. Each line is appended with one ``write`` on an ``O_APPEND``
descriptor, then fsynced, so concurrent ClientApp processes never interleave
partial lines and a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import Array, Message, RecordDict

log = logging.getLogger("wsi_fl.site.audit")

AUDIT_FILE = "wsi-fl-audit.jsonl"
_MAX_STR = 200  # longer config strings are cut: the log records settings, not payloads
_MAX_LIST = 64  # longer config lists are logged by size only
_warned: set[str] = set()
SURVIVAL_HIST = "-surv-hist"  # the metric key suffix of a split's survival histograms (wsi_fl.site.survival)


class AuditError(OSError):
    """The audit log cannot be written (one line, names the file)."""


class AuditLog:
    """Append-only JSON lines at ``path`` (created with mode 0600, directories as needed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, entry: Mapping[str, Any]) -> None:
        data = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:  # one write in practice; a short write on a full disk continues where it stopped
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise AuditError(f"{self.path}: cannot write the audit log ({err.strerror or err})") from None


def _writable(path: Path) -> bool:
    """Whether ``path`` can be appended to, creating it but no directory (a wrong data-path creates nothing)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        return True
    except OSError:
        return False


def default_audit_path(site_dir: Path | None, site_name: str) -> Path:
    """``site_dir/wsi-fl-audit.jsonl`` if it can be written, else the user's state directory (warned once)."""
    if site_dir is not None and _writable(site_dir / AUDIT_FILE):
        return site_dir / AUDIT_FILE
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    fallback = state / "wsi-fl" / f"audit-{site_name}.jsonl"
    if str(fallback) not in _warned:
        _warned.add(str(fallback))
        log.warning("audit log: %s cannot be written (read-only data?); writing %s instead (set audit-log in the "
                    "node config to choose)", site_dir / AUDIT_FILE if site_dir else "the site directory", fallback)
    return fallback


# -- what a line says about a message ----------------------------------------------------------------------------

def _header(event: str, msg: Message, node_id: int, link: str) -> dict[str, Any]:
    config = msg.content.config_records.get("config", {}) if msg.has_content() else {}
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
             "message-type": msg.metadata.message_type, "run-id": msg.metadata.run_id, "node-id": node_id,
             link: msg.metadata.message_id}
    if "server-round" in config:
        entry["server-round"] = config["server-round"]
    return entry


def _array(arr: Array) -> dict[str, Any]:
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": len(arr.data)}


def _setting(value: Any) -> Any:
    """A config value as the log keeps it: short scalars and lists as they are, the rest by size."""
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, str):
        return value if len(value) <= _MAX_STR else {"chars": len(value)}
    if isinstance(value, list):
        return [_setting(v) for v in value] if len(value) <= _MAX_LIST else {"size": len(value)}
    return value


def _size(value: Any) -> int:
    return len(value) if isinstance(value, list | str | bytes) else 1


def describe(content: RecordDict, *, settings: bool) -> dict[str, Any]:
    """Every record of ``content`` by name: array names, shapes, dtypes, bytes; metric and config keys.

    ``settings``: config values are logged (an instruction's settings) rather than only their sizes (a reply's
    info, which is about the site). Metric values are never logged.
    """
    out: dict[str, Any] = {}
    for name, record in content.array_records.items():
        out[name] = {"kind": "arrays", "items": {k: _array(v) for k, v in record.items()}}
    for name, record in content.metric_records.items():
        out[name] = {"kind": "metrics", "items": {k: _size(v) for k, v in record.items()}}
    for name, record in content.config_records.items():
        items = {k: _setting(v) if settings else _size(v) for k, v in record.items()}
        out[name] = {"kind": "config", "items": items}
    return out


def received(msg: Message, node_id: int) -> dict[str, Any]:
    return {**_header("received", msg, node_id, "message-id"), "content": describe(msg.content, settings=True)}


def sent(msg: Message, reply: Message, node_id: int, suppressed: list[str] | None = None) -> dict[str, Any]:
    """The line for ``reply`` to ``msg`` (``suppressed``: splits emptied by small-cell suppression)."""
    entry = _header("sent", msg, node_id, "reply-to")
    if reply.has_error():  # a handler that answered with an error reply rather than raising
        return {**entry, "reason": reply.error.reason}
    entry["content"] = describe(reply.content, settings=False)
    counts = survival_counts(msg, reply)
    if counts:
        entry["survival-histograms"] = counts
    if suppressed:
        entry["suppressed"] = suppressed
    return entry


def survival_counts(msg: Message, reply: Message) -> dict[str, dict[str, Any]]:
    """Per split of a survival evaluation reply: the grid's shape and the patients and events it counts."""
    config = msg.content.config_records.get("config", {}) if msg.has_content() else {}
    out: dict[str, dict[str, Any]] = {}
    for record in reply.content.metric_records.values():
        for key, value in record.items():
            if not (key.endswith(SURVIVAL_HIST) and isinstance(value, list)):
                continue
            half = len(value) // 2  # [events grid, censored grid], each time bins x risk bins
            grid = [2, config.get("hist-time-bins"), config.get("hist-risk-bins")]
            out[key[: -len(SURVIVAL_HIST)]] = {"grid": grid, "patients": int(sum(value)),
                                               "events": int(sum(value[:half]))}
    return out


def refused(msg: Message, node_id: int, reason: str, *, error: str | None = None) -> dict[str, Any]:
    """A refusal (``error`` None: the policy's ``reason``) or a failure (``error``: the exception's type)."""
    entry = {**_header("refused" if error is None else "failed", msg, node_id, "reply-to"), "reason": reason}
    if error is not None:
        entry["error"] = error
    return entry
