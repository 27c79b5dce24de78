"""Static batching (FasterTransformer-style): a batch runs until its longest request ends.

When the engine is idle it takes up to max_batch_size waiting requests (FCFS, while their KV
reservations fit), runs all their prompts in one step, then decodes them together. No request
joins a running batch, and every request of the batch is answered when the batch ends, so a
short request waits for the longest one. Finished requests stop being computed (FasterTransformer
keeps computing them as padding; a decode step's cost is dominated by reading the weights, so
the difference is small and stated here rather than hidden).
"""
from __future__ import annotations

from reference.batch import ScheduledChunk, SchedulerOutput
from reference.errors import ConfigError
from reference.layout import KVUsage, SlotLayout
from reference.request import Outcome, Request, Status
from reference.schedulers.base import Scheduler


class StaticScheduler(Scheduler):
    """One batch at a time; each request reserves max_model_len (reserve_max_len) or prompt + max_tokens."""

    def __init__(self, max_batch_size: int = 8, max_model_len: int = 2048, kv_capacity_tokens: int = 0,
                 reserve_max_len: bool = True, max_queue: int = 0):
        """kv_capacity_tokens: KV token slots for the whole batch (0 = max_batch_size x max_model_len)."""
        super().__init__(max_queue)
        if max_batch_size < 1:
            raise ConfigError("max_batch_size", f"must be >= 1, got {max_batch_size}")
        if max_model_len < 1:
            raise ConfigError("max_model_len", f"must be >= 1, got {max_model_len}")
        self.layout = SlotLayout(max_batch_size, max_model_len)
        self.capacity = kv_capacity_tokens or max_batch_size * max_model_len
        if self.capacity < max_model_len:
            raise ConfigError("kv_capacity_tokens", f"{self.capacity} cannot hold one request of "
                                                    f"max_model_len={max_model_len}", f">= {max_model_len}")
        self.reserve_max_len = reserve_max_len
        self.batch: list[Request] = []  # the running batch, finished members included until it ends
        self.slot_of: dict[str, int] = {}

    def _reservation(self, req: Request) -> int:
        return self.layout.max_len if self.reserve_max_len else req.max_total_tokens

    def add(self, req: Request, now: float) -> bool:
        """Queue the request; refuse it when it is longer than max_model_len."""
        if req.max_total_tokens > self.layout.max_len:
            return self._refuse(req, now, f"prompt + max_tokens = {req.max_total_tokens} exceeds "
                                          f"max_model_len={self.layout.max_len}")
        if busy := self._queue_full():
            return self._refuse(req, now, busy)
        self.waiting.append(req)
        return True

    def has_unfinished(self) -> bool:
        """True while requests wait, or a batch still holds unanswered members."""
        return bool(self.waiting or self.batch)

    def kv_usage(self) -> KVUsage:
        """Reservations of the current batch versus tokens it holds."""
        reserved = sum(self._reservation(r) for r in self.batch)
        stored = sum(r.num_computed_tokens for r in self.batch)
        return KVUsage(self.capacity, reserved, stored)

    def schedule(self, now: float) -> SchedulerOutput:
        """Start a new batch when the last one is over, else decode the running members."""
        if not self.batch:
            self._form_batch(now)
        out = SchedulerOutput()
        for req in self.running:
            num_new = req.num_tokens - req.num_computed_tokens
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new, slot=self.slot_of[req.request_id]))
        return out

    def _form_batch(self, now: float) -> None:
        reserved = 0
        while self.waiting and len(self.batch) < self.layout.num_slots:
            need = self._reservation(self.waiting[0])
            if reserved + need > self.capacity:
                break
            req = self.waiting.popleft()
            reserved += need
            self.slot_of[req.request_id] = len(self.batch)
            self.batch.append(req)
            self._start(req, now)

    def update(self, out: SchedulerOutput, tokens: list[int], now: float) -> list[Request]:
        """Advance the batch; its members are answered together when the last one is done."""
        super().update(out, tokens, now)
        if self.batch and not self.running:
            done = [r for r in self.batch if r.status is not Status.FINISHED]
            for req in done:
                req.finish(Outcome.COMPLETED, now)
            self.batch = []
            self.slot_of.clear()
            return done
        return []

    def _complete(self, req: Request, now: float) -> None:
        """Done generating, but answered only when the whole batch ends."""

    def _release_kv(self, req: Request) -> None:
        self.batch.remove(req)
        self.slot_of.pop(req.request_id, None)

    def kv_holdings(self) -> dict[str, list[int]]:
        """Each member of the running batch's slot (finished members keep theirs until the batch ends)."""
        return {r.request_id: [self.slot_of[r.request_id]] for r in self.batch if r.request_id in self.slot_of}

    def describe(self) -> str:
        """Batch size and KV capacity."""
        return f"static batches of up to {self.layout.num_slots}, {self.capacity} KV token slots"
