"""The serving loop: schedule -> execute the JAX model -> sample -> update, on a real clock.

The scheduler is the same object the simulator drives; only the clock and the executor differ.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from reference.request import Outcome, Request, SamplingParams
from reference.schedulers.base import Scheduler
from sim.costmodel import StepShape


@dataclass(frozen=True)
class StepRecord:
    """Where one step's time went (s), and the shape of its batch."""

    start: float  # s since the engine's start
    schedule_s: float
    execute_s: float  # model forward + sampling + token transfer to host
    update_s: float
    num_prefill_tokens: int  # new tokens in chunks of more than one token
    num_decode_seqs: int  # one-token chunks (the runner's decode part)
    num_seqs: int
    context_tokens: int  # sum over the batch of each sequence's context after the step
    num_preempted: int
    attn_q_ctx: int = 0  # sum over the batch of causal (query, key) pairs: n * start + n * (n + 1) / 2 per chunk
    decode_max_context: int = 0  # longest context after the step among one-token chunks
    prefill_max_context: int = 0  # longest context after the step among the other chunks

    @property
    def total_s(self) -> float:
        """Whole step, host work included (s)."""
        return self.schedule_s + self.execute_s + self.update_s


class Engine:
    """Drives a scheduler with a model runner. Times are seconds since the engine started."""

    def __init__(self, scheduler: Scheduler, runner, clock: Callable[[], float] = time.perf_counter,
                 record_steps: bool = True, exclude_compilation: bool = False):
        """exclude_compilation: when a step compiles a new shape, stop the clock for that run and time the
        step again, compiled (the step is idempotent: same K/V written, same seeded samples). The engine
        then serves as one that compiled every shape at start-up, as production engines do (vLLM captures
        its CUDA graphs before serving); the time taken out is in compile_s. For measurements, not serving."""
        self.scheduler = scheduler
        self.runner = runner
        self._clock = clock
        self._t0 = clock()
        self.steps: list[StepRecord] = []
        self.record_steps = record_steps
        self.exclude_compilation = exclude_compilation
        self.compile_s = 0.0  # s taken off the clock (exclude_compilation)

    def now(self) -> float:
        """Seconds since the engine started."""
        return self._clock() - self._t0

    def add(self, req: Request) -> bool:
        """Hand a request to the scheduler; False when refused."""
        return self.scheduler.add(req, self.now())

    def step(self) -> list[Request]:
        """Run one step; returns the requests that finished in it (empty when idle)."""
        t0 = self.now()
        out = self.scheduler.schedule(t0)
        if out.is_empty:
            return []
        t1 = self.now()
        compiled = getattr(self.runner, "num_compilations", 0)
        tokens = self.runner.execute(out.chunks, out.block_copies)
        if self.exclude_compilation and getattr(self.runner, "num_compilations", 0) != compiled:
            stalled = self.now() - t1
            self._t0 += stalled  # the clock stops: nothing else happened meanwhile
            self.compile_s += stalled
            t1 = self.now()
            tokens = self.runner.execute(out.chunks, out.block_copies)
        t2 = self.now()
        finished = self.scheduler.update(out, tokens, t2)
        if self.record_steps:
            t3 = self.now()
            s = StepShape.from_scheduler_output(out)  # the shape the simulator's cost model prices
            self.steps.append(StepRecord(
                t0, t1 - t0, t2 - t1, t3 - t2, s.prefill_tokens, s.decode_seqs, len(out.chunks), s.kv_read_tokens,
                len(out.preempted), s.attn_q_ctx, s.decode_max_context, s.prefill_max_context))
        return finished

    def generate(self, prompts: Iterable[list[int]], sampling: SamplingParams | list[SamplingParams]
                 = SamplingParams()) -> list[Request]:
        """Offline API: all prompts at once, run to completion, requests back in prompt order."""
        prompts = list(prompts)
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        now = self.now()
        reqs = [Request(f"offline-{i}", list(p), sp, arrival_time=now) for i, (p, sp) in enumerate(zip(prompts, params))]
        for req in reqs:
            self.scheduler.add(req, now)
        while self.scheduler.has_unfinished():
            self.step()
        return reqs

    def run(self, source: "ArrivalSource", timeout_s: float = 0.0,
            on_finish: Callable[[Request], None] | None = None) -> None:
        """Online API: serve requests as they arrive (source.arrival_time is their send time, s).

        Requests that wait longer than timeout_s (0 = never) are ended as TIMED_OUT, as the client
        gives up. on_finish sees every request that ends, whatever its outcome.
        """
        live: dict[int, Request] = {}

        def ended(req: Request) -> None:
            live.pop(id(req), None)
            if on_finish:
                on_finish(req)
            for nxt in source.after(req, self.now()):
                pending.append(nxt)

        pending: list[Request] = list(source.initial())
        while True:
            now = self.now()
            pending.sort(key=lambda r: r.arrival_time)
            while pending and pending[0].arrival_time <= now:
                req = pending.pop(0)
                if self.scheduler.add(req, now):
                    live[id(req)] = req
                else:
                    ended(req)
            if timeout_s > 0:
                for req in [r for r in live.values() if now - r.arrival_time > timeout_s]:
                    self.scheduler.abort(req, now, Outcome.TIMED_OUT, f"client timeout after {timeout_s} s")
                    ended(req)
            if self.scheduler.has_unfinished():
                for req in self.step():
                    ended(req)
            elif pending:
                time.sleep(max(0.0, pending[0].arrival_time - self.now()))
            else:
                break


class ArrivalSource:
    """Where an online run's requests come from: some up front, more as earlier ones end (closed loop)."""

    def initial(self) -> Iterable[Request]:
        """Requests known at the start (with their arrival times)."""
        return ()

    def after(self, req: Request, now: float) -> Iterable[Request]:
        """Requests caused by req ending at now (a closed-loop client's next request)."""
        return ()
