"""`servesim serve CONFIG`: one engine of an experiment behind OpenAI's and Ollama's HTTP APIs (sim.lab.server)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import click
import uvicorn

from reference.errors import ConfigError
from sim.lab.experiment import load_experiment
from sim.lab.server import GracefulServer, ServerLimits, create_app

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "servesim", "jax")
# XNNPACK's matmuls: a one-client decode step (matrix x vector) 3x faster than XLA's default Eigen path on
# this CPU, no slower at 16 sequences (experiments/benchmarks/engine_speed.py).
DEFAULT_XLA_FLAGS = "--xla_cpu_use_xnnpack=true"
MATMUL_DTYPES = ("float32", "bfloat16")  # ModelRunner matmul_dtype (reference.runner)


@click.command("serve")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--engine", "engine_name", default=None, help="Engine table of CONFIG to serve (default: the first).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--served-model-name", "--model-name", "names", multiple=True,
              help="A model name clients may send (repeat for aliases, e.g. llama3.1:8b); the first is the "
                   "primary. Default: the config's model preset.")
@click.option("--api-key", default=None, envvar="SERVESIM_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 and /api (as vLLM's --api-key).")
@click.option("--max-body-bytes", default=ServerLimits.max_body_bytes, show_default=True, type=click.IntRange(1),
              help="Request bodies over this are 413.")
@click.option("--max-queue", default=ServerLimits.max_queue, show_default=True, type=click.IntRange(1),
              help="Waiting requests beyond which new ones are 503 + Retry-After (engines without their own bound).")
@click.option("--max-stop", default=ServerLimits.max_stop, show_default=True, type=click.IntRange(1),
              help="Stop strings per request.")
@click.option("--max-stop-chars", default=ServerLimits.max_stop_chars, show_default=True, type=click.IntRange(1),
              help="Characters per stop string.")
@click.option("--drain-s", default=ServerLimits.drain_s, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM/SIGINT: seconds open requests may still run before their streams end with an error.")
@click.option("--stream-interval", default=1, show_default=True, type=click.IntRange(1),
              help="A stream's tokens are sent every this many tokens (the first at once, the rest at the end): "
                   "fewer events and socket writes per token, coarser inter-token times (vLLM's --stream-interval).")
@click.option("--compilation-cache", default=DEFAULT_CACHE, show_default=True,
              help="Directory of JAX's persistent compilation cache ('' to disable): restarts skip compiling.")
@click.option("--xla-flags", default=DEFAULT_XLA_FLAGS, show_default=True,
              help="Added to XLA_FLAGS before JAX starts ('' for XLA's defaults).")
@click.option("--matmul-dtype", type=click.Choice(MATMUL_DTYPES), default=None,
              help="Run the steps on copies of the weight matrices in this dtype, laid out for XLA's CPU dots "
                   "(ModelRunner matmul_dtype; the weights held double; attention's products in it too). "
                   "bfloat16: ~1.5x faster decode at 1 and 16 clients on an avx512_bf16 CPU "
                   "(experiments/results/server16/engine_speed16.md section 7), tokens within bfloat16 rounding of the "
                   "reference. Default: off, the float32 reference weights (tokens identical to `servesim "
                   "bench` and the reference engine).")
@click.option("--no-warmup", is_flag=True, help="Do not compile the step shapes before serving (they compile on "
                                                "first use, while a request waits; counted in /metrics).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="Log level.")
def command(config: Path, engine_name: str | None, host: str, port: int, names: tuple[str, ...],
            api_key: str | None, max_body_bytes: int, max_queue: int, max_stop: int, max_stop_chars: int,
            drain_s: float, stream_interval: int, compilation_cache: str, xla_flags: str, matmul_dtype: str | None,
            no_warmup: bool, log_level: str) -> None:
    """Serve CONFIG's model with one of its engines.

    OpenAI: /v1/completions, /v1/chat/completions, /v1/models (OpenAI(base_url="http://HOST:PORT/v1")).
    Ollama: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version (ollama.Client("http://HOST:PORT")).
    /health is 200 once every step shape is compiled; /metrics has vLLM's metric names.
    Drive it with the experiment's workload: servesim bench CONFIG --url http://HOST:PORT/v1
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if xla_flags:  # read once, when JAX's CPU backend starts (the first computation, below)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
    exp = load_experiment(config)
    try:
        limits = ServerLimits(max_body_bytes=max_body_bytes, max_queue=max_queue, max_stop=max_stop,
                              max_stop_chars=max_stop_chars, drain_s=drain_s, api_key=api_key)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    app = create_app(exp, engine_name, warmup=not no_warmup, model_names=list(names) or None, limits=limits,
                     compilation_cache=compilation_cache or None, stream_interval=stream_interval,
                     runner_options={"matmul_dtype": matmul_dtype} if matmul_dtype else None)
    state = app.state.servesim
    runner = state.loop.engine.runner
    click.echo(f"servesim: model {state.model_names!r}, engine {state.engine_cfg.name!r} "
               f"({state.engine_cfg.scheduler}), context {state.context_len} tokens, "
               f"{len(runner.shapes()) if not no_warmup else 'no'} step shapes to compile, weights "
               f"{runner.weight_bytes / 1e6:.0f} MB ({_matmul_copies(runner)}), "
               f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, on http://{host}:{port} (/v1 OpenAI, /api Ollama)")
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=log_level), state)
    server.run()


def _matmul_copies(runner) -> str:
    """What the weights held are, for the start-up line: the reference weights, or those and the matmul copies."""
    if not runner.matmul_dtype:
        return "no matmul copies"
    return f"of which {runner.matmul_copy_bytes / 1e6:.0f} MB {runner.matmul_dtype} matmul copies"
