"""An OpenAI-compatible HTTP server over the reference engine (`servesim serve`).

Two loops, two threads:

    HTTP (asyncio, uvicorn)                          engine thread
    handler: parse + validate -> Requests  --inbox-->  scheduler.add / scheduler.abort
             await its asyncio.Queue       <--events-- Engine.step(); new tokens, finishes
             -> JSON or SSE chunks                     (one loop.call_soon_threadsafe per step)

The engine thread owns the scheduler and every Request once submitted; the HTTP side only
reads the events it is sent, and the gauges the engine thread publishes after each step,
so no lock is held while the model runs. Admission happens in the engine thread too, so a
handler waits for its requests' admitted/refused events before it answers: a full queue
(the scheduler refuses with "server busy") is HTTP 503 with Retry-After, a request that can
never fit (the scheduler's "exceeds ..." reasons) is HTTP 400. A client that goes away
(disconnect watcher on the ASGI receive channel) has its requests aborted, which frees
their KV slot or blocks.

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health, GET /metrics (Prometheus text, vLLM metric names).

Where this differs from the OpenAI API (documented, on purpose):
- ignore_eos defaults to true (random weights: the output runs to max_tokens unless a stop
  is hit); pass ignore_eos=false to stop at the tokenizer's </s>.
- stop strings that are one token (reference.tokenizer.ByteTokenizer.single_token: one byte
  such as "\\n" or ".") become stop token ids, so the engine itself stops; longer ones are
  matched on the decoded text here and the request is aborted in the engine when one
  appears. Either way the text ends before the stop string and finish_reason is "stop".
- n > 1 (and a list of prompts) is served as independent engine requests; with a seed, choice
  i samples with seed + i.
- logprobs, echo, suffix, penalties, logit_bias and tools are refused with 400.
- vLLM extensions accepted: top_k, ignore_eos, stop_token_ids, return_token_ids (adds the
  choice's token_ids to each response or chunk; the HTTP benchmark counts tokens with it).
- Static batching streams tokens as they are generated (the scheduler answers at batch end).
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from reference.engine import Engine
from reference.errors import ConfigError
from reference.request import Outcome, Request, SamplingParams, Status
from reference.tokenizer import ByteTokenizer, TextStream
from sim.lab.bench import make_runner

log = logging.getLogger("servesim.server")

RETRY_AFTER_S = 1  # what a 503 tells the client to wait (s)
MAX_CHOICES = 256  # n x prompts per HTTP request
MAX_STOP = 16  # stop strings per request
# vLLM's histogram buckets (s).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


# ---------------------------------------------------------------------------------------
# Building the engine from an experiment

def build_engine(exp, engine_name: str | None = None, *, params=None, runner_options: dict | None = None):
    """(Engine, EngineConfig) for one engine table of exp (the first when engine_name is None).

    The engine kind plans its KV memory and builds its scheduler as in `servesim bench`; runner_options
    go to ModelRunner (min_seqs, min_tokens, min_blocks: larger buckets mean fewer compilations).
    """
    cfg = exp.engine(engine_name) if engine_name else exp.engines[0]
    scheduler = cfg.build_scheduler(exp.plan(cfg))
    return Engine(scheduler, make_runner(exp, cfg, params, **(runner_options or {}))), cfg


# ---------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition, written by hand)

class Histogram:
    """Cumulative-bucket histogram as Prometheus exposes it (le = upper bound, inclusive)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1


@dataclass
class ServerMetrics:
    """Counters the engine thread updates (plain ints: the HTTP side only reads them)."""

    prompt_tokens: int = 0  # prompts of requests that got their first token (prefilled), each once
    generation_tokens: int = 0  # every token the engine generated for a served request
    success: dict = field(default_factory=lambda: {"stop": 0, "length": 0})
    refused: dict = field(default_factory=lambda: {"busy": 0, "invalid": 0})
    aborted: int = 0  # client went away (or server shutdown) before the end
    errors: int = 0  # requests failed by an engine exception
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


def _fmt(v: float) -> str:
    return "+Inf" if v == math.inf else repr(float(v)) if isinstance(v, float) else str(v)


def exposition(m: ServerMetrics, gauges: tuple[int, int, float], preemptions: int, model: str) -> str:
    """The /metrics body (text format 0.0.4)."""
    lab = f'model_name="{model}"'
    out: list[str] = []

    def metric(name, kind, help_, samples):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            out.append(f"{name}{suffix}{{{labels}}} {_fmt(value)}")

    def hist(name, help_, h: Histogram):
        samples, cum = [], 0
        for b, c in zip(h.buckets + (math.inf,), h.counts):
            cum += c
            samples.append(("_bucket", f'{lab},le="{_fmt(b)}"', cum))
        samples += [("_sum", lab, h.sum), ("_count", lab, h.count)]
        metric(name, "histogram", help_, samples)

    running, waiting, kv = gauges
    metric("vllm:num_requests_running", "gauge", "Requests in the running batch.", [("", lab, running)])
    metric("vllm:num_requests_waiting", "gauge", "Requests waiting (queued or preempted).", [("", lab, waiting)])
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.", [("", lab, kv)])
    metric("vllm:prompt_tokens_total", "counter", "Prompt tokens of requests that were prefilled.",
           [("", lab, m.prompt_tokens)])
    metric("vllm:generation_tokens_total", "counter", "Generated tokens.", [("", lab, m.generation_tokens)])
    metric("vllm:num_preemptions_total", "counter", "Preemptions (recompute).", [("", lab, preemptions)])
    metric("vllm:request_success_total", "counter", "Requests that finished normally.",
           [("", f'{lab},finished_reason="{k}"', v) for k, v in m.success.items()])
    metric("servesim:request_refused_total", "counter", "Requests the scheduler refused (503 busy, 400 invalid).",
           [("", f'{lab},reason="{k}"', v) for k, v in m.refused.items()])
    metric("servesim:request_aborted_total", "counter", "Requests aborted (client disconnect, shutdown).",
           [("", lab, m.aborted)])
    metric("servesim:request_error_total", "counter", "Requests failed by an engine error.", [("", lab, m.errors)])
    hist("vllm:time_to_first_token_seconds", "Time to first token (s).", m.ttft)
    hist("vllm:e2e_request_latency_seconds", "End-to-end latency of finished requests (s).", m.e2e)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# The engine thread

@dataclass(eq=False)
class _Sub:
    """One engine request serving one choice of an HTTP request."""

    req: Request
    index: int  # choice index
    events: asyncio.Queue  # shared by the choices of one HTTP request: (sub, kind, data)
    delivered: int = 0  # tokens already sent (engine thread)
    done: bool = False  # its last event was dispatched (event loop)


class EngineLoop:
    """Runs Engine.step() in a thread; requests and aborts come in through a locked inbox.

    Events to handlers, per sub: ("admitted" | "refused", reason) once, then ("tokens", [ids])
    per step that produced some, then one of ("finished", "stop" | "length" | "abort") or
    ("error", message). They are batched per loop iteration into one call_soon_threadsafe.
    """

    def __init__(self, engine: Engine, context_len: int, *, warmup: bool = True):
        """context_len: the most tokens one request may hold (tokens)."""
        self.engine = engine
        self.context_len = context_len
        self.scheduler = engine.scheduler
        self.metrics = ServerMetrics()
        self.gauges: tuple[int, int, float] = (0, 0, 0.0)
        self.ready = False
        self.warmup = warmup
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._live: dict[int, _Sub] = {}  # id(request) -> sub; engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- called from the event loop ------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; events go to loop."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="servesim-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left and end the thread (after its current step)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, subs: list[_Sub]) -> None:
        """Hand requests to the scheduler (all in one go: their admission events arrive together)."""
        with self._cv:
            self._inbox.append(("add", subs, ""))
            self._cv.notify()

    def abort(self, subs: list[_Sub], reason: str, *, stopped: bool = False) -> None:
        """End requests early and free their KV; stopped=True: a stop string ended them (a success)."""
        with self._cv:
            self._inbox.append(("stop" if stopped else "abort", subs, reason))
            self._cv.notify()

    # ---- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.warmup:
            try:
                self._warmup()
            except Exception:  # a failed warm-up is not fatal: shapes compile on first use
                log.exception("engine warm-up failed")
        self.ready = True
        while True:
            with self._cv:
                while not self._inbox and not self.scheduler.has_unfinished() and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
                ops, self._inbox = self._inbox, []
            events: list[tuple] = []
            stepped = False
            try:
                for kind, subs, reason in ops:
                    if kind == "add":
                        self._add(subs, events)
                    else:
                        self._abort(subs, reason, events, stopped=kind == "stop")
                stepped = self._step(events) if self.scheduler.has_unfinished() else False
                self._publish()
            except Exception:  # keep serving; _step already fails the requests of a failed step
                log.exception("engine loop error")
            self._send(events)
            if not stepped and not ops and self.scheduler.has_unfinished():
                with self._cv:  # nothing could be scheduled: wait for a change instead of spinning
                    self._cv.wait(0.001)
        events = []
        self._abort(list(self._live.values()), "server shutting down", events)
        self._publish()
        self._send(events)

    def _warmup(self) -> None:
        """Compile the smallest prefill and decode shapes before the first client waits for them."""
        ctx = self.context_len
        n = min(8, ctx - 2)
        if n >= 1:
            vocab = self.engine.runner.cfg.vocab_size
            self.engine.generate([[(7 * i + 11) % vocab for i in range(n)]], SamplingParams(max_tokens=2))

    def _add(self, subs: list[_Sub], events: list) -> None:
        now = self.engine.now()
        for sub in subs:
            try:
                ok = self.scheduler.add(sub.req, now)
            except Exception as e:  # a scheduler bug must not stop the thread
                log.exception("scheduler.add failed")
                self.metrics.errors += 1
                events.append((sub, "error", f"scheduler error: {e!r}"))
                continue
            if ok:
                self._live[id(sub.req)] = sub
                events.append((sub, "admitted", ""))
            else:
                self.metrics.refused["busy" if _is_busy(sub.req.reason) else "invalid"] += 1
                events.append((sub, "refused", sub.req.reason))

    def _abort(self, subs: list[_Sub], reason: str, events: list, *, stopped: bool = False) -> None:
        now = self.engine.now()
        for sub in subs:
            if id(sub.req) not in self._live or sub.req.status is Status.FINISHED:
                continue
            self.scheduler.abort(sub.req, now, Outcome.ABORTED, reason)
            self._finish(sub, events, stopped=stopped)

    def _step(self, events: list) -> bool:
        """One engine step; queue the new tokens and finishes. True if a step ran."""
        try:
            record = self.engine.step()
        except Exception as e:  # never take the server down: fail what was in flight, free its KV
            log.exception("engine step failed")
            now = self.engine.now()
            for sub in list(self._live.values()):
                if sub.req.status is not Status.FINISHED:
                    self.scheduler.abort(sub.req, now, Outcome.ABORTED, f"engine error: {e!r}")
                self._live.pop(id(sub.req), None)
                self.metrics.errors += 1
                events.append((sub, "error", f"engine error: {e!r}"))
            return True
        m = self.metrics
        for sub in list(self._live.values()):
            req = sub.req
            n = req.num_output_tokens
            if n > sub.delivered:
                if sub.delivered == 0:
                    m.prompt_tokens += req.num_prompt_tokens
                    m.ttft.observe(req.first_token_time - req.arrival_time)
                m.generation_tokens += n - sub.delivered
                events.append((sub, "tokens", req.output_token_ids[sub.delivered:n]))
                sub.delivered = n
            if req.status is Status.FINISHED:
                self._finish(sub, events)
        return record is not None

    def _finish(self, sub: _Sub, events: list, *, stopped: bool = False) -> None:
        req = sub.req
        self._live.pop(id(req), None)
        if req.outcome is Outcome.COMPLETED or stopped:
            last = req.output_token_ids[-1] if req.output_token_ids else None
            why = "stop" if stopped or last in req.sampling.stop_token_ids else "length"
            self.metrics.success[why] += 1
            self.metrics.e2e.observe(req.finish_time - req.arrival_time)
        else:
            why = "abort"
            self.metrics.aborted += 1
        events.append((sub, "finished", why))

    def _publish(self) -> None:
        s = self.scheduler
        self.gauges = (s.num_running, s.num_waiting, s.kv_usage_perc())

    def _send(self, events: list) -> None:
        if not events or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_dispatch, events)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


def _dispatch(events: list) -> None:
    for sub, kind, data in events:
        if kind in ("refused", "finished", "error"):
            sub.done = True
        sub.events.put_nowait((sub, kind, data))


def _is_busy(reason: str) -> bool:
    return reason.startswith("server busy")


# ---------------------------------------------------------------------------------------
# Request parsing and validation

class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, *,
                 type_: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, name: str, default, low: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(name, f"must be an integer, got {v!r}")
    if low is not None and v < low:
        raise _bad(name, f"must be an integer >= {low}, got {v!r}")
    return v


def _opt_float(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"must be a number, got {v!r}")
    return float(v)


def _opt_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {v!r}")
    return v


_UNSUPPORTED = (("logprobs", (None, False, 0)), ("top_logprobs", (None, 0)), ("echo", (None, False)),
                ("suffix", (None, "")), ("presence_penalty", (None, 0, 0.0)), ("frequency_penalty", (None, 0, 0.0)),
                ("logit_bias", (None, {})), ("tools", (None, [])), ("functions", (None, [])))


@dataclass
class _Job:
    """A validated HTTP request: prompts (token ids) x n choices and how to sample them."""

    chat: bool
    prompts: list[list[int]]
    n: int
    sampling: dict  # SamplingParams fields shared by every choice (seed: the base seed)
    max_tokens: list[int]  # per prompt
    max_tokens_param: str
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool


class ServerState:
    """What the handlers share: the engine loop, the tokenizer, the served model's name and context."""

    def __init__(self, engine: Engine, engine_cfg, model_name: str, *, warmup: bool = True):
        self.engine_cfg = engine_cfg
        self.model_name = model_name
        self.tokenizer = ByteTokenizer(engine.runner.cfg.vocab_size)
        self.vocab_size = engine.runner.cfg.vocab_size
        self.context_len = min(engine_cfg.context_len, engine.runner.cfg.max_position)
        self.loop = EngineLoop(engine, self.context_len, warmup=warmup)
        self.created = int(time.time())

    # ---- parsing -------------------------------------------------------------------------
    def parse(self, body, chat: bool) -> _Job:
        if not isinstance(body, dict):
            raise ApiError(400, "body: must be a JSON object", "body")
        model = body.get("model")
        if model is None or model == "":
            raise _bad("model", f"required (this server serves {self.model_name!r})")
        if model != self.model_name:
            raise ApiError(400, f"model: unknown model {model!r} (this server serves {self.model_name!r})",
                           "model", code="model_not_found")
        for name, ok in _UNSUPPORTED:
            v = body.get(name)
            if v not in ok:
                raise _bad(name, f"{_short(v)} is not supported by servesim")
        if chat and body.get("response_format") not in (None, {"type": "text"}):
            raise _bad("response_format", "only {'type': 'text'} is supported by servesim")
        tok = self.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise _bad("messages", "required: a non-empty list of {role, content} objects")
            try:
                prompts = [tok.apply_chat_template(msgs)]
            except ConfigError as e:
                raise ApiError(400, str(e), e.field) from None
        else:
            prompts = self._prompts(body.get("prompt"))
        n = _opt_int(body, "n", 1, low=1)
        if n * len(prompts) > MAX_CHOICES:
            raise _bad("n", f"{n} choices x {len(prompts)} prompts is more than {MAX_CHOICES}")
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise _bad("best_of", f"{best_of!r} is not supported by servesim (only best_of = n)")
        max_param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
            else "max_tokens"
        given = _opt_int(body, max_param, None, low=1)
        max_tokens = []
        for p in prompts:
            if given is not None:
                max_tokens.append(given)
            elif chat:  # OpenAI / vLLM: up to the context
                if len(p) >= self.context_len:
                    raise _bad("messages", f"the prompt is {len(p)} tokens; the context holds {self.context_len}")
                max_tokens.append(self.context_len - len(p))
            else:
                max_tokens.append(16)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
            raise _bad("stop", f"must be a string or a list of at most {MAX_STOP} strings, got {body.get('stop')!r}")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < self.vocab_size for t in stop_ids):
            raise _bad("stop_token_ids", f"must be a list of token ids in 0..{self.vocab_size - 1}")
        ignore_eos = _opt_bool(body, "ignore_eos", True)
        stop_ids = set(stop_ids) | {t for t in map(tok.single_token, stop) if t is not None}
        if not ignore_eos:
            stop_ids.add(tok.eos_id)
        top_k = _opt_int(body, "top_k", 0, low=-1)
        sampling = dict(temperature=_opt_float(body, "temperature", 1.0), top_p=_opt_float(body, "top_p", 1.0),
                        top_k=max(top_k, 0), seed=_opt_int(body, "seed", None),
                        stop_token_ids=tuple(sorted(stop_ids)), ignore_eos=ignore_eos)
        try:
            SamplingParams(max_tokens=max_tokens[0], **sampling)
        except ConfigError as e:
            raise ApiError(400, str(e), e.field) from None
        stream = _opt_bool(body, "stream", False)
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("stream_options", f"must be an object, got {opts!r}")
        include_usage = bool(stream and opts and _opt_bool(opts, "include_usage", False))
        return _Job(chat, prompts, n, sampling, max_tokens, max_param, stop, stream, include_usage,
                    _opt_bool(body, "return_token_ids", False))

    def _prompts(self, p) -> list[list[int]]:
        tok = self.tokenizer
        if p is None:
            raise _bad("prompt", "required: a string, a list of strings, token ids or lists of token ids")
        if isinstance(p, str):
            prompts = [tok.encode(p, add_bos=True)]
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            prompts = [p]
        elif isinstance(p, list) and p and all(isinstance(s, str) for s in p):
            prompts = [tok.encode(s, add_bos=True) for s in p]
        elif isinstance(p, list) and p and all(isinstance(x, list) and all(_is_int(t) for t in x) for x in p):
            prompts = p
        else:
            raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of "
                       f"token-id lists, got {_short(p)}")
        for i, ids in enumerate(prompts):
            if not ids:
                raise _bad("prompt", f"prompt {i} has no tokens")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise _bad("prompt", f"token id {bad} is outside the vocabulary 0..{self.vocab_size - 1}")
        return prompts

    # ---- serving -------------------------------------------------------------------------
    def make_subs(self, job: _Job, rid: str, queue: asyncio.Queue) -> list[_Sub]:
        now = self.loop.engine.now()
        subs = []
        for p, prompt in enumerate(job.prompts):
            for j in range(job.n):
                i = p * job.n + j
                sp = dict(job.sampling)
                if sp["seed"] is not None:
                    sp["seed"] = sp["seed"] + i
                req = Request(f"{rid}-{i}", list(prompt), SamplingParams(max_tokens=job.max_tokens[p], **sp),
                              arrival_time=now)
                subs.append(_Sub(req, i, queue))
        return subs

    async def admit(self, job: _Job, subs: list[_Sub], queue: asyncio.Queue) -> None:
        """Wait for every choice's admission; raise ApiError (503 busy, 400 cannot fit) if one was refused."""
        self.loop.submit(subs)
        pending, refused, errors = len(subs), [], []
        while pending:
            sub, kind, data = await queue.get()
            if kind == "disconnect":
                raise _Disconnected()
            pending -= 1
            if kind == "refused":
                refused.append((sub, data))
            elif kind == "error":
                errors.append(data)
        if not refused and not errors:
            return
        self.loop.abort([s for s in subs if not s.done], "another choice was refused")
        if errors:
            raise ApiError(500, errors[0], None, type_="server_error")
        sub, reason = refused[0]
        if _is_busy(reason):
            raise ApiError(503, reason, None, type_="server_busy", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        prompt_len = sub.req.num_prompt_tokens
        param = ("messages" if job.chat else "prompt") if prompt_len >= self.context_len else job.max_tokens_param
        raise ApiError(400, f"{param}: the prompt has {prompt_len} tokens and {job.max_tokens_param} is "
                       f"{sub.req.sampling.max_tokens}; the server refused it: {reason}", param)

    async def choices(self, job: _Job, subs: list[_Sub], queue: asyncio.Queue):
        """Async iterator of (index, text delta, token ids, finish_reason or None) until every choice ends."""
        streams = {id(s): TextStream(self.tokenizer, job.stop) for s in subs}
        ended: set[int] = set()
        while len(ended) < len(subs):
            sub, kind, data = await queue.get()
            if kind == "disconnect":
                raise _Disconnected()
            if id(sub) in ended:
                continue  # tokens that came after a stop string, and the abort's finish
            ts = streams[id(sub)]
            if kind == "tokens":
                for tid in data:
                    delta = ts.push(tid)
                    if ts.stopped:
                        ended.add(id(sub))
                        self.loop.abort([sub], "stop string", stopped=True)
                        yield sub.index, delta, [tid], "stop"
                        break
                    yield sub.index, delta, [tid], None
            elif kind == "finished":
                ended.add(id(sub))
                yield sub.index, ts.finish(), [], data
            elif kind == "error":
                raise ApiError(500, data, None, type_="server_error")


class _Disconnected(Exception):
    """The client went away."""


def _short(v, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


async def _watch_disconnect(http: HttpRequest, state: ServerState, subs: list[_Sub], queue: asyncio.Queue) -> None:
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


# ---------------------------------------------------------------------------------------
# The app

def create_app(exp, engine_name: str | None = None, *, params=None, warmup: bool = True,
               runner_options: dict | None = None, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving one engine of exp (the first, or engine_name) with exp's model.

    The engine thread starts and stops with the app (lifespan). model_name defaults to the
    experiment's model preset name; it is the only model /v1/models lists and requests may name.
    """
    engine, cfg = build_engine(exp, engine_name, params=params, runner_options=runner_options)
    state = ServerState(engine, cfg, model_name or exp.model, warmup=warmup)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.loop.stop)

    app = FastAPI(title="servesim", lifespan=lifespan)
    app.state.servesim = state

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _any_error(request, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {exc!r}", None, type_="server_error").response()

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if not state.loop.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body = exposition(state.loop.metrics, state.loop.gauges, state.loop.scheduler.num_preemptions,
                          state.model_name)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "servesim",
            "root": state.model_name, "max_model_len": state.context_len,
            "servesim_engine": state.engine_cfg.name, "servesim_scheduler": state.engine_cfg.scheduler}]}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await _serve(http, state, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await _serve(http, state, chat=True)

    return app


async def _serve(http: HttpRequest, state: ServerState, chat: bool) -> Response:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})", "body") from None
    job = state.parse(body, chat)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    queue: asyncio.Queue = asyncio.Queue()
    subs = state.make_subs(job, rid, queue)
    watcher = asyncio.create_task(_watch_disconnect(http, state, subs, queue))
    streaming = False
    try:
        try:
            await state.admit(job, subs, queue)
        except _Disconnected:
            return Response(status_code=499)
        if job.stream:
            streaming = True
            return StreamingResponse(_sse(state, job, subs, queue, rid, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(state, job, subs, queue, rid)
    finally:
        if not streaming:
            _release(state, subs, watcher)


def _release(state: ServerState, subs: list[_Sub], watcher: asyncio.Task) -> None:
    live = [s for s in subs if not s.done]
    if live:
        state.loop.abort(live, "request ended")
    watcher.cancel()


def _usage(job: _Job, tokens: dict[int, list[int]]) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(len(t) for t in tokens.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(state: ServerState, job: _Job, subs, queue, rid: str) -> Response:
    """Non-streaming: gather every choice, answer once."""
    texts = {s.index: [] for s in subs}
    tokens = {s.index: [] for s in subs}
    finish: dict[int, str] = {}
    try:
        async for i, delta, ids, reason in state.choices(job, subs, queue):
            texts[i].append(delta)
            tokens[i] += ids
            if reason is not None:
                finish[i] = reason
    except _Disconnected:
        return Response(status_code=499)
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
                         "created": int(time.time()), "model": state.model_name, "choices": choices,
                         "usage": _usage(job, tokens)})


async def _sse(state: ServerState, job: _Job, subs, queue, rid: str, watcher: asyncio.Task):
    """Streaming: one `data: {...}` event per token and per choice end, usage last if asked, then [DONE]."""
    created = int(time.time())
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    tokens = {s.index: [] for s in subs}

    def event(choices: list[dict], **extra) -> str:
        d = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choices}
        if job.include_usage:
            d["usage"] = None
        d.update(extra)
        return f"data: {json.dumps(d, separators=(',', ':'))}\n\n"

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
            async for i, delta, ids, reason in state.choices(job, subs, queue):
                tokens[i] += ids
                if reason is not None and (delta or ids):  # the last token's text, then the end on its own
                    yield event([choice(i, delta, ids, None)])
                    delta, ids = "", []
                yield event([choice(i, delta, ids, reason)])
        except _Disconnected:
            return
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        if job.include_usage:
            yield event([], usage=_usage(job, tokens))
        yield "data: [DONE]\n\n"
    finally:
        _release(state, subs, watcher)
