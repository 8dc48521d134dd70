"""An in-process Grid: Flower's simulation engine without Ray, for tests and many-seed benchmarks.

The real ServerApp loop and ClientApp run unchanged; messages are delivered
by calling the ClientApp in this process, one site after another, with one
persistent :class:`flwr.app.Context` per node (as the engine keeps them), and an
exception in a ClientApp becomes an error reply, as it does in Flower.
``faults`` lets a test make a node crash, stay silent (as if it timed out) or
tamper with its reply; :meth:`InlineGrid.disconnect` makes it leave for good.

Why it exists: each simulation-engine run starts and stops a Ray cluster
(tens of seconds on a 2-core machine), which dominates small federations.
Results are the same: tests/federation/test_federated.py checks that a simulation-engine
run and an inline run with the same seed give the same per-round metrics.
Use the simulation engine (:func:`wsi_fl.engines.simulation.simulate`) or the
deployment engine for anything that is not a test or an accuracy benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Fault = Callable[[Message, int], Message | None]  # (reply, server round) -> reply to deliver, or None (silence)


def over_the_wire(msg: Message) -> Message:
    """A copy of ``msg`` through Flower's protobuf serialisation, as a SuperLink would deliver it."""
    return message_from_proto(message_to_proto(msg))


class InlineGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]],
                 faults: dict[int, Fault] | None = None) -> None:
        self.client_app = client_app
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config=dict(cfg), state=RecordDict(),
                                        run_config={}) for i, cfg in enumerate(node_configs)}
        self.faults = faults or {}
        self.offline: set[int] = set()  # nodes gone (see disconnect): not listed, messages to them unanswered
        self.sent: list[Message] = []  # every reply a ClientApp produced, before any fault (for audits)
        self._run = Run.create_empty(run_id=1) if hasattr(Run, "create_empty") else None
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0  # the server
        TaskIdentity.task_id = 1

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.contexts if node not in self.offline]

    def disconnect(self, node: int) -> None:
        """``node`` leaves the federation, as a SuperNode whose heartbeats stop: a test's dropout."""
        self.offline.add(node)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InlineGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InlineGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg = over_the_wire(msg)  # each site gets its own copy, as over a network (mods may edit messages)
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            msg.metadata.__dict__["_src_node_id"] = 0
            msg.metadata.__dict__["_message_id"] = msg.object_id
            TaskIdentity.node_id = node
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            finally:
                TaskIdentity.node_id = 0
            self.sent.append(over_the_wire(reply))  # as sent: the server screens and clips replies in place
            fault = self.faults.get(node)
            if fault is not None:
                config = msg.content.config_records.get("config", {}) if msg.has_content() else {}
                reply = fault(reply, int(config.get("server-round", 0)))
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = node
                replies.append(reply)
        return replies
