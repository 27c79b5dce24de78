"""One engine replica as a SimPy process: the reference scheduler, timed by a cost model.

The replica holds the very scheduler object the reference engine uses. Each step it asks the
scheduler for a batch, advances simulated time by the cost model's step time, and feeds back a
token per sampling request. So batching, admission, preemption and memory behave as in the real
engine; only the clock is simulated.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from reference.batch import SchedulerOutput
from reference.request import Outcome, Request
from reference.schedulers.base import Scheduler

SIM_TOKEN = 1  # token id appended for generated tokens: timing does not depend on values


@dataclass
class TimeSeries:
    """Replica state sampled over simulated time (one row per sample)."""

    time_s: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    kv_reserved_tokens: list[int] = field(default_factory=list)
    kv_stored_tokens: list[int] = field(default_factory=list)
    kv_capacity_tokens: list[int] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)  # cumulative

    def rows(self, replica: str) -> list[dict]:
        """One dict per sample, for a DataFrame."""
        return [dict(replica=replica, time_s=t, running=r, waiting=w, kv_reserved_tokens=kr,
                     kv_stored_tokens=ks, kv_capacity_tokens=kc, preemptions=p)
                for t, r, w, kr, ks, kc, p in zip(self.time_s, self.running, self.waiting,
                                                  self.kv_reserved_tokens, self.kv_stored_tokens,
                                                  self.kv_capacity_tokens, self.preemptions)]


class Replica:
    """A serving engine replica: starts its own step process on env."""

    def __init__(self, env: simpy.Environment, name: str, scheduler: Scheduler,
                 step_time: Callable[[SchedulerOutput], float],
                 on_finish: Callable[[Request], None] | None = None, sample_interval_s: float = 0.1,
                 on_step: Callable[[float, SchedulerOutput, float], None] | None = None):
        """step_time(out) -> seconds the step takes; on_finish(req), if given, sees every request that ends."""
        self.env = env
        self.name = name
        self.scheduler = scheduler
        self.step_time = step_time
        self.on_finish = on_finish
        self.on_step = on_step
        self.sample_interval_s = sample_interval_s
        self.series = TimeSeries()
        self.num_steps = 0
        self.busy_s = 0.0
        self._next_sample = 0.0
        self._done_events: dict[int, simpy.Event] = {}
        self._wake = env.event()
        env.process(self._loop())

    @property
    def outstanding(self) -> int:
        """Requests queued or running here (for least-outstanding routing)."""
        return self.scheduler.num_waiting + self.scheduler.num_running

    def submit(self, req: Request) -> simpy.Event:
        """Hand a request to the scheduler now; the event fires when it ends (any outcome)."""
        done = self.env.event()
        if not self.scheduler.add(req, self.env.now):
            self._end(req, done)
            return done
        self._done_events[id(req)] = done
        if not self._wake.triggered:
            self._wake.succeed()
        return done

    def abort(self, req: Request, outcome: Outcome, reason: str) -> None:
        """The client gave up: free the request's KV and end it."""
        done = self._done_events.pop(id(req), None)
        if done is None:
            return
        self.scheduler.abort(req, self.env.now, outcome, reason)
        self._end(req, done)

    def _end(self, req: Request, done: simpy.Event) -> None:
        if self.on_finish:
            self.on_finish(req)
        done.succeed(req)

    def _sample(self, force: bool = False) -> None:
        now = self.env.now
        if not force and now < self._next_sample:
            return
        self._next_sample = now + self.sample_interval_s
        s = self.series
        usage = self.scheduler.kv_usage()
        s.time_s.append(now)
        s.running.append(self.scheduler.num_running)
        s.waiting.append(self.scheduler.num_waiting)
        s.kv_reserved_tokens.append(usage.reserved_tokens)
        s.kv_stored_tokens.append(usage.stored_tokens)
        s.kv_capacity_tokens.append(usage.capacity_tokens)
        s.preemptions.append(self.scheduler.num_preemptions)

    def _loop(self):
        env, sched = self.env, self.scheduler
        while True:
            out = sched.schedule(env.now) if sched.has_unfinished() else None
            if out is None or out.is_empty:
                self._sample(force=True)
                self._wake = env.event()
                yield self._wake
                continue
            self._sample()
            dt = self.step_time(out)
            if self.on_step:
                self.on_step(env.now, out, dt)
            yield env.timeout(dt)
            self.num_steps += 1
            self.busy_s += dt
            tokens = [SIM_TOKEN] * sum(1 for c in out.chunks if c.samples)
            for req in sched.update(out, tokens, env.now):
                self._end(req, self._done_events.pop(id(req)))


class Cluster:
    """N replicas behind a router: round robin, or least outstanding requests."""

    ROUTERS = ("round_robin", "least_outstanding")

    def __init__(self, replicas: list[Replica], router: str = "round_robin"):
        if router not in self.ROUTERS:
            from reference.errors import ConfigError
            raise ConfigError("hardware.router", f"unknown router {router!r}", ", ".join(self.ROUTERS))
        self.replicas = replicas
        self.router = router
        self._next = 0
        self._where: dict[int, Replica] = {}

    def submit(self, req: Request) -> simpy.Event:
        """Route the request to a replica."""
        if self.router == "round_robin":
            replica = self.replicas[self._next % len(self.replicas)]
            self._next += 1
        else:
            replica = min(self.replicas, key=lambda r: r.outstanding)
        self._where[id(req)] = replica
        done = replica.submit(req)
        done.callbacks.append(lambda _e, k=id(req): self._where.pop(k, None))
        return done

    def abort(self, req: Request, outcome: Outcome, reason: str) -> None:
        """Abort wherever the request went."""
        replica = self._where.pop(id(req), None)
        if replica is not None:
            replica.abort(req, outcome, reason)
