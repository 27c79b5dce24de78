"""Ollama's native API over any engine: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version.

Field names are Ollama's (options.num_predict, temperature, top_k, top_p, seed, stop; stream defaults
to true), so the official `ollama` client works unchanged. Streams are NDJSON: one object per
token with done=false, then one with done=true, done_reason ("stop" | "length") and the counts and
durations (ns) Ollama reports. Errors are {"error": message} (404 for an unknown model, as Ollama).
A request with no prompt (generate) or no messages (chat) is Ollama's "load the model" call:
answered done_reason "load" at once.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from importlib import metadata

import jax
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sim.lab.server import schemas
from sim.lab.server.errors import ApiError
from sim.lab.server.jobs import Job
from sim.lab.server.limits import read_body
from sim.lab.server.state import Disconnected, ServerState, answer, request_id

NDJSON = "application/x-ndjson"
_QUANT = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # GGUF's names for the weight types


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _version() -> str:
    try:
        return metadata.version("servesim")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def router(state: ServerState) -> APIRouter:
    """The /api routes over state."""
    r = APIRouter()
    cfg = state.model_cfg
    runner = state.loop.engine.runner
    modified = datetime.fromtimestamp(state.created, timezone.utc).isoformat().replace("+00:00", "Z")

    def details() -> dict:
        n = sum(int(x.size) for x in _leaves(runner.params))
        return {"parent_model": "", "format": "servesim", "family": "llama", "families": ["llama"],
                "parameter_size": f"{n / 1e6:.1f}M", "quantization_level": _QUANT.get(runner.dtype.__name__, runner.dtype.__name__)}

    def card(name: str) -> dict:
        digest = hashlib.sha256(f"{name}:{cfg.name}:{state.engine_cfg.name}".encode()).hexdigest()
        return {"name": name, "model": name, "modified_at": modified, "size": runner.weight_bytes, "digest": digest,
                "details": details()}

    @r.get("/api/version")
    async def version():
        return {"version": _version()}

    @r.get("/api/tags")
    async def tags():
        return {"models": [card(n) for n in state.model_names]}

    @r.get("/api/ps")
    async def ps():
        return {"models": [dict(card(n), expires_at="2999-01-01T00:00:00Z", size_vram=0,
                                context_length=state.context_len) for n in state.model_names]}

    @r.post("/api/show", openapi_extra=_body_schema(schemas.ShowRequest))
    async def show(http: HttpRequest):
        req = state.builder.parse(await read_body(http, state.limits.max_body_bytes), schemas.ShowRequest,
                                  "/api/show")
        name = state.builder.check_model(req.model or req.name)
        info = {"general.architecture": "llama", "general.parameter_count": sum(int(x.size) for x in
                                                                                _leaves(runner.params)),
                "llama.context_length": state.context_len, "llama.embedding_length": cfg.hidden_size,
                "llama.block_count": cfg.num_layers, "llama.attention.head_count": cfg.num_heads,
                "llama.attention.head_count_kv": cfg.num_kv_heads, "llama.vocab_size": cfg.vocab_size,
                "servesim.engine": state.engine_cfg.name, "servesim.scheduler": state.engine_cfg.scheduler}
        return {"modelfile": f"# servesim: preset {cfg.name}, random weights\nFROM {name}\n",
                "parameters": f"num_ctx {state.context_len}",
                "template": "<s><|system|>{{ .System }}<|end|><|user|>{{ .Prompt }}<|end|><|assistant|>",
                "details": details(), "model_info": info, "capabilities": ["completion"], "modified_at": modified}

    @r.post("/api/generate", openapi_extra=_body_schema(schemas.GenerateRequest))
    async def generate(http: HttpRequest):
        return await _serve(http, state, await state.job(http, "generate"), chat=False)

    @r.post("/api/chat", openapi_extra=_body_schema(schemas.OllamaChatRequest))
    async def chat(http: HttpRequest):
        return await _serve(http, state, await state.job(http, "ollama_chat"), chat=True)

    return r


def _leaves(tree) -> list:
    return jax.tree_util.tree_leaves(tree)


def _body_schema(model) -> dict:
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}}


def _piece(job: Job, text: str, chat: bool) -> dict:
    d = {"model": job.model, "created_at": _now_iso()}
    if chat:
        d["message"] = {"role": "assistant", "content": text}
    else:
        d["response"] = text
    d["done"] = False
    return d


async def _serve(http: HttpRequest, state: ServerState, job: Job, chat: bool) -> Response:
    if not job.prompts:  # Ollama's "load the model": nothing to generate
        d = {"model": job.model, "created_at": _now_iso()}
        d.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        return JSONResponse(dict(d, done=True, done_reason="load"))
    t0 = time.monotonic_ns()

    async def complete(subs, queue) -> Response:
        text, stats = [], {}
        async for delta, final in _events(state, job, subs, queue, t0):
            text.append(delta)
            stats = final or stats
        out = _piece(job, "".join(text), chat)
        out.update(done=True, **stats)
        return JSONResponse(out)

    return await answer(
        http, state, job, request_id("ollama"),
        lambda subs, queue, watcher: StreamingResponse(_ndjson(state, job, subs, queue, watcher, chat, t0),
                                                       media_type=NDJSON),
        complete)


async def _events(state: ServerState, job: Job, subs, queue, t0: int):
    """(text delta, None) per token, then ("", final stats) at the end."""
    first = None
    count = 0
    async for _, delta, ids, reason in state.choices(job, subs, queue):
        if ids and first is None:
            first = time.monotonic_ns()
        count += len(ids)
        if delta:
            yield delta, None
        if reason is not None:
            end = time.monotonic_ns()
            first = first or end
            yield "", {"done_reason": "length" if reason == "length" else "stop", "total_duration": end - t0,
                       "load_duration": 0, "prompt_eval_count": len(job.prompts[0]),
                       "prompt_eval_duration": first - t0, "eval_count": count, "eval_duration": end - first}


async def _ndjson(state: ServerState, job: Job, subs, queue, watcher, chat: bool, t0: int):
    try:
        async for delta, final in _events(state, job, subs, queue, t0):
            d = _piece(job, delta, chat)
            if final:
                d.update(done=True, **final)
            yield json.dumps(d, separators=(",", ":")) + "\n"
    except Disconnected:
        return
    except ApiError as e:
        yield json.dumps({"error": e.message}) + "\n"
    finally:
        state.release(subs, watcher)
