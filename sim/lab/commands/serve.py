"""`servesim serve CONFIG`: one engine of an experiment behind an OpenAI-compatible HTTP API (sim.lab.server)."""
from __future__ import annotations

from pathlib import Path

import click
import uvicorn

from sim.lab.experiment import load_experiment
from sim.lab.server import create_app


@click.command("serve")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--engine", "engine_name", default=None, help="Engine table of CONFIG to serve (default: the first).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--model-name", default=None, help="Model id clients must send (default: the config's model preset).")
@click.option("--no-warmup", is_flag=True, help="Skip compiling the smallest step shapes before serving.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn log level.")
def command(config: Path, engine_name: str | None, host: str, port: int, model_name: str | None,
            no_warmup: bool, log_level: str) -> None:
    """Serve CONFIG's model with one of its engines: /v1/completions, /v1/chat/completions, /metrics.

    The OpenAI client works unchanged: OpenAI(base_url="http://HOST:PORT/v1", api_key="x").
    Drive it with the experiment's workload: servesim bench CONFIG --url http://HOST:PORT/v1
    """
    exp = load_experiment(config)
    app = create_app(exp, engine_name, warmup=not no_warmup, model_name=model_name)
    state = app.state.servesim
    click.echo(f"servesim: model {state.model_name!r}, engine {state.engine_cfg.name!r} "
               f"({state.engine_cfg.scheduler}), context {state.context_len} tokens, "
               f"on http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
