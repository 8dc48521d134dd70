"""The Flower ServerApp: reads the run config (``[tool.flwr.app.config]``) and runs :func:`.loop.run_server`.

``flwr run .`` and the simulation engine load ``app`` from here (see
``pyproject.toml``); :func:`make_server_app` lets the Python API pass a
configuration directly, since ``flwr.simulation.run_simulation`` hands the
ServerApp an empty run config.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from wsi_fl._logging import configure_logging
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.loop import run_server
from wsi_fl.server.secagg import run_secagg_server


def make_server_app(cfg: FedConfig | None = None) -> ServerApp:
    """A ServerApp running ``cfg``, or the run config Flower provides when ``cfg`` is None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configure_logging()
        run_cfg = cfg if cfg is not None else FedConfig.from_run_config(context.run_config)
        (run_secagg_server if run_cfg.secagg else run_server)(grid, run_cfg)

    return app


app = make_server_app()
