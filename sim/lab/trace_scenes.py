"""Hand-driven scenes on the real scheduler and block manager, recorded by the same tracer as a simulated cell.

fork_scene(): prefix caching, then parallel sampling the way vLLM V0 and the PagedAttention
paper did it: fork a sequence (the child shares every block, refcounts go up), and copy the
block the child writes into while it is still shared (copy-on-write). vLLM V1 has no fork and
no copy-on-write: it runs the n samples of a request as n requests that share the prompt's
full blocks through the prefix cache, and each computes its own last, partial block.
"""
from __future__ import annotations

from reference.request import Request, SamplingParams
from reference.schedulers import ContinuousScheduler
from sim.lab.trace import SchedulerTracer, StepRecord

SYSTEM_PROMPT = tuple(range(101, 109))  # 8 tokens: two full blocks of 4
TICK_S = 1e-3  # the scene's clock: one step per millisecond (it has no cost model)


def fork_scene(prompt_tokens: int = 10, block_size: int = 4) -> tuple[SchedulerTracer, list[StepRecord]]:
    """Four moments on a 16-block pool: A's prefill, B's prefix-cache hit, A' forked from A, A' writing.

    prompt_tokens: A's prompt (the 8-token system prompt, then its own tokens), at least 9.
    Returns the tracer (its scheduler, its requests) and its records, each labelled.
    """
    if prompt_tokens < len(SYSTEM_PROMPT) + 1:
        raise ValueError(f"prompt_tokens must be at least {len(SYSTEM_PROMPT) + 1}, got {prompt_tokens}")
    sched = ContinuousScheduler(num_blocks=17, block_size=block_size, max_num_seqs=8, max_num_batched_tokens=64,
                                max_model_len=64, enable_chunked_prefill=True, enable_prefix_caching=True)
    tracer = SchedulerTracer(sched)
    a = Request("A", list(SYSTEM_PROMPT) + list(range(1, prompt_tokens - len(SYSTEM_PROMPT) + 1)),
                SamplingParams(max_tokens=8))
    b = Request("B", list(SYSTEM_PROMPT) + [21, 22, 23, 24, 25], SamplingParams(max_tokens=8))

    def step(now: float, label: str) -> None:
        out = sched.schedule(now)
        tracer.on_step(now, out, TICK_S)
        tracer.records[-1].label = label
        sched.update(out, [1] * sum(1 for c in out.chunks if c.samples), now + TICK_S)

    sched.add(a, 0.0)
    step(0.0, f"A's prompt ({prompt_tokens} tokens) is computed; its full blocks enter the prefix cache")
    sched.add(b, TICK_S)
    step(TICK_S, "Prefix caching: B's first 8 tokens hash to A's cached blocks, so B shares them")
    sched.blocks.fork("A", "A'")  # parallel sampling, V0 style: a second answer continues from A's exact state
    tracer.mark(2 * TICK_S, "Fork (parallel sampling as in vLLM V0 and the paper): A' shares all of A's blocks")
    sched.blocks.allocate_slots("A'", a.num_computed_tokens, 1)  # A' writes its own next token
    tracer.mark(2 * TICK_S, f"A' writes position {a.num_computed_tokens}: copy-on-write if that block is shared")
    return tracer, tracer.records
