"""What the handlers share, and one request's life on the HTTP side: admit, stream choices, release.

A handler builds a Job off the event loop (ServerState.job), turns it into one engine request per
choice (make_subs), waits for every choice's admission (admit: 503 busy / 400 cannot fit), then
reads token events (choices) and answers in its API's shape. A client that goes away has its
requests aborted (watch_disconnect), freeing their KV. On shutdown, drain() refuses new requests,
lets open ones run for limits.drain_s, then ends the rest with an error event.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request as HttpRequest
from fastapi.responses import Response

from reference.engine import Engine
from reference.errors import ConfigError
from reference.request import Request, SamplingParams
from reference.tokenizer import ByteTokenizer, StreamDecoder, TextStream
from sim.lab.server.engine_loop import EngineLoop, Sub, is_busy
from sim.lab.server.errors import ApiError
from sim.lab.server.jobs import Job, JobBuilder
from sim.lab.server.limits import RETRY_AFTER_S, ServerLimits, read_body
from sim.lab.server.metrics import ServerMetrics


class Disconnected(Exception):
    """The client went away."""


class ServerState:
    """The engine loop, the tokenizer, the served model's names and context, the limits and metrics."""

    def __init__(self, engine: Engine, engine_cfg, model_names: list[str], limits: ServerLimits, *,
                 warmup: bool = True, stream_interval: int = 1):
        if not isinstance(stream_interval, int) or isinstance(stream_interval, bool) or stream_interval < 1:
            raise ConfigError("stream_interval", f"must be an integer >= 1 (tokens per stream event), "
                                                 f"got {stream_interval!r}")
        self.stream_interval = stream_interval
        self.engine_cfg = engine_cfg
        self.model_names = model_names
        self.limits = limits
        self.tokenizer = ByteTokenizer(engine.runner.cfg.vocab_size)
        self.model_cfg = engine.runner.cfg
        self.context_len = min(engine_cfg.context_len, engine.runner.cfg.max_position)
        self.metrics = ServerMetrics(model_names[0])
        self.loop = EngineLoop(engine, self.metrics, warmup=warmup)
        self.metrics.watch(self.loop)
        self.builder = JobBuilder(model_names, self.tokenizer, self.context_len, limits)
        self.created = int(time.time())
        self.draining = False

    @property
    def model_name(self) -> str:
        """The primary served name (the first --served-model-name)."""
        return self.model_names[0]

    async def job(self, http: HttpRequest, api: str) -> Job:
        """Read the body (size-capped) and build the Job in a worker thread; 503 while draining."""
        if self.draining:
            raise ApiError(503, "server shutting down", None, code="server_shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        raw = await read_body(http, self.limits.max_body_bytes)
        build = {"completion": lambda: self.builder.openai(raw, False), "chat": lambda: self.builder.openai(raw, True),
                 "generate": lambda: self.builder.ollama(raw, False),
                 "ollama_chat": lambda: self.builder.ollama(raw, True)}[api]
        return await asyncio.to_thread(build)

    def make_subs(self, job: Job, rid: str, queue: asyncio.Queue) -> list[Sub]:
        """One engine request per (prompt, choice); choice i samples with seed + i."""
        now = self.loop.engine.now()
        subs = []
        for p, prompt in enumerate(job.prompts):
            for j in range(job.n):
                i = p * job.n + j
                sp = dict(job.sampling)
                if sp["seed"] is not None:
                    sp["seed"] = (sp["seed"] + i) % (1 << 32)  # the next seeds of a range that starts in it
                req = Request(f"{rid}-{i}", list(prompt), SamplingParams(max_tokens=job.max_tokens[p], **sp),
                              arrival_time=now)
                # Stop strings are matched as text arrives: every step's tokens, so the request ends at
                # once; a stream's tokens go out every stream_interval tokens; else all at the end.
                interval = 1 if job.stop else self.stream_interval if job.stream else 0
                subs.append(Sub(req, i, queue, interval=interval))
        return subs

    async def admit(self, job: Job, subs: list[Sub], queue: asyncio.Queue) -> None:
        """Wait for every choice's admission; ApiError 503 (busy) or 400 (cannot fit) if one was refused."""
        self.loop.submit(subs)
        pending, refused, errors = len(subs), [], []
        while pending:
            sub, kind, data = await queue.get()
            if kind == "disconnect":
                raise Disconnected()
            pending -= 1
            if kind == "refused":
                refused.append((sub, data))
            elif kind == "error":
                errors.append(data)
        if not refused and not errors:
            return
        self.loop.abort([s for s in subs if not s.done], "another choice was refused")
        if errors:
            raise ApiError(500, errors[0], None)
        sub, reason = refused[0]
        if is_busy(reason):
            raise ApiError(503, reason, None, code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        n = sub.req.num_prompt_tokens
        param = ("messages" if job.chat and job.api == "chat" else "prompt") if n >= self.context_len \
            else job.max_tokens_param
        raise ApiError(400, f"{param}: the prompt has {n} tokens and {job.max_tokens_param} is "
                            f"{sub.req.sampling.max_tokens}; the server refused it: {reason}", param)

    async def choices(self, job: Job, subs: list[Sub], queue: asyncio.Queue):
        """Async iterator of (index, text delta, token ids, finish_reason or None) until every choice ends: one
        per token with stop strings, else one per event the engine thread sent (its ids and their text)."""
        async for batch in self.choice_batches(job, subs, queue):
            for item in batch:
                yield item

    async def choice_batches(self, job: Job, subs: list[Sub], queue: asyncio.Queue):
        """Async iterator of lists of (index, text delta, token ids, finish_reason or None): each list is
        every event that was waiting when the handler woke (one step's tokens, or more when the event
        loop fell behind), so a stream writes them to its socket at once instead of one write per token."""
        # Without stop strings there is nothing to hold back or cut: the ids' text in one piece per event (a
        # non-streamed answer's 100 tokens are one decode, not 100 deltas); with them, token by token.
        streams = {id(s): TextStream(self.tokenizer, job.stop) if job.stop else StreamDecoder(self.tokenizer)
                   for s in subs}
        ended: set[int] = set()
        while len(ended) < len(subs):
            batch = []
            sub, kind, data = await queue.get()
            while True:
                if kind == "disconnect":
                    raise Disconnected()
                if id(sub) in ended:  # tokens that came after a stop string, and the abort's finish (or error)
                    pass
                elif kind == "error":
                    if batch:
                        yield batch
                    raise ApiError(500 if not data.startswith("server shutting down") else 503, data, None)
                else:
                    ts = streams[id(sub)]
                    if not job.stop:
                        if kind == "tokens":
                            batch.append((sub.index, "".join(map(ts.push, data)), list(data), None))
                        elif kind == "finished":
                            ended.add(id(sub))
                            batch.append((sub.index, ts.flush(), [], data))
                    elif kind == "tokens":
                        for tid in data:
                            delta = ts.push(tid)
                            if ts.stopped:
                                ended.add(id(sub))
                                self.loop.abort([sub], "stop string", stopped=True)
                                batch.append((sub.index, delta, [tid], "stop"))
                                break
                            batch.append((sub.index, delta, [tid], None))
                    elif kind == "finished":
                        ended.add(id(sub))
                        batch.append((sub.index, ts.finish(), [], data))
                if len(ended) == len(subs) or queue.empty():
                    break
                sub, kind, data = queue.get_nowait()
            if batch:
                yield batch

    def release(self, subs: list[Sub], watcher: asyncio.Task) -> None:
        """The answer is done (or abandoned): abort whatever still runs, stop watching the connection."""
        live = [s for s in subs if not s.done]
        if live:
            self.loop.abort(live, "request ended")
        watcher.cancel()

    async def drain(self) -> None:
        """Refuse new requests, let open ones finish for limits.drain_s, then end the rest with an error."""
        self.draining = True
        deadline = time.monotonic() + self.limits.drain_s
        while self.loop.num_live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.loop.num_live:
            self.loop.abort_all("server shutting down: drain deadline passed")
            end = time.monotonic() + 2.0  # let the handlers write their error events
            while self.loop.num_live and time.monotonic() < end:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)


def request_id(prefix: str) -> str:
    """An id like OpenAI's: prefix-<32 hex digits>."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def watch_disconnect(http: HttpRequest, state: ServerState, subs: list[Sub], queue: asyncio.Queue) -> None:
    """Abort the choices still running once the client disconnects (or the response is complete)."""
    try:
        while (await http.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the connection is gone either way
        pass
    live = [s for s in subs if not s.done]
    if live:
        state.loop.abort(live, "client disconnected")
    queue.put_nowait((None, "disconnect", None))


async def answer(http: HttpRequest, state: ServerState, job: Job, rid: str, stream, complete) -> Response:
    """Admit the job's choices, then answer through stream(subs, queue, watcher) (a streaming response that
    releases them when it ends) or await complete(subs, queue); 499 when the client left first.

    The one admission path of both APIs: every choice is aborted and the connection watcher stopped
    however the answer ends, except a stream, which does that itself when it finishes."""
    queue: asyncio.Queue = asyncio.Queue()
    subs = state.make_subs(job, rid, queue)
    watcher = asyncio.create_task(watch_disconnect(http, state, subs, queue))
    streaming = False
    try:
        try:
            await state.admit(job, subs, queue)
        except Disconnected:
            return Response(status_code=499)
        if job.stream:
            streaming = True
            return stream(subs, queue, watcher)
        try:
            return await complete(subs, queue)
        except Disconnected:
            return Response(status_code=499)
    finally:
        if not streaming:
            state.release(subs, watcher)


def usage(job: Job, tokens: dict[int, list[int]]) -> dict:
    """OpenAI's usage object."""
    prompt = sum(len(p) for p in job.prompts)  # once per prompt, whatever n (as OpenAI counts)
    completion = sum(len(t) for t in tokens.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
