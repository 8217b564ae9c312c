"""The Flower ServerApp (runs beside the SuperLink): the federation's rounds, checkpoints and logs;
its run config is [tool.flwr.app.config] in federated/app/pyproject.toml (`flwr run --run-config`)."""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medsyn_site.federated.server import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, dict(context.run_config), context.run_id, context)
