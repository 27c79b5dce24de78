"""Event-driven implementations of the teaching policies, for the simulator at scale.

The teaching schedulers and block manager (reference.schedulers, reference.block_manager) define
each policy; these make the same decisions at a cost that grows with events (arrivals, finishes,
block boundaries, preemptions) instead of tokens. tests/test_fastpath.py drives both with random
workloads and checks them step by step. Files, one job each:
- request.py: LazyRequest, a request whose prompt ids are drawn only when read;
- decode_group.py: the requests decoding one token per step, as aggregates;
- pool.py: the paged pool, exact where prefix caching can hit, counted where it cannot;
- step.py: FastStep, a step's shape without a chunk per decoder;
- continuous.py, sequential.py: the two policies.

fast_twin(teaching_scheduler) gives the fast implementation of a teaching scheduler's policy, or
None when there is none (static batching, Orca: the simulator runs the teaching scheduler).
"""
from __future__ import annotations

from reference.schedulers import ContinuousScheduler, SequentialScheduler
from sim.core.fast.continuous import FastContinuousScheduler
from sim.core.fast.request import LazyRequest
from sim.core.fast.sequential import FastSequentialScheduler

FastScheduler = FastContinuousScheduler | FastSequentialScheduler

__all__ = ["FastContinuousScheduler", "FastScheduler", "FastSequentialScheduler", "LazyRequest", "fast_twin"]


def fast_twin(scheduler) -> FastScheduler | None:
    """The event-driven scheduler with the same policy and configuration as a fresh teaching scheduler, or None.

    Exact classes only: a subclass (OrcaScheduler, a real system's variant) changes the policy.
    Continuous batching needs max_num_seqs <= max_num_batched_tokens (every engine config has it).
    """
    if type(scheduler) is ContinuousScheduler and scheduler.max_num_seqs <= scheduler.max_num_batched_tokens:
        return FastContinuousScheduler.like(scheduler)
    if type(scheduler) is SequentialScheduler:
        return FastSequentialScheduler.like(scheduler)
    return None
