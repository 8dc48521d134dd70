"""A site's privacy ledger: the ε each run under slide-level DP took from each of its datasets, across runs.

Slide-level DP-SGD (:mod:`wsi_fl.privacy.dpsgd`) bounds what one run releases
about a slide; a consortium that trains again on the same slides spends again,
and ε adds up (basic composition: k runs at (ε_i, δ_i) are (Σε_i, Σδ_i)-DP).
The site therefore keeps its own account, outside any run, and its policy may
set a lifetime budget (``lifetime-epsilon``; 0 or absent: none). Rules, all
applied by the site guard (:mod:`wsi_fl.site.guard`, site-installed code under
``wsi-fl site-runner``):

* **What is charged**: a run's *planned* total ε, not what it has spent so
  far: its target ``dp-epsilon`` (the site calibrates its noise so that the
  whole run stays within it), or, with a fixed ``dp-noise-multiplier``, the ε
  of all the run's planned steps for this site's training bags. The site
  refuses any round beyond its plan (``dpsgd.check_budget``), so a charged
  run can never spend more than its charge; charging the whole plan up front
  is conservative (a run stopped after one round is still charged in full),
  and it needs one write per run, none per round, so a crash between rounds
  cannot leave ε spent but unrecorded.
* **When**: once per run, at its first training instruction that every other
  rule accepted (its *admission*), under a file lock and fsynced before the
  site trains. Every earlier instruction of the run that carries its settings
  (the server's ``query`` describing the run first) is checked the same way
  but not charged, so a run that the budget cannot take is refused at its
  first message, before any training, with one line naming the rule, what
  was spent, what the run plans and the budget. A run already charged is
  admitted again for its later rounds, also after a restart. A resumed run is
  a new run (new run id) and is charged again: conservative.
* **Which dataset**: node config ``dataset`` if set (a name the hospital
  chooses for the slides behind a node, e.g. ``crc-2024``), else the resolved
  path of the node's features directory. The path is what a node reads, and
  slides added to that directory inherit what it has spent (conservative).
  Features of the *same slides* under another directory (a re-extraction
  with another encoder, a moved disk) would open a fresh account: give those
  nodes the same ``dataset`` name (docs/site-policy.md).
* **Only slide-dpsgd is accounted**: with a lifetime budget, a run under no
  DP or under client-level DP is refused (this ledger cannot say what it
  costs per slide).

The file: node config ``privacy-ledger``, else :data:`LEDGER_FILE` beside the
site's audit log (the same directory, owned by the site's runner). JSON
lines, one per charge::

    {"time": "...", "event": "charge", "dataset": "/data/features", "run-id": 7, "epsilon": 2.0,
     "delta": 1e-05, "rounds": 30, "train-bags": 120, "site": "site_1"}

JSON lines rather than sqlite: the security officer reads and archives it
like the audit log (``jq``, ``grep``), entries are only ever appended, and
the standard library's ``fcntl`` lock plus ``O_APPEND`` + ``fsync`` gives the
one transaction needed (read the sum, append a charge). A crash can only cut
the last line short (no newline): readers ignore it, and the next writer,
holding the lock, drops it before appending (that run was never admitted: a
charge is fsynced before the site trains). Any other unreadable line means
the file was damaged: every run under slide-dpsgd is then refused (fail
closed) until someone repairs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import MessageType

from wsi_fl.site.policy import PolicyViolation, SitePolicy

log = logging.getLogger("wsi_fl.site.ledger")

LEDGER_FILE = "wsi-fl-privacy-ledger.jsonl"
#: What the server reads when the ledger cannot be used (the path and the cause stay in the site's log).
UNUSABLE = "site policy: the site's privacy ledger cannot be used (the site's log has the details)"


class LedgerError(OSError):
    """The ledger cannot be read or written, or a line other than the last is damaged (one line, names the file)."""


@dataclass(frozen=True)
class Account:
    """What a dataset has spent: the sum of its runs' charges, and how many runs."""

    epsilon: float = 0.0
    delta: float = 0.0
    runs: int = 0


class PrivacyLedger:
    """Append-only JSON lines at ``path`` (mode 0600, directories as needed); every access under ``flock``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """The open file descriptor, exclusively locked, and its charges; a torn last line is dropped first."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as err:
            raise LedgerError(f"{self.path}: cannot open the privacy ledger ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:
                _fsync_dir(self.path.parent)  # the new file's name survives a crash too
            data = _read_all(fd)
            entries, kept = self._parse(data)
            if kept < len(data):
                log.warning("privacy ledger %s: dropped a last line cut short (%d bytes; a crash while writing "
                            "it, before its run was admitted)", self.path, len(data) - kept)
                os.ftruncate(fd, kept)
            yield fd, entries
        except LedgerError:
            raise
        except OSError as err:
            raise LedgerError(f"{self.path}: cannot use the privacy ledger ({err.strerror or err})") from None
        finally:
            os.close(fd)  # also releases the lock

    def _parse(self, data: bytes) -> tuple[list[dict[str, Any]], int]:
        """The entries, and how many bytes of ``data`` hold whole lines (a last line without newline is torn)."""
        kept = data.rfind(b"\n") + 1
        entries = []
        for number, line in enumerate(data[:kept].splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not isinstance(entry.get("dataset"), str):
                    raise TypeError("not a charge")
                entry["epsilon"] = float(entry["epsilon"])
            except (ValueError, KeyError, TypeError):
                raise LedgerError(f"{self.path}: line {number} is damaged; no run under slide-dpsgd is admitted "
                                  "until the ledger is repaired") from None
            entries.append(entry)
        return entries, kept

    def charges(self) -> list[dict[str, Any]]:
        with self._locked() as (_, entries):
            return entries

    def account(self, dataset: str) -> Account:
        return _account(self.charges(), dataset)

    def admit(self, dataset: str, run_id: int, planned: float, delta: float, budget: float, *, charge: bool,
              details: Mapping[str, Any] | None = None) -> Account:
        """Admit run ``run_id`` planning ε ``planned`` on ``dataset`` under ``budget`` (0: none); charge it if
        ``charge`` and not charged yet. Returns the dataset's account afterwards; :class:`PolicyViolation` (one
        line: rule, spent, planned, budget) when the run would take the dataset past ``budget``.
        """
        with self._locked() as (fd, entries):
            if any(e["dataset"] == dataset and e.get("run-id") == run_id for e in entries):
                return _account(entries, dataset)  # admitted before: its later rounds, or after a restart
            spent = _account(entries, dataset)
            if budget > 0 and spent.epsilon + planned > budget * (1 + 1e-9):
                raise PolicyViolation(
                    f"site policy: this run plans epsilon {planned:.4g}, which would exceed lifetime-epsilon "
                    f"{budget:g} for this dataset (spent {spent.epsilon:.4g} in {spent.runs} earlier "
                    f"run{'s' * (spent.runs != 1)}; {max(budget - spent.epsilon, 0):.4g} left)")
            if not charge:
                return spent
            entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": "charge",
                     "dataset": dataset, "run-id": run_id, "epsilon": planned, "delta": delta, **(details or {})}
            _append(fd, (json.dumps(entry) + "\n").encode())
            return _account([*entries, entry], dataset)


def _account(entries: list[dict[str, Any]], dataset: str) -> Account:
    mine = [e for e in entries if e["dataset"] == dataset]
    return Account(sum(float(e["epsilon"]) for e in mine), sum(float(e.get("delta", 0.0)) for e in mine), len(mine))


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _append(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # one write in practice; a short write on a full disk continues where it stopped
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open a directory for fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- the rule, as the site guard applies it ----------------------------------------------------------------------

def node_ledger(node_config: Mapping[str, Any], audit_path: Path | None) -> PrivacyLedger | None:
    """The node's ledger: node config ``privacy-ledger``, else beside its audit log; None if it has neither."""
    if "privacy-ledger" in node_config:
        return PrivacyLedger(str(node_config["privacy-ledger"]))
    return PrivacyLedger(audit_path.parent / LEDGER_FILE) if audit_path is not None else None


def node_dataset(node_config: Mapping[str, Any], cohort: str | Path | None) -> str:
    """The account a node's runs are charged to: node config ``dataset``, else its features directory, resolved."""
    from wsi_fl.site.data import site_from_node_config

    if node_config.get("dataset"):
        return str(node_config["dataset"])
    return str(site_from_node_config(node_config, cohort).features_dir.resolve())


def planned_epsilon(settings: Mapping[str, Any], train_bags: Callable[[], int]) -> float:
    """The ε a run under slide-dpsgd plans at this site: its target, else that of all its planned steps."""
    from wsi_fl.federation.config import FedConfig
    from wsi_fl.privacy.dpsgd import plan_for

    if float(settings["dp-epsilon"]) > 0:
        return float(settings["dp-epsilon"])
    keys = FedConfig().to_run_config()
    plan = plan_for(train_bags(), FedConfig.from_run_config({k: v for k, v in settings.items() if k in keys}))
    return plan.epsilon(plan.total_steps)


def admit_run(policy: SitePolicy, message_type: str, run_id: int, config: Mapping[str, Any] | None,
              node_config: Mapping[str, Any], cohort: str | Path | None, audit_path: Path | None,
              train_bags: Callable[[], int]) -> None:
    """Check (and at its first training instruction, charge) run ``run_id`` against the node's ledger.

    ``config``: the instruction's settings (None: a SecAgg+ stage without them, nothing to check). Raises
    :class:`PolicyViolation` (one line) for a run the lifetime budget cannot take, a run not under slide-dpsgd
    when there is a budget, and a ledger that cannot be used (fail closed, as a site that cannot keep its audit
    log does not send: the record is what lets a budget be set later).
    """
    from wsi_fl.federation.config import FedConfig

    if config is None:
        return
    settings = {**FedConfig().to_run_config(), **dict(config)}
    budget = policy.lifetime_epsilon
    if settings["dp"] != "slide-dpsgd":
        if budget > 0:
            raise PolicyViolation(f"site policy: the run is not under slide-level DP (dp = {settings['dp']!r}) and "
                                  f"the policy sets lifetime-epsilon {budget:g} (only dp = 'slide-dpsgd' is "
                                  "accounted)")
        return
    ledger = node_ledger(node_config, audit_path)
    if ledger is None:
        if budget > 0:
            raise PolicyViolation("site policy: lifetime-epsilon is set but this node keeps no privacy ledger "
                                  "(set privacy-ledger or audit-log in the node config)")
        return
    planned = planned_epsilon(settings, train_bags)
    if not math.isfinite(planned):
        raise PolicyViolation(f"site policy: this run's planned epsilon is {planned} (no noise?)")
    charge = message_type.split(".", 1)[0] == MessageType.TRAIN
    dataset = node_dataset(node_config, cohort)
    details = {"rounds": int(settings["num-server-rounds"]),
               "site": str(node_config.get("site-name") or "")} if charge else None
    if charge:
        details["train-bags"] = train_bags()
    try:
        account = ledger.admit(dataset, int(run_id), planned, float(settings["dp-delta"]), budget, charge=charge,
                               details=details)
    except LedgerError as err:
        log.error("%s", err)
        raise PolicyViolation(UNUSABLE) from None
    if charge:
        log.info("run %s: privacy ledger %s: dataset %s has now spent epsilon %.4g in %d run(s)%s", run_id,
                 ledger.path, dataset, account.epsilon, account.runs,
                 f" of lifetime-epsilon {budget:g}" if budget > 0 else " (no lifetime-epsilon)")
