"""OpenAI's API: /v1/completions, /v1/chat/completions (JSON or SSE), /v1/models, /v1/models/{id}.

Request bodies are sim.lab.server.schemas models, validated off the event loop (ServerState.job).
Streams are one `data: {...}` event per token and per choice end, usage last when asked
(stream_options.include_usage), then `data: [DONE]`; the events waiting when the handler wakes
go out in one write; an error after the stream started is sent as
a `data: {"error": ...}` event. vLLM's return_token_ids adds each choice's token ids.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sim.lab.server import schemas
from sim.lab.server.errors import ApiError
from sim.lab.server.jobs import Job
from sim.lab.server.state import Disconnected, ServerState, answer, request_id, usage


def router(state: ServerState) -> APIRouter:
    """The /v1 routes over state."""
    r = APIRouter()

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "servesim",
                "root": state.model_name, "max_model_len": state.context_len,
                "servesim_engine": state.engine_cfg.name, "servesim_scheduler": state.engine_cfg.scheduler}

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in state.model_names]}

    @r.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.builder.check_model(model_id)
        return model_card(model_id)

    @r.post("/v1/completions", openapi_extra=_body_schema(schemas.CompletionRequest))
    async def completions(http: HttpRequest):
        return await serve(http, state, await state.job(http, "completion"))

    @r.post("/v1/chat/completions", openapi_extra=_body_schema(schemas.ChatCompletionRequest))
    async def chat_completions(http: HttpRequest):
        return await serve(http, state, await state.job(http, "chat"))

    return r


def _body_schema(model) -> dict:
    """The request body in the OpenAPI document (the handler validates it itself, off the event loop)."""
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}}


async def serve(http: HttpRequest, state: ServerState, job: Job) -> Response:
    """Admit the job's choices, then answer as JSON or SSE."""
    rid = request_id("chatcmpl" if job.chat else "cmpl")
    return await answer(
        http, state, job, rid,
        lambda subs, queue, watcher: StreamingResponse(_sse(state, job, subs, queue, rid, watcher),
                                                       media_type="text/event-stream",
                                                       headers={"Cache-Control": "no-cache"}),
        lambda subs, queue: _complete(state, job, subs, queue, rid))


async def _complete(state: ServerState, job: Job, subs, queue, rid: str) -> Response:
    """Non-streaming: gather every choice, answer once."""
    texts = {s.index: [] for s in subs}
    tokens = {s.index: [] for s in subs}
    finish: dict[int, str] = {}
    async for i, delta, ids, reason in state.choices(job, subs, queue):
        texts[i].append(delta)
        tokens[i] += ids
        if reason is not None:
            finish[i] = reason
    choices = []
    for i in sorted(texts):
        text = "".join(texts[i])
        c = ({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish[i]} if job.chat else
             {"index": i, "text": text, "logprobs": None, "finish_reason": finish[i]})
        if job.return_token_ids:
            c["token_ids"] = tokens[i]
        choices.append(c)
    return JSONResponse({"id": rid, "object": "chat.completion" if job.chat else "text_completion",
                         "created": int(time.time()), "model": job.model, "choices": choices,
                         "usage": usage(job, tokens)})


async def _sse(state: ServerState, job: Job, subs, queue, rid: str, watcher: asyncio.Task):
    """Streaming: one event per token and per choice end, usage last if asked, then [DONE]."""
    created = int(time.time())
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    tokens = {s.index: [] for s in subs}

    def event(choices: list[dict], **extra) -> str:
        d = {"id": rid, "object": obj, "created": created, "model": job.model, "choices": choices}
        if job.include_usage:
            d["usage"] = None
        d.update(extra)
        return f"data: {json.dumps(d, separators=(',', ':'))}\n\n"

    # A token's event is the hot path (one per token per stream): a template with the text escaped by
    # json.dumps, the same JSON as event([choice(i, text, ids, None)]) at a seventh of its cost.
    head = (f'data: {{"id":{json.dumps(rid)},"object":"{obj}","created":{created},"model":{json.dumps(job.model)},'
            '"choices":[{"index":')
    text_key, text_end = ('"delta":{"content":', "}") if job.chat else ('"text":', "")
    usage_null = ',"usage":null' if job.include_usage else ""

    def token_event(i: int, text: str, ids: list[int]) -> str:
        ids_part = f',"token_ids":{ids}' if job.return_token_ids else ""
        return (f'{head}{i},{text_key}{json.dumps(text)}{text_end},"logprobs":null,"finish_reason":null{ids_part}}}]'
                f'{usage_null}}}\n\n')

    def choice(i: int, text: str, ids: list[int], reason: str | None) -> dict:
        if job.chat:
            c = {"index": i, "delta": {"content": text} if reason is None or text else {}, "logprobs": None,
                 "finish_reason": reason}
        else:
            c = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        if job.return_token_ids:
            c["token_ids"] = ids
        return c

    try:
        if job.chat:
            for s in subs:
                yield event([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        try:
            async for batch in state.choice_batches(job, subs, queue):
                out = []
                for i, delta, ids, reason in batch:
                    tokens[i] += ids
                    if reason is None:
                        out.append(token_event(i, delta, ids))
                        continue
                    if delta or ids:  # the last token's text, then the end on its own
                        out.append(token_event(i, delta, ids))
                        delta, ids = "", []
                    out.append(event([choice(i, delta, ids, reason)]))
                yield "".join(out)  # one socket write for what was waiting
        except Disconnected:
            return
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        if job.include_usage:
            yield event([], usage=usage(job, tokens))
        yield "data: [DONE]\n\n"
    finally:
        state.release(subs, watcher)
