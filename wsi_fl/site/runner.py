"""The site's own task runner (``wsi-fl site-runner``): runs only app releases the site approved, from its own code.

Why not Flower's: by default a SuperNode starts ``flower-superexec``, which
runs each task with ``flwr-clientapp``, and that unpacks the run's app bundle
(the FAB the coordinator built with ``flwr run <dir>``) and imports the
ClientApp *from the bundle*, the bundle's directory first on ``sys.path``. The
site policy, the outbound screening and the audit log would then be the
coordinator's code, which a coordinator can change. With ``flower-supernode
--isolation process`` the SuperNode starts no task runner and waits for one to
poll its Runtime API; this is that runner, and it is site-installed code. For
every task it:

1. pulls the task's message, context, run and bundle (Flower's own
   ``pull_task_input``);
2. hashes the bundle's *content* (:func:`wsi_fl.site.approval.check_app`;
   never the hash that travels with it, never a directory it was once
   unpacked to) and checks it against the site policy's ``approved-apps``
   (policy file from the node config ``policy``, read for every task);
3. approved: calls the **site-installed** ClientApp (``wsi_fl.site.app:app``,
   imported from this environment when the runner starts, with its site
   guard, policy checks and audit log). The bundle is a version check only:
   it is never unpacked, none of its files is imported or read;
4. otherwise: answers with a Flower error whose reason is one line
   (``site S refused app sha256:0123456789ab…: not an approved release
   (policy approved-apps)``), appends the refusal to the site's audit log
   (node config ``audit-log``; an ``O_APPEND`` descriptor, fsynced), and logs
   one line. No code of the bundle has run.

The runner owns the audit log: only site code (this runner and the
site-installed ClientApp it calls) appends to it. Each task runs in a child
process forked from the runner (the site app already imported, so a task
starts at once): Flower's Runtime client ends its own process when a run is
stopped, and a task that fails or is stopped must not take the runner with it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from typing import Any

from wsi_fl.site import audit
from wsi_fl.site.approval import PREFIX, AppRefused, bundle_hash, check_app

log = logging.getLogger("wsi_fl.site.runner")

#: What an unreadable policy makes of every app: refused, the reason naming no path.
BROKEN_POLICY = "site {site} refused app {app}…: its site policy cannot be read (the site's log has the details)"


def runtime_client(address: str, token: str | None = None) -> Any:
    """Flower's Runtime API client for the SuperNode at ``address`` (plain HTTP on the site's own machine).

    Without ``token``: the runner's own client, which acquires tasks as ``flower-superexec`` would. With one:
    a task's client, which speaks for that task only, as ``flwr-clientapp`` would.
    """
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
        component_name="SuperExec" if token is None else "flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def _site_name(context: Any) -> str:
    return str(context.node_config.get("site-name") or f"node {context.node_id}")


def approve(message: Any, context: Any, content: bytes) -> str:
    """The bundle's hash if the node's policy approves it; :class:`AppRefused` (refusal audited) otherwise."""
    from wsi_fl.site.guard import node_audit_log, node_policy
    from wsi_fl.site.policy import PolicyError

    site = _site_name(context)
    try:
        try:
            return check_app(node_policy(context.node_config, simulated=False).approved_apps, content, site)
        except PolicyError as err:
            log.error("%s", err)
            app = bundle_hash(content)
            raise AppRefused(BROKEN_POLICY.format(site=site, app=app[:len(PREFIX) + 12]), app) from None
    except AppRefused as err:
        kind = message.metadata.message_type
        log.warning("%s (run %s, %s instruction; the bundle %s was not unpacked, none of its code ran)", err,
                    message.metadata.run_id, kind, err.app)
        journal = node_audit_log(context.node_config, None, simulated=False)
        if journal is not None:
            try:
                journal.append({**audit.refused(message, context.node_id, str(err)), "app": err.app})
            except audit.AuditError as failed:
                log.error("%s", failed)  # the run is refused all the same
        raise


def run_task(address: str, token: str, client_app: Callable[..., Any], announced: Any = None) -> None:
    """One task: pull it, check its bundle, run the site's ClientApp or refuse, push the reply and the outcome.

    ``announced``: the sending end of a pipe to the runner, which learns what the site's log has said once
    (the policy in force) and tells the next task, so that the line is not repeated for every task.
    """
    from wsi_fl.site import guard

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the runner's stop is its own; a task it stops just ends
    try:
        _run_task(address, token, client_app)
    finally:
        if announced is not None:
            with contextlib.suppress(OSError, ValueError):
                announced.send(sorted(guard._announced))
                announced.close()


def _run_task(address: str, token: str, client_app: Callable[..., Any]) -> None:
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from wsi_fl.site.policy import PolicyViolation

    client = runtime_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "the site's task runner failed (its log has the details)"
    try:
        message, context, _run, fab = pull_task_input(client)
        try:
            app = approve(message, context, fab.content)
        except AppRefused as err:
            details = str(err)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
            return
        log.info("run %s: app %s… approved by the site policy; running the site-installed ClientApp",
                 message.metadata.run_id, app[:len(PREFIX) + 12])
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # as flwr-clientapp answers: the exception's type and message (the guard's own)
        if not isinstance(err, PolicyViolation):  # the guard logged the refusal in one line already
            log.error("the task failed at this site", exc_info=err)
        details = f"{type(err)}:<'{err}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()


def _reported(reader: Any) -> list[str]:
    """What a finished task process reported (nothing if it was killed before it could)."""
    try:
        return list(reader.recv()) if reader.poll() else []
    except (EOFError, OSError, ValueError, TypeError):
        return []
    finally:
        reader.close()


def serve(address: str, *, poll_interval: float = 0.5, max_tasks: int | None = None) -> int:
    """Poll the SuperNode's Runtime API at ``address`` for ClientApp tasks and run each in a child process.

    ``max_tasks``: return after that many tasks have ended (tests); else run until interrupted. Returns the
    number of tasks started.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from wsi_fl.site import guard
    from wsi_fl.site.app import app as client_app  # the site's installed ClientApp, before any task arrives

    fork = multiprocessing.get_context("fork")  # the child inherits the imported app: no second import per task
    client = runtime_client(address)
    workers: dict[multiprocessing.process.BaseProcess, Any] = {}  # task process -> what it reports back
    started = 0
    log.info("site task runner polling %s for ClientApp tasks (site-installed app, approved bundles only)", address)
    try:
        while max_tasks is None or started < max_tasks or any(w.is_alive() for w in workers):
            for worker in [w for w in workers if not w.is_alive()]:
                worker.join()
                guard._announced.update(_reported(workers.pop(worker)))  # said once in the site's log: not again
            if max_tasks is None or started < max_tasks:
                answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if answer.HasField("task") and answer.token:
                    reader, writer = fork.Pipe(duplex=False)
                    worker = fork.Process(target=run_task, args=(address, answer.token, client_app, writer),
                                          name=f"task-{answer.task.task_id}")
                    worker.start()
                    writer.close()
                    workers[worker] = reader
                    started += 1
            time.sleep(poll_interval)
    finally:
        for worker, reader in workers.items():
            if worker.is_alive():
                worker.terminate()
            worker.join(timeout=10)
            reader.close()
        with contextlib.suppress(Exception):
            client.close()
    return started
