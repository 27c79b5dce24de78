"""Continuous batching over a paged KV pool (vLLM V1).

Each step: running requests first (oldest first), each gets the tokens it still needs
(1 for a decode, the rest of its prompt for a chunked prefill) within the step's token budget;
when the pool has no block for one of them, the newest running request is preempted (its blocks
freed, recomputed later). Then, if nothing was preempted, waiting requests are admitted FCFS
while the budget, max_num_seqs and the pool allow, reusing prefix-cached blocks.
"""
from __future__ import annotations

from reference.batch import ScheduledChunk, SchedulerOutput
from reference.block_manager import BlockManager
from reference.errors import ConfigError
from reference.layout import KVUsage
from reference.request import Request, Status
from reference.schedulers.base import Scheduler


class ContinuousScheduler(Scheduler):
    """vLLM-style continuous batching with chunked prefill, recompute preemption and prefix caching."""

    def __init__(self, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 8192,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True, max_queue: int = 0):
        super().__init__(max_queue)
        if max_num_seqs < 1:
            raise ConfigError("max_num_seqs", f"must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens", f"must be >= 1, got {max_num_batched_tokens}")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ConfigError("max_num_batched_tokens",
                              f"{max_num_batched_tokens} < max_model_len={max_model_len}: without chunked "
                              "prefill a whole prompt must fit in one step", f">= {max_model_len}")
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.layout = self.blocks.layout
        if block_size > max_model_len:
            raise ConfigError("block_size", f"{block_size} is larger than max_model_len={max_model_len}",
                              f"1..{max_model_len}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill

    def add(self, req: Request, now: float) -> bool:
        """Queue the request; refuse it when it can never run (too long for the model or the pool)."""
        need = req.max_total_tokens
        if need > self.max_model_len:
            return self._refuse(req, now, f"prompt + max_tokens = {need} exceeds max_model_len={self.max_model_len}")
        blocks = self.layout.blocks_for(self._tokens_held(req))
        if blocks > self.layout.num_usable_blocks:
            return self._refuse(req, now, f"needs {blocks} KV blocks, the pool has {self.layout.num_usable_blocks}")
        if busy := self._queue_full():
            return self._refuse(req, now, busy)
        self.waiting.append(req)
        return True

    def kv_usage(self) -> KVUsage:
        """Blocks reserved by running requests versus tokens they hold."""
        return self.blocks.usage()

    def schedule(self, now: float) -> SchedulerOutput:
        """One step's batch: running first, then waiting (FCFS) if no one was preempted."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            copies = self.blocks.allocate_slots(req.request_id, req.num_computed_tokens, num_new)
            while copies is None:
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is req:
                    break
                copies = self.blocks.allocate_slots(req.request_id, req.num_computed_tokens, num_new)
            if copies is None:
                break
            out.block_copies.extend(copies)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new,
                                             block_table=self.blocks.block_table(req.request_id)))
            budget -= num_new
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            tokens = req.token_ids()
            hits = self.blocks.get_computed_blocks(tokens)
            num_computed = len(hits) * self.layout.block_size
            num_new = len(tokens) - num_computed
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not self._allocate_admitted(req, num_computed, num_new, hits):
                break
            self.waiting.popleft()
            if req.first_scheduled_time is None:
                req.num_cached_prompt_tokens = num_computed
            req.num_computed_tokens = num_computed
            self._start(req, now)
            out.chunks.append(ScheduledChunk(req, num_computed, num_new,
                                             block_table=self.blocks.block_table(req.request_id)))
            budget -= num_new
        return out

    def _tokens_held(self, req: Request) -> int:
        """The most KV positions the request holds at once (what must fit the pool for it to ever run)."""
        return req.max_total_tokens

    def _allocate_admitted(self, req: Request, num_computed: int, num_new: int, hits: list[int]) -> bool:
        """Blocks for a request being admitted (its prefix-cache hits taken); False, changing nothing, if none."""
        # A new sequence's table shares no block yet, so there is nothing to copy on write.
        return self.blocks.allocate_slots(req.request_id, num_computed, num_new, hits) is not None

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Free the request's blocks and put it back at the head of the queue, to recompute later."""
        self.blocks.free(req.request_id)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _on_computed(self, req: Request) -> None:
        self.blocks.cache_full_blocks(req.request_id, req.num_computed_tokens, req.token_ids)

    def _release_kv(self, req: Request) -> None:
        self.blocks.free(req.request_id)

    def kv_holdings(self) -> dict[str, list[int]]:
        """Each running request's block table."""
        return {rid: list(t) for rid, t in self.blocks.tables.items()}

    def kv_blocks(self) -> dict[int, tuple[int, int]]:
        """Blocks held by some table: (tokens written or being written, refcount)."""
        bm = self.blocks
        return {b: (bm.fill[b], bm.ref_count[b]) for t in bm.tables.values() for b in t}

    def describe(self) -> str:
        """Pool size, block size, prefix caching."""
        return (f"paged pool of {self.layout.num_usable_blocks} blocks x {self.layout.block_size} tokens (block 0 is "
                f"the null block), prefix caching {'on' if self.blocks.enable_prefix_caching else 'off'}")
