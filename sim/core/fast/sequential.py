"""reference.schedulers.sequential.SequentialScheduler's policy (llama.cpp slots) at a cost per event, not per token.

Each step the teaching scheduler gives every generating slot its next token, then fills the rest
of the n_batch budget with prompt tokens of slots still processing their prompt, in admission
order. Generating slots are the decode group (sim.core.fast.decode_group): one token each, every
step, never limited by the budget; prompting slots are listed one by one (at most num_parallel).
Same decisions, same records; the replica drives it with update(step, None, now).
"""
from __future__ import annotations

import itertools
from collections import deque

from reference.layout import KVUsage, SlotLayout
from reference.request import Outcome, Request, Status
from reference.schedulers.base import QueueCounts
from reference.schedulers.sequential import SequentialScheduler
from sim.core.fast.decode_group import SIM_TOKEN, DecodeGroup
from sim.core.fast.step import FastStep, empty_step, step_shape


class FastSequentialScheduler(QueueCounts):
    """Ollama / llama.cpp slots, event-driven; decision-identical to SequentialScheduler."""

    event_driven = True  # the replica feeds it update(step, None, now): every generated token is SIM_TOKEN

    def __init__(self, num_parallel: int = 1, num_ctx: int = 4096, max_queue: int = 512, n_batch: int = 2048):
        teaching = SequentialScheduler(num_parallel, num_ctx, max_queue, n_batch)  # validates; defines the policy
        self._describe = teaching.describe()
        self.layout = SlotLayout(num_parallel, num_ctx)
        self.max_queue = max_queue
        self.n_batch = n_batch
        self.group = DecodeGroup(1)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # id(request) -> request, in admission order
        self.prompting: dict[int, tuple[Request, int]] = {}  # running, prompt not done: id -> (request, seq)
        self.slot_of: dict[int, int] = {}
        self.free_slots = list(range(num_parallel - 1, -1, -1))  # pop() hands out slot 0 first
        self.num_preemptions = 0  # slots never preempt
        self._seq = itertools.count()

    @classmethod
    def like(cls, s: SequentialScheduler) -> FastSequentialScheduler:
        """The fast twin of a (fresh) teaching scheduler, same configuration."""
        return cls(s.layout.num_slots, s.layout.max_len, s.max_queue, s.n_batch)

    def describe(self) -> str:
        """As the teaching scheduler says it."""
        return self._describe

    def add(self, req: Request, now: float) -> bool:
        """Queue the request; refuse it if the queue is full or it cannot fit in a slot (SequentialScheduler.add)."""
        if req.max_total_tokens > self.layout.max_len:
            req.finish(Outcome.REFUSED, now, f"prompt + max_tokens = {req.max_total_tokens} exceeds "
                                             f"num_ctx={self.layout.max_len}")
            return False
        if self.max_queue and len(self.waiting) - len(self.free_slots) >= self.max_queue:
            req.finish(Outcome.REFUSED, now, f"server busy: {len(self.waiting) - len(self.free_slots)} requests "
                                             f"queued (max_queue={self.max_queue})")
            return False
        self.waiting.append(req)
        return True

    def kv_usage(self) -> KVUsage:
        """All slots are reserved at load; the busy slots' computed tokens are stored."""
        g = self.group
        stored = g.sum_key + len(g) * (g.next_step - 1) if len(g) else 0  # a decoder's num_computed_tokens
        for req, _ in self.prompting.values():
            stored += req.num_computed_tokens
        capacity = self.layout.num_slots * self.layout.max_len
        return KVUsage(capacity, capacity, stored)

    def kv_usage_perc(self) -> float:
        """llama.cpp's KV usage ratio: the cells holding tokens."""
        return self.kv_usage().stored_fraction

    def schedule(self, now: float) -> FastStep:
        """Fill free slots from the queue; every generating slot decodes; prompt tokens fill the rest of n_batch."""
        waiting, g = self.waiting, self.group
        while waiting and self.free_slots:
            req = waiting.popleft()
            rid = id(req)
            self.slot_of[rid] = self.free_slots.pop()
            req.num_computed_tokens = 0
            req.status = Status.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running[rid] = req
            self.prompting[rid] = (req, next(self._seq))
        n_dec = len(g)
        budget = self.n_batch - n_dec
        specials = []
        for req, _ in self.prompting.values():
            if budget <= 0:
                break
            start = req.num_computed_tokens
            num_new = min(req.num_tokens - start, budget)
            specials.append((req, start, num_new))
            budget -= num_new
        k = g.next_step
        if not n_dec and not specials:
            return empty_step(k, [])
        shape = step_shape(n_dec, g.context_sum(k), g.max_key() + k if n_dec else 0, specials)
        return FastStep(g.begin(), n_dec, specials, [], shape)

    def update(self, step: FastStep, tokens: list[int] | None, now: float) -> list[Request]:
        """Apply a finished step (every sampled token is SIM_TOKEN; `tokens` is ignored); returns who finished."""
        specials = step.specials
        if not step.num_decodes and not specials:
            return []
        g = self.group
        done = g.end(now)
        finished = [d.req for d in done] if done else []
        running = Status.RUNNING
        for req, start, n in specials:
            if req.status is not running:
                continue  # aborted while the step ran
            end = start + n
            req.num_computed_tokens = end
            if end == req.num_tokens:  # Request.append_token and is_done_generating, inlined (once per step)
                if req.first_token_time is None:
                    req.first_token_time = now
                out = req.output_token_ids
                out.append(SIM_TOKEN)
                req.token_times.append(now)
                if len(out) >= req.sampling.max_tokens or SIM_TOKEN in req.sampling.stop_token_ids:
                    finished.append(req)
                else:
                    _, seq = self.prompting.pop(id(req))
                    g.join(req, seq)
        for req in finished:
            self._release(req)
            req.finish(Outcome.COMPLETED, now)
        return finished

    def _release(self, req: Request) -> None:
        """Take a running request out (its record written) and free its slot."""
        rid = id(req)
        del self.running[rid]
        if rid in self.group.members:
            self.group.leave(req)
        else:
            del self.prompting[rid]
        self.free_slots.append(self.slot_of.pop(rid))

    def abort(self, req: Request, now: float, outcome: Outcome, reason: str = "") -> None:
        """End a request early wherever it is and free its slot (Scheduler.abort)."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            self._release(req)
        else:
            self.waiting.remove(req)
        req.finish(outcome, now, reason)

    def settle(self) -> None:
        """Write every decoding request's record up to the last completed step (for inspection)."""
        for d in self.group.members.values():
            self.group.settle(d)
