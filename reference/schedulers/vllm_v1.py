"""vLLM V1's scheduler as vLLM 0.32 runs it (vllm/v1/core/sched/scheduler.py, vllm/v1/core/kv_cache_manager.py).

ContinuousScheduler is the V1 policy (running first within the token budget, preempt the
newest, then admit waiting FCFS, prefix caching with hits capped at num_tokens - 1:
KVCacheManager.get_computed_blocks max_cache_hit_length). This subclass adds two rules of vLLM
0.32 that it lacks:

- scheduler_reserve_full_isl (SchedulerConfig, default True): a waiting request is admitted
  only if the pool's free blocks can hold its whole sequence (num_tokens, less its prefix-cache
  hits), not just its first chunk (KVCacheManager.allocate_slots(full_sequence_must_fit=True)),
  so chunked prefill does not over-admit and thrash the cache.
- Blocks are cached when they are allocated, not after the step: allocate_slots ends with
  coordinator.cache_blocks(request, num_computed + num_new), so a request admitted later in
  the same step hits the full blocks an earlier admission of that step is about to compute (the
  step writes every chunk's K/V before its attention reads them). ContinuousScheduler caches
  after the step (BlockManager.cache_full_blocks from update), so two requests with one prefix
  admitted together both computed it. Here an admission caches its blocks at once; a running
  request's next chunk is still cached after its step (vLLM caches it at scheduling too: a
  same-step hit on a prompt chunked over several steps is not modelled).

Checked against the source and equal to ContinuousScheduler: the running loop's num_new_tokens
(min of what is left, the token budget; max_model_len - num_computed - 1 also caps it, which a
request refused at arrival when longer than max_model_len never reaches), recompute preemption
of self.running[-1] (FCFS policy), no admission in a step that preempted, max_num_seqs
(max_num_active_reqs), watermark 0 (SchedulerConfig.watermark), long_prefill_token_threshold 0
(default), and, on CPU, synchronous scheduling (platforms/cpu.py sets async_scheduling = False).
"""
from __future__ import annotations

from reference.request import Request
from reference.schedulers.continuous import ContinuousScheduler


class VllmV1Scheduler(ContinuousScheduler):
    """ContinuousScheduler with vLLM 0.32's admission gate: the whole sequence must fit the free blocks."""

    def _allocate_admitted(self, req: Request, num_computed: int, num_new: int, hits: list[int]) -> bool:
        """Blocks for the first chunk, if the free pool could hold the whole sequence (less its hits) now."""
        bm = self.blocks
        revived = sum(1 for b in hits if bm.ref_count[b] == 0)  # cached blocks nobody holds sit in the free queue
        whole = bm.blocks_needed(min(req.num_tokens, self.max_model_len)) - len(hits)
        if whole + revived > bm.num_free_blocks:
            return False
        if not super()._allocate_admitted(req, num_computed, num_new, hits):
            return False
        bm.cache_full_blocks(req.request_id, num_computed + num_new, req.token_ids)  # at allocation, as vLLM
        return True

    def describe(self) -> str:
        """Pool, block size, prefix caching, the admission gate."""
        return super().describe() + "; admits a request only when its whole sequence fits (vLLM 0.32)"
