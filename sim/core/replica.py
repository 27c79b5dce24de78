"""One engine replica as a SimPy process: the reference scheduler, timed by a cost model.

The replica holds the very scheduler object the reference engine uses. Each step it asks the
scheduler for a batch, advances simulated time by the cost model's step time, and feeds back a
token per sampling request. So batching, admission, preemption and memory behave as in the real
engine; only the clock is simulated. At scale it may instead hold an event-driven twin of the
teaching scheduler (sim.core.fast: same decisions, proven by tests/test_fastpath.py), which
writes every generated token itself (`event_driven`), so the replica passes no token list.

Like reference.engine.Engine.run, a request that arrives while a step runs is handed to the
scheduler when the step ends (after its update), not mid-step, and the next step is scheduled only
once everything else due at that instant has happened (a closed-loop client sending its next
request the moment its last one ends joins the very next step, as in the engine loop). So
admission and queue-full checks see the same scheduler state in both drivers.

A caller may pass `then` to submit instead of waiting on the returned event: then(req) runs where
the event's first callback would have run, without the event. When a step's update ends requests
and nothing else is due at that instant, those calls run in the order the events would have fired
(after the requests that arrived during the step are handed over), and one that ends a request
at once (a refusal) queues behind them, as its event would; in any other case a plain event
carries the call. So a closed-loop client needs no SimPy process and no event per request, and
the simulation is the same, event for event where it matters (tests/test_sim_properties.py).
Likewise a step during which nothing at all is scheduled ends without a Timeout: the clock moves
to the step's end (the same float), since no event can come in between.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from reference.batch import SchedulerOutput, StepShape
from reference.errors import ConfigError
from reference.request import Outcome, Request
from reference.schedulers.base import Scheduler

SIM_TOKEN = 1  # token id appended for generated tokens: timing does not depend on values
FAST_FORWARD = True  # steps with nothing else scheduled end without a SimPy event (Replica._loop); tests flip it
_LAST = 2  # SimPy event priority after NORMAL (1): processed after every other event of the same instant


class _EndOfInstant(simpy.events.Event):
    """Fires at the current time after all other events due now, including ones they schedule for now.

    SimPy orders events by (time, priority, id); built like simpy.events.Timeout, with a lower priority.
    """

    def __init__(self, env: simpy.Environment):
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, _LAST)


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
                 step_time: Callable[[StepShape], float],
                 on_finish: Callable[[Request], None] | None = None, sample_interval_s: float = 0.1,
                 on_step: Callable[[float, SchedulerOutput, float], None] | None = None):
        """step_time(shape) -> seconds a step of that shape takes (a cost model's step_seconds);
        on_finish(req), if given, sees every request that ends; on_step(now, out, dt) every step."""
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
        self._done_events: dict[int, simpy.Event | Callable[[Request], None]] = {}
        self._ends: list[tuple[Callable[[Request], None], Request]] | None = None  # `then` calls due (see _end)
        self._stepping = False  # a step is in flight
        self._arrived: list[Request] = []  # arrived during the step; added when it ends
        self._wake = env.event()
        env.process(self._loop())

    @property
    def outstanding(self) -> int:
        """Requests queued, running or arriving here (for least-outstanding routing)."""
        return self.scheduler.num_waiting + self.scheduler.num_running + len(self._arrived)

    def submit(self, req: Request, then: Callable[[Request], None] | None = None) -> simpy.Event | None:
        """Hand a request to the scheduler (now, or when the step in flight ends); the event fires when it ends.

        With `then`, no event: then(req) is called where the event's callbacks would run (module docstring).
        """
        done = self.env.event() if then is None else then
        self._done_events[id(req)] = done
        if self._stepping:
            self._arrived.append(req)
        else:
            self._add(req)
        return done if then is None else None

    def _add(self, req: Request) -> None:
        if not self.scheduler.add(req, self.env.now):
            self._end(req, self._done_events.pop(id(req)))
        elif not self._wake.triggered:
            self._wake.succeed()

    def abort(self, req: Request, outcome: Outcome, reason: str) -> None:
        """The client gave up: free the request's KV and end it."""
        done = self._done_events.pop(id(req), None)
        if done is None:
            return
        if any(r is req for r in self._arrived):  # never reached the scheduler
            self._arrived = [r for r in self._arrived if r is not req]
            req.finish(outcome, self.env.now, reason)
        else:
            self.scheduler.abort(req, self.env.now, outcome, reason)
        self._end(req, done)

    def _end(self, req: Request, done: simpy.Event | Callable[[Request], None]) -> None:
        if self.on_finish:
            self.on_finish(req)
        if isinstance(done, simpy.Event):
            done.succeed(req)
        elif self._ends is not None and self.env.peek() > self.env.now:
            # Nothing else is due now, so the event would be the next to fire after those queued: call it then.
            self._ends.append((done, req))
        else:
            event = self.env.event()
            event.callbacks.append(lambda _event, then=done: then(req))
            event.succeed(req)

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
        event_driven = getattr(sched, "event_driven", False)
        while True:
            out = sched.schedule(env.now) if sched.has_unfinished() else None
            if out is None or out.is_empty:
                self._sample(force=True)
                self._wake = env.event()
                yield self._wake
                continue
            if env.now >= self._next_sample:
                self._sample(force=True)
            dt = self.step_time(out.shape)
            if self.on_step:
                self.on_step(env.now, out, dt)
            self._stepping = True
            if FAST_FORWARD and not env._queue:
                # Nothing is scheduled: nothing can happen before the step ends, so move the clock to its end
                # without an event (a Timeout would set env.now to the same float, now + dt).
                env._now += dt
            else:
                yield env.timeout(dt)
            self._stepping = False
            self.num_steps += 1
            self.busy_s += dt
            if event_driven:
                tokens = None
            else:  # one token per chunk that samples (c.samples, inlined: this runs for every chunk of every step)
                tokens = [SIM_TOKEN] * sum([c.start + c.num_tokens == len(c.request.prompt_token_ids)
                                            + len(c.request.output_token_ids) for c in out.chunks])
            finished = sched.update(out, tokens, env.now)
            ends = self._ends = []
            if finished:
                done_events = self._done_events
                for req in finished:
                    self._end(req, done_events.pop(id(req)))
            if self._arrived:
                arrived, self._arrived = self._arrived, []
                for req in arrived:
                    self._add(req)
            i = 0
            while i < len(ends):  # `then` calls, in the order their events would fire; one may queue more
                then, req = ends[i]
                i += 1
                then(req)
            self._ends = None
            # Let clients that just got their answer send their next request. With nothing else due now
            # the wait would be a no-op (SimPy orders ties by creation, which skipping it keeps), so skip it.
            if env.peek() <= env.now:
                yield _EndOfInstant(env)


class Cluster:
    """N replicas behind a router: round robin, or least outstanding requests."""

    ROUTERS = ("round_robin", "least_outstanding")

    def __init__(self, replicas: list[Replica], router: str = "round_robin"):
        if router not in self.ROUTERS:
            raise ConfigError("hardware.router", f"unknown router {router!r}", ", ".join(self.ROUTERS))
        self.replicas = replicas
        self.router = router
        self._next = 0
        self._where: dict[int, Replica] = {}

    def submit(self, req: Request) -> simpy.Event:
        """Route the request to a replica."""
        if len(self.replicas) == 1:  # nothing to route, nothing to remember (abort asks the one replica)
            return self.replicas[0].submit(req)
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
        replica = self.replicas[0] if len(self.replicas) == 1 else self._where.pop(id(req), None)
        if replica is not None:
            replica.abort(req, outcome, reason)
