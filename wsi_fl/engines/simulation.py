"""Federated training of every site of a cohort directory on this machine, with Flower's simulation engine.

Each site of the cohort (:func:`wsi_fl.site.data.discover_cohort`) becomes one
virtual SuperNode running the real ClientApp; the real ServerApp runs the
rounds. What crosses between them is exactly what crosses a hospital's
firewall in deployment (weights and aggregate counts), so a simulation is a
faithful rehearsal. Nothing reaches the internet: Flower's telemetry, update
checks and runtime dependency installation are switched off here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from wsi_fl._logging import configure_logging
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.loop import FedResult, run_server
from wsi_fl.server.secagg import check_secagg_config, run_secagg_server
from wsi_fl.site.data import discover_cohort

#: Flower environment for an offline hospital network (also set by scripts/run_local_federation.py).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def simulate(cohort: str | Path, cfg: FedConfig, *, cpus_per_site: float = 1.0) -> FedResult:
    """Run ``cfg`` over the cohort's sites in the simulation engine; returns the server's result.

    ``min-available-nodes`` is capped at the number of sites (all of them are
    connected from the start). Raises what the server raised, e.g. a
    :class:`~wsi_fl.server.loop.FederationError` when sites disagree on features.
    """
    check_secagg_config(cfg)  # a one-line error before the engine starts
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", str(Path(cfg.out_dir) / ".flwr"))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU sites: silences Ray's FutureWarning
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from wsi_fl.site.app import make_client_app

    configure_logging()
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
    run_simulation(server_app=server_app, client_app=make_client_app(Path(cohort).resolve()),
                   num_supernodes=len(sites), backend_config=backend)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "result" not in outcome:
        raise RuntimeError("the simulation ended without a result (see Flower's log above)")
    return outcome["result"]  # type: ignore[return-value]
