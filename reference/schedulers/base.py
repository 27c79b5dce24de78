"""The interface every scheduler implements, and the bookkeeping they share.

A driver (the JAX engine, or a SimPy replica) calls, with its own clock `now` in seconds:
    add(request, now)            -> False if the request is refused (its outcome says why)
    schedule(now)                -> SchedulerOutput for one step (empty when idle)
    ... execute the step (model or cost model) ...
    update(output, tokens, now)  -> requests that finished in this step
    abort(request, now, outcome) when a client gives up or disconnects
"""
from __future__ import annotations

from collections import deque

from reference.batch import SchedulerOutput
from reference.layout import KVUsage, Layout
from reference.request import Outcome, Request, Status


class QueueCounts:
    """What a driver reads of any scheduler's `waiting` queue and `running` collection (the teaching
    schedulers here, and the simulator's event-driven twins of them)."""

    @property
    def num_waiting(self) -> int:
        """Requests queued, including preempted ones waiting to recompute."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding KV and being computed."""
        return len(self.running)

    def has_unfinished(self) -> bool:
        """True while any request is queued or running."""
        return bool(self.waiting or self.running)


class Scheduler(QueueCounts):
    """Shared state: a FCFS wait queue, the running list, finishing and aborting."""

    layout: Layout  # the KV layout this scheduler fills; the runner allocates the same object

    def __init__(self, max_queue: int = 0):
        """max_queue: waiting requests beyond which new ones are refused (0 = unbounded)."""
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- to implement -------------------------------------------------------------------
    def add(self, req: Request, now: float) -> bool:
        """Queue a request; False (request finished as REFUSED, with a reason) when it cannot be served."""
        raise NotImplementedError

    def schedule(self, now: float) -> SchedulerOutput:
        """Decide the next step's batch."""
        raise NotImplementedError

    def kv_usage(self) -> KVUsage:
        """KV memory reserved versus holding tokens, now."""
        raise NotImplementedError

    def _release_kv(self, req: Request) -> None:
        """Give back whatever KV the request holds."""
        raise NotImplementedError

    def kv_usage_perc(self) -> float:
        """The KV usage this kind of server reports (vLLM: the reserved share of capacity, 0..1)."""
        return self.kv_usage().usage_fraction

    def kv_holdings(self) -> dict[str, list[int]]:
        """What each request holding KV holds now: its blocks (paged) or [its slot]."""
        raise NotImplementedError

    def kv_blocks(self) -> dict[int, tuple[int, int]]:
        """Block -> (tokens it holds, references to it), for blocks in use; empty for slot layouts."""
        return {}

    def describe(self) -> str:
        """One line on the policy and its KV memory, for people."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, tokens: list[int], now: float) -> list[Request]:
        """Apply a finished step: advance each chunk, append the sampled tokens, finish what is done.

        tokens: one sampled token per chunk whose `samples` is True, in chunk order.
        """
        sampled = iter(tokens)
        finished = []
        for chunk in out.chunks:
            req = chunk.request
            if req.status is not Status.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens = chunk.end
            self._on_computed(req)
            if chunk.samples:
                req.append_token(next(sampled), now)
                if req.is_done_generating():
                    finished.append(req)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
            for req in finished:
                self._complete(req, now)
        return finished

    def abort(self, req: Request, now: float, outcome: Outcome, reason: str = "") -> None:
        """End a request early (client timeout or disconnect), wherever it is, and free its KV."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            if req in self.running:
                self.running.remove(req)
            self._release_kv(req)
        else:
            self.waiting.remove(req)
        req.finish(outcome, now, reason)

    def _on_computed(self, req: Request) -> None:
        """Hook after a chunk's K/V are written (prefix caching registers full blocks here)."""

    def _complete(self, req: Request, now: float) -> None:
        self._release_kv(req)
        req.finish(Outcome.COMPLETED, now)

    def _queue_full(self) -> str:
        """Why a new request is refused for lack of queue room ('' when there is room)."""
        if self.max_queue and len(self.waiting) >= self.max_queue:
            return f"server busy: {len(self.waiting)} requests queued (max_queue={self.max_queue})"
        return ""

    def _refuse(self, req: Request, now: float, reason: str) -> bool:
        req.finish(Outcome.REFUSED, now, reason)
        return False

    def _start(self, req: Request, now: float) -> None:
        req.status = Status.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        self.running.append(req)
