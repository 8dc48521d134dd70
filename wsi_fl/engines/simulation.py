"""Federated training of every site of a cohort directory on this machine, with Flower's simulation engine.

Each site of the cohort (:func:`wsi_fl.site.data.discover_cohort`) becomes one
virtual SuperNode running the real ClientApp; the real ServerApp runs the
rounds. What crosses between them is exactly what crosses a hospital's
firewall in deployment (weights and aggregate counts), so a simulation is a
faithful rehearsal. Nothing reaches the internet: Flower's telemetry, update
checks and runtime dependency installation are switched off here.

What it prints is the server's one line per round and real errors, nothing a
user must learn to ignore (:func:`_quiet_engine`): Flower's INFO log and its
notice that ``run_simulation`` is deprecated are dropped; the simulated sites
log warnings and errors only (each would otherwise announce its rehearsal
policy, and Flower in it its own shutdown, through Ray with a
``(ClientAppActor pid=…)`` prefix); and Ray prints every site's warning
instead of folding repeats into a "[repeated 2x across cluster]" line with a
hint about ``RAY_DEDUP_LOGS``. A site's error still reaches the terminal, with
its traceback, and the server's line says which round it cost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from wsi_fl._logging import LOG_LEVEL_ENV, configure_logging
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.loop import FedResult, run_server
from wsi_fl.server.secagg import check_secagg_config, run_secagg_server
from wsi_fl.site.data import discover_cohort

#: Flower environment for an offline hospital network (also set by wsi-fl rehearse).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

#: Ray settings, read when Ray is imported (so set before Flower's simulation module is): CPU sites (silences
#: Ray's FutureWarning about accelerator variables), and no log deduplication (its hint line is noise).
RAY_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0"}

#: The environment of the simulated sites' processes (Ray workers inherit this process's while the engine runs):
#: our site code logs warnings and errors, not its start-up; Flower there logs errors only (read when a worker
#: imports Flower), not the "Manually terminating ClientAppActor" warning every actor logs on a normal shutdown.
SITE_ENV = {LOG_LEVEL_ENV: "WARNING", "FLWR_LOG_LEVEL": "ERROR"}

#: The deprecation notice ``flwr.simulation.run_simulation`` logs on every call (Flower 1.41,
#: flwr/simulation/run_simulation.py line 150, its first statement: ``warn_deprecated_feature("The
#: `run_simulation` function is deprecated ...")``, a WARNING of the ``flwr`` logger, not a Python warning, so
#: a logging filter and not ``warnings.filterwarnings`` drops it). Its replacement, ``flwr run`` against a SuperLink in
#: simulation mode, runs the apps in other processes behind a SuperLink on a fixed local port; it cannot hand
#: this process the ServerApp's result or exception, which is what :func:`simulate` returns or raises. The
#: deployment engine (``wsi-fl rehearse``) is the ``flwr run`` path; this engine stays on the in-process API.
RUN_SIMULATION_DEPRECATED = "The `run_simulation` function is deprecated"


class _DropRunSimulationDeprecation(logging.Filter):
    """Drops exactly Flower's :data:`RUN_SIMULATION_DEPRECATED` notice; every other Flower warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return RUN_SIMULATION_DEPRECATED not in record.getMessage()


@contextmanager
def _quiet_engine() -> Iterator[None]:
    """While the engine runs: without Flower's deprecation notice, and sites started with :data:`SITE_ENV`.

    Both are undone afterwards, so a later in-process federation (tests, the inline engine) logs as before.
    A level the user set (``WSI_FL_LOG_LEVEL``, ``FLWR_LOG_LEVEL``) is kept: it is theirs, for every process.
    """
    flwr_logger = logging.getLogger("flwr")
    drop = _DropRunSimulationDeprecation()
    ours = {key: value for key, value in SITE_ENV.items() if key not in os.environ}
    os.environ.update(ours)
    flwr_logger.addFilter(drop)
    try:
        yield
    finally:
        flwr_logger.removeFilter(drop)
        for key in ours:
            os.environ.pop(key, None)


def simulate(cohort: str | Path, cfg: FedConfig, *, cpus_per_site: float = 1.0) -> FedResult:
    """Run ``cfg`` over the cohort's sites in the simulation engine; returns the server's result.

    ``min-available-nodes`` is capped at the number of sites (all of them are
    connected from the start). Raises what the server raised, e.g. a
    :class:`~wsi_fl.server.loop.FederationError` when sites disagree on features.
    """
    check_secagg_config(cfg)  # a one-line error before the engine starts
    for key, value in {**OFFLINE_ENV, **RAY_ENV}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", str(Path(cfg.out_dir) / ".flwr"))
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from wsi_fl.site.app import make_client_app

    client_app = make_client_app(Path(cohort).resolve())
    configure_logging()  # the server's line per round (INFO, unless the user set WSI_FL_LOG_LEVEL)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per round comes from wsi_fl.server instead
    sites = discover_cohort(cohort)
    cfg = replace(cfg, min_available_nodes=min(cfg.min_available_nodes, len(sites)))
    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = (run_secagg_server if cfg.secagg else run_server)(grid, cfg)
        except BaseException as err:  # handed back to the caller below, not swallowed by the engine's thread
            outcome["error"] = err
            raise

    backend = {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(os.cpu_count() or 1, 1), "include_dashboard": False}}
    with _quiet_engine():
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites),
                       backend_config=backend)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "result" not in outcome:
        raise RuntimeError("the simulation ended without a result (see Flower's log above)")
    return outcome["result"]  # type: ignore[return-value]
