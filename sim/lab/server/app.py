"""The FastAPI app: one engine of an experiment behind OpenAI's API and Ollama's, plus /health and /metrics.

    /v1/...   OpenAI (sim.lab.server.openai_routes)      /api/...  Ollama (sim.lab.server.ollama_routes)
    /health   200 once every step shape is compiled      /metrics  Prometheus text, vLLM's names

The engine thread starts with the app (lifespan) and compiles its shape set before /health says
ready. GracefulServer is uvicorn's server with a drain on shutdown: new requests are 503, open
ones run for limits.drain_s, then their streams end with an error event.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from sim.lab.server import errors, ollama_routes, openai_routes
from sim.lab.server.engine_loop import build_engine, enable_compilation_cache
from sim.lab.server.limits import GuardMiddleware, ServerLimits
from sim.lab.server.metrics import CONTENT_TYPE
from sim.lab.server.state import ServerState


def create_app(exp, engine_name: str | None = None, *, params=None, warmup: bool = True,
               runner_options: dict | None = None, model_names: list[str] | None = None,
               model_name: str | None = None, limits: ServerLimits | None = None,
               compilation_cache: str | None = None, stream_interval: int = 1) -> FastAPI:
    """The app serving one engine of exp (the first, or engine_name) with exp's model.

    model_names: the names clients may send (aliases, e.g. "llama3.1:8b"); the first is the primary.
    Default: [model_name or the experiment's model preset]. warmup=False skips compiling the shape
    set (shapes then compile on first use, counted in servesim:compilations_serving_total).
    compilation_cache: a directory for JAX's persistent compilation cache (a restart reads it back).
    stream_interval: a stream's tokens go out every this many tokens (the first at once, the rest at the
    end), as vLLM's --stream-interval (default 1: every token as it is made).
    """
    limits = limits or ServerLimits()
    names = list(model_names or [model_name or exp.model])
    engine, cfg = build_engine(exp, engine_name, params=params, runner_options=runner_options,
                               max_queue=limits.max_queue)
    enable_compilation_cache(compilation_cache)  # before the engine thread compiles, after bad input is refused
    state = ServerState(engine, cfg, names, limits, warmup=warmup, stream_interval=stream_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.loop.stop)

    app = FastAPI(title="servesim", lifespan=lifespan)
    app.state.servesim = state
    app.add_middleware(GuardMiddleware, limits=limits)
    errors.install(app)

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not state.loop.ready:
            return JSONResponse({"status": "compiling step shapes", "compiled": state.loop.startup_compilations,
                                 "shapes": state.loop.num_shapes}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    app.include_router(openai_routes.router(state))
    app.include_router(ollama_routes.router(state))
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining the app's open requests (ServerState.drain) before it closes connections."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.servesim_state = state

    async def shutdown(self, sockets=None):
        await self.servesim_state.drain()
        await super().shutdown(sockets)
