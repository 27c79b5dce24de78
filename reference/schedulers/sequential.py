"""llama.cpp server slots behind Ollama's queue: contiguous per-slot KV reserved at load.

num_parallel slots each own num_ctx tokens of KV whether used or not. A request waits FCFS for
a free slot in a queue of at most max_queue (0 = unbounded); beyond that it is refused (Ollama's HTTP 503
"server busy"). Each step (one llama_decode call of up to n_batch tokens) first gives every
generating slot its next token, then fills the rest of the batch with prompt tokens of slots
still processing their prompt. With num_parallel = 1 that is strictly one request at a time.
"""
from __future__ import annotations

from reference.batch import ScheduledChunk, SchedulerOutput
from reference.errors import ConfigError
from reference.layout import KVUsage, SlotLayout
from reference.request import Request
from reference.schedulers.base import Scheduler


class SequentialScheduler(Scheduler):
    """Ollama / llama.cpp server: fixed slots, bounded queue, prompt chunks of n_batch tokens."""

    def __init__(self, num_parallel: int = 1, num_ctx: int = 4096, max_queue: int = 512, n_batch: int = 2048):
        super().__init__(max_queue)
        for name, value, low in (("num_parallel", num_parallel, 1), ("num_ctx", num_ctx, 1),
                                 ("max_queue", max_queue, 0), ("n_batch", n_batch, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
        self.layout = SlotLayout(num_parallel, num_ctx)
        self.n_batch = n_batch
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(num_parallel - 1, -1, -1))  # pop() hands out slot 0 first

    def add(self, req: Request, now: float) -> bool:
        """Queue the request; refuse it if the queue is full or it cannot fit in a slot."""
        if req.max_total_tokens > self.layout.max_len:
            # Ollama would silently truncate the prompt; a simulator must not hide that.
            return self._refuse(req, now, f"prompt + max_tokens = {req.max_total_tokens} exceeds "
                                          f"num_ctx={self.layout.max_len}")
        if self.max_queue and len(self.waiting) - len(self.free_slots) >= self.max_queue:
            return self._refuse(req, now, f"server busy: {len(self.waiting) - len(self.free_slots)} requests "
                                          f"queued (max_queue={self.max_queue})")
        self.waiting.append(req)
        return True

    def kv_usage(self) -> KVUsage:
        """All slots are reserved at load; only the busy slots' tokens are stored."""
        capacity = self.layout.num_slots * self.layout.max_len
        stored = sum(r.num_computed_tokens for r in self.running)
        return KVUsage(capacity, capacity, stored)

    def schedule(self, now: float) -> SchedulerOutput:
        """Decode tokens for generating slots, then prompt tokens, within n_batch."""
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            self.slot_of[req.request_id] = self.free_slots.pop()
            req.num_computed_tokens = 0
            self._start(req, now)
        return self._batch(self.running)

    def _batch(self, order: list[Request]) -> SchedulerOutput:
        """One llama_decode batch: every generating slot's next token, then prompt tokens of the others in
        `order`, within n_batch."""
        out = SchedulerOutput()
        budget = self.n_batch
        prompting = []
        for req in order:
            if req.num_tokens - req.num_computed_tokens == 1 and req.num_output_tokens:
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, 1, slot=self.slot_of[req.request_id]))
                budget -= 1
            else:
                prompting.append(req)
        for req in prompting:
            if budget <= 0:
                break
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new, slot=self.slot_of[req.request_id]))
            budget -= num_new
        return out

    def _release_kv(self, req: Request) -> None:
        self.free_slots.append(self.slot_of.pop(req.request_id))

    def kv_usage_perc(self) -> float:
        """llama.cpp's KV usage ratio: slots are reserved at load, so it counts the cells holding tokens."""
        return self.kv_usage().stored_fraction

    def kv_holdings(self) -> dict[str, list[int]]:
        """Each running request's slot."""
        return {rid: [slot] for rid, slot in self.slot_of.items()}

    def describe(self) -> str:
        """Slots and their size."""
        return f"{self.layout.num_slots} slots x {self.layout.max_len} tokens reserved at load"
