"""`servesim serve`: one engine of an experiment behind OpenAI's and Ollama's HTTP APIs.

One job per module:
    app.py            the FastAPI app, /health, /metrics, GracefulServer (drain on shutdown)
    openai_routes.py  /v1/completions, /v1/chat/completions, /v1/models[/{id}]
    ollama_routes.py  /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version
    schemas.py        request bodies (pydantic)
    jobs.py           body -> Job: validation, limits, tokenization (off the event loop)
    state.py          what handlers share; admit, stream choices, release, drain
    engine_loop.py    the engine thread; building the engine; compiling every step shape before serving
    metrics.py        prometheus_client metrics under vLLM's names
    limits.py         ServerLimits, the API key and the body limit
    errors.py         OpenAI- and Ollama-shaped errors for everything, framework errors included
"""
from sim.lab.server.app import GracefulServer, create_app
from sim.lab.server.engine_loop import build_engine
from sim.lab.server.limits import ServerLimits

__all__ = ["GracefulServer", "ServerLimits", "build_engine", "create_app"]
