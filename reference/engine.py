"""The serving loop: schedule -> execute -> update, on a clock.

The scheduler is the same object the simulator drives; only the clock and the executor differ.
Each step's shape (reference.batch.StepShape) is what the simulator's cost model prices.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from reference.batch import StepShape
from reference.request import Outcome, Request, SamplingParams
from reference.schedulers.base import Scheduler


class Clock(Protocol):
    """What the engine reads time from (seconds) and waits on."""

    def now(self) -> float:
        """Seconds since the clock started."""

    def sleep_until(self, t: float) -> None:
        """Return at time t (s) or later."""


class WallClock:
    """Real time since the clock was made; sleeping sleeps."""

    def __init__(self):
        self._t0 = time.perf_counter()

    def now(self) -> float:
        """Seconds since the clock was made."""
        return time.perf_counter() - self._t0

    def sleep_until(self, t: float) -> None:
        """Sleep until t (s)."""
        time.sleep(max(0.0, t - self.now()))


class ManualClock:
    """Time that moves only when told to: advance(dt), or sleep_until(t), which jumps there."""

    def __init__(self):
        self._now = 0.0

    def now(self) -> float:
        """The current time (s)."""
        return self._now

    def advance(self, dt: float) -> None:
        """Move time forward by dt seconds."""
        self._now += dt

    def sleep_until(self, t: float) -> None:
        """Jump to t (s), if it is later."""
        self._now = max(self._now, t)


@dataclass(frozen=True)
class StepRecord:
    """One step that ran: when (s on the engine's clock), what it computed, what it changed."""

    start_s: float
    end_s: float
    shape: StepShape
    num_preempted: int
    finished: tuple[Request, ...]  # requests that ended in this step


class Engine:
    """Drives a scheduler with a model runner on a clock."""

    def __init__(self, scheduler: Scheduler, runner, clock: Clock | None = None):
        """runner: has execute(scheduler_output) -> one token per sampling chunk (reference.runner.ModelRunner)."""
        self.scheduler = scheduler
        self.runner = runner
        self.clock = clock or WallClock()

    def now(self) -> float:
        """Seconds on the engine's clock."""
        return self.clock.now()

    def add(self, req: Request) -> bool:
        """Hand a request to the scheduler; False when refused."""
        return self.scheduler.add(req, self.now())

    def step(self) -> StepRecord | None:
        """Run one step: schedule -> execute -> update. None when there was nothing to compute."""
        start = self.now()
        out = self.scheduler.schedule(start)
        if out.is_empty:
            return None
        tokens = self.runner.execute(out)
        end = self.now()
        finished = self.scheduler.update(out, tokens, end)
        return StepRecord(start, end, out.shape, len(out.preempted), tuple(finished))

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

    def run(self, source: ArrivalSource, timeout_s: float = 0.0,
            on_finish: Callable[[Request], None] | None = None,
            on_step: Callable[[StepRecord], None] | None = None) -> None:
        """Online API: serve requests as they arrive (source.arrival_time is their send time, s).

        Requests that wait longer than timeout_s (0 = never) are ended as TIMED_OUT, as the client
        gives up. on_finish sees every request that ends, whatever its outcome; on_step every step.
        """
        live: dict[int, Request] = {}
        pending: list[Request] = list(source.initial())

        def ended(req: Request) -> None:
            live.pop(id(req), None)
            if on_finish:
                on_finish(req)
            pending.extend(source.after(req, self.now()))

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
                record = self.step()
                if record is not None:
                    if on_step:
                        on_step(record)
                    for req in record.finished:
                        ended(req)
            elif pending:
                self.clock.sleep_until(pending[0].arrival_time)
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
