"""How a benchmark times the engine, from outside its loop: clocks and timed wrappers.

The engine loop (reference.engine.Engine.step) is schedule -> execute -> update on a clock and
knows nothing of measurement. A benchmark wraps its scheduler and runner:

- BenchClock: wall time with a pause button. A step shape that still needs compiling is
  compiled off the clock (TimedRunner), so a run measures an engine that compiled every shape
  at start-up, as production engines do (vLLM captures its CUDA graphs before serving).
- TimedScheduler / TimedRunner: how long schedule, execute and update took in each step.
- ModelTimedRunner: no wall time at all: each step advances a ManualClock by a cost model's
  prediction for its shape. The engine then runs on the simulator's clock, so the simulator
  must reproduce it to rounding: a check of everything but the cost model.
"""
from __future__ import annotations

import time

from reference.batch import SchedulerOutput
from reference.engine import ManualClock
from sim.core.costmodel import CostModel


class BenchClock:
    """Seconds since start, less the time spent off the clock (compiling). timer: where seconds come from."""

    def __init__(self, timer=time.perf_counter, sleep=time.sleep):
        self._timer, self._sleep = timer, sleep
        self._t0 = timer()
        self.excluded_s = 0.0  # s taken off the clock

    def now(self) -> float:
        """Seconds on the clock."""
        return self._timer() - self._t0 - self.excluded_s

    def sleep_until(self, t: float) -> None:
        """Sleep until t (s) on the clock."""
        self._sleep(max(0.0, t - self.now()))

    def off_the_clock(self, fn, *args):
        """fn(*args), its duration taken off the clock (nothing else happens meanwhile)."""
        t0 = self._timer()
        try:
            return fn(*args)
        finally:
            self.excluded_s += self._timer() - t0


class TimedScheduler:
    """A scheduler whose schedule and update calls are timed (s, on the wall clock); all else passes through."""

    def __init__(self, scheduler):
        self._scheduler = scheduler
        self.schedule_s = 0.0  # last step's
        self.update_s = 0.0

    def __getattr__(self, name):
        return getattr(self._scheduler, name)

    def schedule(self, now: float) -> SchedulerOutput:
        t0 = time.perf_counter()
        out = self._scheduler.schedule(now)
        self.schedule_s = time.perf_counter() - t0
        return out

    def update(self, out, tokens, now):
        t0 = time.perf_counter()
        finished = self._scheduler.update(out, tokens, now)
        self.update_s = time.perf_counter() - t0
        return finished


class TimedRunner:
    """A ModelRunner whose new shapes compile off the clock; execute_s is the last step's runner time (s)."""

    def __init__(self, runner, clock: BenchClock):
        self.runner, self.clock = runner, clock
        self.execute_s = 0.0
        self.compilations = 0  # shapes compiled during the run (off the clock)

    def execute(self, out: SchedulerOutput) -> list[int]:
        t0 = self.clock.now()
        step = self.runner.prepare(out.chunks, out.block_copies)
        if not self.runner.is_compiled(step):
            self.compilations += self.clock.off_the_clock(self.runner.compile, step)
        tokens = self.runner.run(step)
        self.execute_s = self.clock.now() - t0
        return tokens


class ModelTimedRunner:
    """A runner whose steps take the cost model's time on a ManualClock (the tokens are computed for real)."""

    def __init__(self, runner, clock: ManualClock, cost: CostModel):
        self.runner, self.clock, self.cost = runner, clock, cost
        self.execute_s = 0.0
        self.compilations = 0

    def execute(self, out: SchedulerOutput) -> list[int]:
        tokens = self.runner.execute(out)
        self.execute_s = self.cost.step_seconds(out.shape)
        self.clock.advance(self.execute_s)
        return tokens
