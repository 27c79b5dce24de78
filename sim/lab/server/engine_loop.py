"""The engine thread: builds the engine, compiles every step shape before serving, then steps.

    HTTP (asyncio, uvicorn)                          engine thread
    handler: validated Job -> Subs      --inbox-->   scheduler.add / scheduler.abort
             await its asyncio.Queue    <--events--  Engine.step(); new tokens, finishes
                                                     (one loop.call_soon_threadsafe per step)

The engine thread owns the scheduler and every Request once submitted; the HTTP side only reads
the events it is sent and the gauges published after each step, so no lock is held while the
model runs. Admission happens in the engine thread too: a full queue (the scheduler refuses with
"server busy") is 503 with Retry-After, a request that can never fit is 400.

No compile on the serving path: the runner is built with its shape set bounded by the
scheduler's limits (max sequences, tokens and context per step; coarse prefill buckets; the
context walked at run time), the thread compiles all of runner.shapes() before it says ready
(/health is 503 until then), with JAX's persistent compilation cache when a directory is given, so
a restart reads the executables back instead of compiling. A step whose shape was still not
compiled (a bug, or a runner built without limits) is compiled, counted in
servesim:compilations_serving_total and logged.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jax

from reference.engine import Engine
from reference.request import Outcome, Request, Status
from sim.lab.bench import make_runner
from sim.lab.server.metrics import ServerMetrics

log = logging.getLogger("servesim.server")
COMPILE_THREADS = os.cpu_count() or 1


@dataclass(frozen=True)
class StepLimits:
    """The most one step of a scheduler can hold: sequences, new tokens, context per sequence (tokens)."""

    max_seqs: int
    max_tokens: int
    max_context: int


def step_limits(scheduler) -> StepLimits:
    """Read the limits off a scheduler (continuous / orca, sequential slots, static batches)."""
    if hasattr(scheduler, "max_num_batched_tokens"):
        return StepLimits(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, scheduler.max_model_len)
    layout = scheduler.layout
    if hasattr(scheduler, "n_batch"):  # sequential: decode every slot, prompt chunks of n_batch
        return StepLimits(layout.num_slots, min(scheduler.n_batch, layout.num_slots * layout.max_len), layout.max_len)
    return StepLimits(layout.num_slots, layout.num_slots * layout.max_len, layout.max_len)  # static: whole prompts


def serving_runner_options(limits: StepLimits) -> dict:
    """ModelRunner options that bound the shape set to what the scheduler can produce.

    Decode-only steps (the hot path) keep power-of-two row buckets from 1 (a lone client pays for
    one row); a step with a prefill part has its tokens in buckets growing 4x, its decode part
    padded to max_seqs and its prefill part to 4 sequences or the most its bucket holds
    (coarse_mixed: two shapes per token bucket; a compile costs more than padding a rare step);
    the context is walked at run time (no context buckets at all). max_seqs 64, 512 tokens: 15 shapes.
    """
    return dict(min_seqs=1, min_tokens=16, max_seqs=limits.max_seqs, max_tokens=limits.max_tokens,
                max_context=limits.max_context, growth=4, dynamic_context=True, coarse_mixed=True)


def build_engine(exp, engine_name: str | None = None, *, params=None, runner_options: dict | None = None,
                 max_queue: int | None = None):
    """(Engine, EngineConfig) for one engine table of exp (the first when engine_name is None).

    The runner's shape set is bounded by the scheduler's limits (serving_runner_options), overridden
    by runner_options. max_queue bounds the wait queue of a scheduler that has no bound of its own.
    """
    cfg = exp.engine(engine_name) if engine_name else exp.engines[0]
    scheduler = cfg.build_scheduler(exp.plan(cfg))
    if max_queue and not scheduler.max_queue:
        scheduler.max_queue = max_queue
    options = {**serving_runner_options(step_limits(scheduler)), **(runner_options or {})}
    return Engine(scheduler, ServingRunner(make_runner(exp, cfg, params, **options))), cfg


class ServingRunner:
    """The runner as the engine sees it: a step that needs a compile is compiled, counted and logged."""

    def __init__(self, runner):
        self.runner = runner
        self.on_compile = None  # called with the step's shape when a compile happens on the serving path
        self.serving_compilations = 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, out) -> list[int]:
        step = self.runner.prepare(out.chunks, out.block_copies)
        if step.samples and not self.runner.is_compiled(step):
            t0 = time.perf_counter()
            self.runner.compile(step)
            self.serving_compilations += 1
            log.warning("compiled step shape %s while serving (%.2f s)", step.padded, time.perf_counter() - t0)
            if self.on_compile:
                self.on_compile(step.padded)
        return self.runner.run(step)


def enable_compilation_cache(path: str | os.PathLike | None) -> None:
    """JAX's persistent compilation cache in path (every executable, however fast it compiled)."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclass(eq=False)
class Sub:
    """One engine request serving one choice of an HTTP request."""

    req: Request
    index: int  # choice index
    events: asyncio.Queue  # shared by the choices of one HTTP request: (sub, kind, data)
    # When the engine thread sends this sub's tokens: 0 only when it finishes (a non-streamed answer without stop
    # strings), 1 every step, k > 1 the first token at once, then whenever k tokens wait, and at the end
    # (vLLM's --stream-interval: fewer events and socket writes per token, coarser arrival of tokens).
    interval: int = 1
    delivered: int = 0  # tokens already sent (engine thread)
    counted: int = 0  # tokens already counted in the metrics (engine thread)
    done: bool = False  # its last event was dispatched (event loop)
    extra: dict = field(default_factory=dict)


class EngineLoop:
    """Runs Engine.step() in a thread; requests and aborts come in through a locked inbox.

    Events to handlers, per sub: ("admitted" | "refused", reason) once, then ("tokens", [ids])
    as Sub.interval says (every step that produced some; every k tokens; or once, with all its ids,
    when it finishes), then one of ("finished", "stop" | "length" | "abort") or ("error", message). They are
    batched per loop iteration into one call_soon_threadsafe.
    """

    def __init__(self, engine: Engine, metrics: ServerMetrics, *, warmup: bool = True):
        self.engine = engine
        self.scheduler = engine.scheduler
        self.metrics = metrics
        self.gauges: tuple[int, int, float] = (0, 0, 0.0)
        self.ready = False
        self.warmup = warmup
        self.startup_compilations = 0
        self.startup_compile_s = 0.0
        self.num_shapes = 0
        # Where the engine thread's time goes (s, perf_counter), read by /metrics: steps that ran,
        # seconds inside Engine.step, seconds waiting for work.
        self.steps = 0
        self.step_s = 0.0
        self.idle_s = 0.0
        self._waiting_since: float | None = None  # perf_counter when the current wait for work began
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._live: dict[int, Sub] = {}  # id(request) -> sub; engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        runner = engine.runner
        if isinstance(runner, ServingRunner):
            runner.on_compile = lambda shape: metrics.serving_compilations.inc()

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
    def idle_now_s(self) -> float:
        """Seconds the engine thread waited for work so far, the wait under way included (a scrape in the
        middle of a wait sees it, so the idle time before a measurement is not charged to the next one)."""
        with self._cv:  # the engine thread updates both under it (a counter must never go back)
            since = self._waiting_since
            return self.idle_s + (time.perf_counter() - since if since is not None else 0.0)

    @property
    def alive(self) -> bool:
        """The engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_live(self) -> int:
        """Requests the engine holds (a read from another thread: a snapshot)."""
        return len(self._live)

    def submit(self, subs: list[Sub]) -> None:
        """Hand requests to the scheduler (all in one go: their admission events arrive together)."""
        with self._cv:
            self._inbox.append(("add", subs, ""))
            self._cv.notify()

    def abort(self, subs: list[Sub], reason: str, *, stopped: bool = False) -> None:
        """End requests early and free their KV; stopped=True: a stop string ended them (a success)."""
        with self._cv:
            self._inbox.append(("stop" if stopped else "abort", subs, reason))
            self._cv.notify()

    def abort_all(self, reason: str) -> None:
        """End every live request with an error event (shutdown past its deadline)."""
        with self._cv:
            self._inbox.append(("fail_all", [], reason))
            self._cv.notify()

    # ---- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread("servesim-engine")
        if self.warmup:
            try:
                self._compile_all()
            except Exception:  # not fatal: a shape left out compiles on first use (and is counted)
                log.exception("compiling the step shapes failed")
        self.ready = True
        while True:
            with self._cv:
                self._waiting_since = t_wait = time.perf_counter()
                while not self._inbox and not self.scheduler.has_unfinished() and not self._stopping:
                    self._cv.wait()
                self.idle_s += time.perf_counter() - t_wait
                self._waiting_since = None
                if self._stopping:
                    break
                ops, self._inbox = self._inbox, []
            events: list[tuple] = []
            stepped = False
            try:
                for kind, subs, reason in ops:
                    if kind == "add":
                        self._add(subs, events)
                    elif kind == "fail_all":
                        self._fail_all(reason, events)
                    else:
                        self._abort(subs, reason, events, stopped=kind == "stop")
                stepped = self._step(events) if self.scheduler.has_unfinished() else False
                self._publish()
            except Exception:  # keep serving; _step already fails the requests of a failed step
                log.exception("engine loop error")
            self._send(events)
            if not stepped and not ops and self.scheduler.has_unfinished():
                with self._cv:  # nothing could be scheduled: wait for a change instead of spinning
                    t_wait = time.perf_counter()
                    self._cv.wait(0.001)
                    self.idle_s += time.perf_counter() - t_wait
        events = []
        self._fail_all("server shutting down", events)
        self._publish()
        self._send(events)

    def _compile_all(self) -> None:
        """Compile every step shape the runner can meet (a runner without shape limits: none)."""
        runner = self.engine.runner
        try:
            shapes = runner.shapes()
        except Exception:  # no limits: shapes compile as they come (and are counted)
            log.warning("the runner's shape set is unbounded: shapes compile on first use")
            return
        self.num_shapes = len(shapes)
        t0 = time.perf_counter()
        # XLA compiles with the GIL released: one compile per core at a time.
        with ThreadPoolExecutor(max_workers=max(1, min(COMPILE_THREADS, len(shapes)))) as pool:
            for i, compiled in enumerate(pool.map(runner.compile_shape, shapes)):
                self.startup_compilations += bool(compiled)
                if (i + 1) % 10 == 0 or i + 1 == len(shapes):
                    log.info("compiled %d of %d step shapes (%.1f s)", i + 1, len(shapes), time.perf_counter() - t0)
        self.startup_compile_s = time.perf_counter() - t0

    def _add(self, subs: list[Sub], events: list) -> None:
        now = self.engine.now()
        for sub in subs:
            try:
                ok = self.scheduler.add(sub.req, now)
            except Exception as e:  # a scheduler bug must not stop the thread
                log.exception("scheduler.add failed")
                self.metrics.errors.inc()
                events.append((sub, "error", f"scheduler error: {type(e).__name__}"))
                continue
            if ok:
                self._live[id(sub.req)] = sub
                events.append((sub, "admitted", ""))
            else:
                self.metrics.refused("busy" if is_busy(sub.req.reason) else "invalid")
                events.append((sub, "refused", sub.req.reason))

    def _abort(self, subs: list[Sub], reason: str, events: list, *, stopped: bool = False) -> None:
        now = self.engine.now()
        for sub in subs:
            if id(sub.req) not in self._live or sub.req.status is Status.FINISHED:
                continue
            self.scheduler.abort(sub.req, now, Outcome.ABORTED, reason)
            self._finish(sub, events, stopped=stopped)

    def _fail_all(self, reason: str, events: list) -> None:
        now = self.engine.now()
        for sub in list(self._live.values()):
            if sub.req.status is not Status.FINISHED:
                self.scheduler.abort(sub.req, now, Outcome.ABORTED, reason)
            self._live.pop(id(sub.req), None)
            self.metrics.aborted.inc()
            events.append((sub, "error", reason))

    def _step(self, events: list) -> bool:
        """One engine step; queue the new tokens and finishes. True if a step ran."""
        try:
            t0 = time.perf_counter()
            record = self.engine.step()
            self.step_s += time.perf_counter() - t0
            self.steps += record is not None
        except Exception as e:  # never take the server down: fail what was in flight, free its KV
            log.exception("engine step failed")
            now = self.engine.now()
            for sub in list(self._live.values()):
                if sub.req.status is not Status.FINISHED:
                    self.scheduler.abort(sub.req, now, Outcome.ABORTED, f"engine error: {type(e).__name__}")
                self._live.pop(id(sub.req), None)
                self.metrics.errors.inc()
                events.append((sub, "error", f"engine error: {type(e).__name__}"))
            return True
        m = self.metrics
        generated = 0
        for sub in list(self._live.values()):
            req = sub.req
            n = req.num_output_tokens
            if n > sub.counted:
                if sub.counted == 0:
                    m.prompt_tokens.inc(req.num_prompt_tokens)
                    m.ttft.observe(req.first_token_time - req.arrival_time)
                generated += n - sub.counted
                sub.counted = n
            finished = req.status is Status.FINISHED
            # Each event wakes the handler on the event loop (and a stream's costs a socket write): a
            # non-streamed answer without stop strings gets one at the end, a stream one per `interval` tokens.
            waiting = n - sub.delivered
            if waiting > 0 and (finished or (sub.interval and (sub.delivered == 0 or waiting >= sub.interval))):
                events.append((sub, "tokens", req.output_token_ids[sub.delivered:n]))
                sub.delivered = n
            if finished:
                self._finish(sub, events)
        if generated:
            m.generation_tokens.inc(generated)  # once per step: the counter takes a lock per call
        return record is not None

    def _finish(self, sub: Sub, events: list, *, stopped: bool = False) -> None:
        req = sub.req
        self._live.pop(id(req), None)
        if req.outcome is Outcome.COMPLETED or stopped:
            last = req.output_token_ids[-1] if req.output_token_ids else None
            why = "stop" if stopped or last in req.sampling.stop_token_ids else "length"
            self.metrics.success(why)
            self.metrics.e2e.observe(req.finish_time - req.arrival_time)
        else:
            why = "abort"
            self.metrics.aborted.inc()
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


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (at most 15 bytes) in the OS, where Python's threading names it only for
    Python: top -H, py-spy and /proc/PID/task/TID/comm then tell the engine thread from XLA's. Linux only;
    elsewhere nothing happens."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def is_busy(reason: str) -> bool:
    """The scheduler refused for lack of queue room (503), not because the request cannot fit (400)."""
    return reason.startswith("server busy")
