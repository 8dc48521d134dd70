"""The gate a site's ClientApp puts around its handlers: check the site policy, run, suppress, audit.

A Flower mod (:class:`SiteGuard`), the outermost of the ClientApp's mods, so
it sees every instruction before anything acts on it and every reply as it
leaves (after the DP clipping mod). For each message:

1. log ``received`` in the site's audit log (:mod:`wsi_fl.site.audit`);
2. check the instruction against the node's site policy
   (:mod:`wsi_fl.site.policy`) and, under slide-level DP, the run against the
   site's privacy ledger (:mod:`wsi_fl.site.ledger`: charged once, at the run's
   first training instruction); a refusal is logged here in one WARNING line
   (what was refused, which rule), written to the audit log and answered with
   an error reply whose reason (``PolicyViolation: site policy: ...``) the
   server logs;
3. run the handler; an evaluation reply has its small splits emptied
   (``min-eval-slides``);
4. log ``sent`` and return the reply.

A handler that raises is logged here in full, but the error reply says only
the exception's type: exception messages name files and slides
(``.../features/s01.h5: ...``), and nothing naming them may leave the site.

Refusals and failures are *answered* (an error reply), not raised: Flower
turns an exception escaping a ClientApp into its own traceback and the app
process's "Exit Code: 800" in the SuperNode's output, for what is a decision
of the site (a refusal) or already logged here (a failure).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from wsi_fl.site import audit
from wsi_fl.site.data import SiteConfigError, site_from_node_config
from wsi_fl.site.ledger import admit_run
from wsi_fl.site.policy import (
    PolicyViolation,
    SiteFacts,
    SitePolicy,
    check_instruction,
    load_policy,
    rehearsal_policy,
    suppress_small_splits,
)

log = logging.getLogger("wsi_fl.site")

TrainBags = Callable[[ConfigRecord, Context], int]  # the site's training bags under these settings' split
#: Where an instruction's settings are: ours, and Flower's legacy FitIns (the fit stage of SecAgg+).
SETTINGS_RECORDS = ("config", "fitins.config")
_announced: set[str] = set()


class SiteError(RuntimeError):
    """What the server learns of a failure at the site: the exception's type, nothing that names data."""


def instruction_settings(msg: Message) -> ConfigRecord | None:
    """The settings the server sent with ``msg``: our ``config``, or the fit stage's ``fitins.config`` under SecAgg+.

    None for a message without settings (SecAgg+'s key set-up, share and unmask stages): only the rules that do
    not depend on settings apply to it, the fit stage that trains carries them all.
    """
    if not msg.has_content():
        return None
    return next((msg.content.config_records[k] for k in SETTINGS_RECORDS if k in msg.content.config_records), None)


def is_simulated(node_config: Mapping[str, Any], cohort: str | Path | None) -> bool:
    """Whether the node is a partition of a cohort given to this process (simulation), not a site's own data."""
    return cohort is not None and not any(k in node_config for k in ("data-path", "labels", "cohort"))


def node_policy(node_config: Mapping[str, Any], simulated: bool) -> SitePolicy:
    """The node's policy file (node config ``policy``), else the safe default; simulated nodes: the rehearsal one."""
    if "policy" in node_config:
        path = str(node_config["policy"])
        policy = load_policy(path)  # read every time: an edit applies to the next instruction, a broken one refuses
        _announce(path, f"site policy from {path}: {policy.describe()}")
        return policy
    if simulated:
        _announce("rehearsal", f"simulated sites: rehearsal site policy: {rehearsal_policy().describe()}")
        return rehearsal_policy()
    _announce("default", f"no site policy in the node config (policy): the default policy: {SitePolicy().describe()}")
    return SitePolicy()


def node_audit_log(node_config: Mapping[str, Any], cohort: str | Path | None, simulated: bool) -> audit.AuditLog | None:
    """The node's audit log (node config ``audit-log``, else next to its data); simulated nodes only if named."""
    if "audit-log" in node_config:
        return audit.AuditLog(str(node_config["audit-log"]))
    if simulated:
        return None
    if "data-path" in node_config:  # even if it does not exist: the failure is recorded beside it
        site_dir: Path | None = Path(str(node_config["data-path"])).parent
    else:
        try:
            site_dir = site_from_node_config(node_config, cohort).features_dir.parent
        except SiteConfigError:
            site_dir = None  # the handler will fail with the reason; the failure is still recorded
    name = str(node_config.get("site-name") or (site_dir.name if site_dir else "") or "site").replace("/", "_")
    return audit.AuditLog(_default_path(str(site_dir) if site_dir else None, name))


@lru_cache(maxsize=16)
def _default_path(site_dir: str | None, name: str) -> Path:
    return audit.default_audit_path(Path(site_dir) if site_dir else None, name)


def _announce(key: str, line: str) -> None:
    if key not in _announced:
        _announced.add(key)
        log.info(line)


class SiteGuard:
    """The mod; ``cohort`` as for :func:`wsi_fl.site.app.make_client_app`, ``train_bags`` counts the split."""

    def __init__(self, cohort: str | Path | None, train_bags: TrainBags) -> None:
        self.cohort, self.train_bags = cohort, train_bags

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            return self._guard(msg, context, call_next)
        except SiteError as err:  # the audit log cannot be written: nothing is sent but this (already logged)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)

    def _guard(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        node_config, node = context.node_config, context.node_id
        simulated = is_simulated(node_config, self.cohort)
        journal = node_audit_log(node_config, self.cohort, simulated)
        self._record(journal, audit.received(msg, node))
        kind = msg.metadata.message_type.split(".", 1)[0]
        config = instruction_settings(msg)
        try:
            policy = node_policy(node_config, simulated)
            superlink = node_config.get("superlink")
            facts = SiteFacts(superlink=str(superlink) if superlink else None)
            check_instruction(policy, msg.metadata.message_type, config, facts)
            if kind == MessageType.TRAIN and config is not None:  # data loaded only once the other rules accept
                facts = replace(facts, train_bags=self.train_bags(config, context))
                check_instruction(policy, msg.metadata.message_type, config, facts)
            admit_run(policy, msg.metadata.message_type, msg.metadata.run_id, config, node_config, self.cohort,
                      journal.path if journal else None, lambda: self.train_bags(config, context))  # ε ledger
            reply = call_next(msg, context)
            suppressed: list[str] = []
            if kind == MessageType.EVALUATE and not reply.has_error() and "metrics" in reply.content.metric_records:
                metrics, suppressed = suppress_small_splits(dict(reply.content["metrics"].items()),
                                                            policy.min_eval_slides)
                reply.content["metrics"] = MetricRecord(metrics)
        except PolicyViolation as err:
            log.warning("refused the %s instruction of run %s, round %s: %s", kind, msg.metadata.run_id,
                        (config or {}).get("server-round", "-"), err)
            self._record(journal, audit.refused(msg, node, str(err)))
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{type(err).__name__}: {err}"),
                           reply_to=msg)
        except Exception as err:
            log.error("the %s instruction of run %s failed at this site", kind, msg.metadata.run_id, exc_info=err)
            reason = f"{type(err).__name__} at the site (its log has the details)"
            self._record(journal, audit.refused(msg, node, reason, error=type(err).__name__))
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        self._record(journal, audit.sent(msg, reply, node, suppressed))
        return reply

    @staticmethod
    def _record(journal: audit.AuditLog | None, entry: dict[str, Any]) -> None:
        """Append to the audit log; if it cannot be written nothing is sent (the error names no path)."""
        if journal is None:
            return
        try:
            journal.append(entry)
        except audit.AuditError as err:
            log.error("%s", err)
            raise SiteError("the site's audit log cannot be written (its log has the details)") from None
