"""The sites as the server sees them: who is connected, what they say of their data, what they are told.

Kept apart from the round loop (:mod:`wsi_fl.server.loop`) because the SecAgg+
driver (:mod:`wsi_fl.server.secagg`) asks the same questions before its own
rounds: the federation starts only once enough sites are connected and all of
them agree on the feature space; every instruction carries the same settings.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from models.checkpoint import check_provenance
from wsi_fl.errors import WsiFlError
from wsi_fl.federation.config import CENTRAL_DP, CLIENT_KEYS, FedConfig
from wsi_fl.mil.data import sort_classes
from wsi_fl.privacy.central import planned_noise

log = logging.getLogger("wsi_fl.server")


class FederationError(WsiFlError, RuntimeError):
    """The federation cannot go on (sites disagree, too few replied, a resume that does not match)."""


def client_config(cfg: FedConfig, classes: list[str] | None,
                  noise_multiplier: float | None = None) -> ConfigRecord:
    """The settings sent with every instruction; under DP the noise multiplier in force (what a site's policy checks).

    ``noise_multiplier``: the run's (a resumed run keeps its own), else the one ``cfg`` plans.
    """
    rc = cfg.to_run_config()
    values: dict[str, Any] = {k: rc[k] for k in CLIENT_KEYS}
    if cfg.dp in CENTRAL_DP:  # under slide-dpsgd each site calibrates its own noise to dp-epsilon
        values["dp-noise-multiplier"] = noise_multiplier if noise_multiplier is not None else planned_noise(cfg)
    if classes is not None:
        values["classes"] = list(classes)
    return ConfigRecord(values)


def wait_for_sites(grid: Grid, needed: int, timeout: float | None, what: str) -> list[int]:
    """The connected node ids once at least ``needed`` are connected; FederationError after ``timeout`` s.

    Flower's strategies wait for their sample without a time limit, so a federation that lost sites for good
    would hang in its next round; the server waits here first, with a limit, and stops with a clear error
    (the last completed round is checkpointed: ``resume=true`` continues from it).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    reported = -1
    while len(nodes := list(grid.get_node_ids())) < needed:
        if deadline is not None and time.monotonic() > deadline:
            raise FederationError(f"{what}: {len(nodes)} site(s) connected, {needed} needed, still after "
                                  f"{timeout:.0f} s (round-timeout)")
        if len(nodes) != reported:  # log changes only, not every second
            log.info("%s: waiting for sites: %d connected, %d needed", what, len(nodes), needed)
            reported = len(nodes)
        time.sleep(1)
    return nodes


@dataclass(frozen=True)
class SiteSurvey:
    """What the sites said of their data before the first round."""

    classes: list[str]  # the union, in the federation's order
    feature_dim: int
    provenance: dict[str, Any]  # the feature space every site shares
    train_sizes: list[int]  # each answering site's training bags (SecAgg+ scales its weights by the largest)


def query_sites(grid: Grid, cfg: FedConfig) -> SiteSurvey:
    """Classes (union), feature dimension and provenance agreed by all connected sites, and their training sizes."""
    nodes = wait_for_sites(grid, cfg.min_available_nodes, None, "start")
    messages = [Message(content=RecordDict({"config": client_config(cfg, None)}), message_type=MessageType.QUERY,
                        dst_node_id=n) for n in nodes]
    infos = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if reply.has_error():
            log.warning("site %s could not describe its data: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        infos.append((reply.metadata.src_node_id, reply.content["info"]))
    if not infos or len(infos) < cfg.min_available_nodes:
        raise FederationError(f"only {len(infos)} of {len(nodes)} sites described their data "
                              f"(min-available-nodes = {cfg.min_available_nodes}); see the sites' logs")
    first_node, first = infos[0]
    provenance = json.loads(first["provenance"])
    for node, info in infos[1:]:
        if int(info["feature-dim"]) != int(first["feature-dim"]):
            raise FederationError(f"site {node} has {info['feature-dim']}-d features, site {first_node} "
                                  f"{first['feature-dim']}-d: all sites must use the same encoder")
        check_provenance(provenance, json.loads(info["provenance"]), f"site {node}", expected_from=f"site {first_node}")
    classes = sort_classes(sorted({c for _, info in infos for c in info["classes"]}))
    return SiteSurvey(classes, int(first["feature-dim"]), provenance, [int(info["n-train"]) for _, info in infos])
