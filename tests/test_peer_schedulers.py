"""The scheduling models of the real servers: llama-server's slots and caches, vLLM 0.32's admission gate.

Synthetic workloads only (no server): conservation and outputs like every scheduler, the rules
read from each server's source (reference/schedulers/llamacpp.py, vllm_v1.py cite them), and
equality with the project's own schedulers where the real systems do the same.
"""
import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from reference.errors import ConfigError
from reference.request import Request, SamplingParams, Status
from reference.schedulers import ContinuousScheduler, SequentialScheduler
from reference.schedulers.llamacpp import LlamaServerScheduler, common_prefix
from reference.schedulers.vllm_v1 import VllmV1Scheduler
from tests.scheduler_harness import check_and_sample, make_requests, run_to_completion

workloads = st.lists(
    st.tuples(st.lists(st.integers(1, 5), min_size=1, max_size=40), st.integers(1, 12)),
    min_size=1, max_size=12)
arrivals = st.lists(st.integers(0, 30), min_size=12, max_size=12)

MODELS = {
    "llama-server-1": lambda: LlamaServerScheduler(num_parallel=1, num_ctx=64),
    "llama-server-3": lambda: LlamaServerScheduler(num_parallel=3, num_ctx=64, n_batch=7),
    "llama-server-no-ram": lambda: LlamaServerScheduler(num_parallel=2, num_ctx=64, ram_cache_tokens=0),
    "llama-server-small-ram": lambda: LlamaServerScheduler(num_parallel=2, num_ctx=64, ram_cache_tokens=30),
    "vllm-v1": lambda: VllmV1Scheduler(num_blocks=40, block_size=4, max_num_batched_tokens=16, max_num_seqs=5,
                                       max_model_len=64),
    "vllm-v1-tight": lambda: VllmV1Scheduler(num_blocks=14, block_size=4, max_num_batched_tokens=9, max_model_len=52),
}


class _CheckedLlama(LlamaServerScheduler):
    """Asserts that every reused prefix is the new prompt's own prefix (the cache never lends wrong K/V)."""

    def schedule(self, now):
        fresh = [r for r in self.waiting]
        out = super().schedule(now)
        for req in fresh:
            if req.status is Status.RUNNING and req.first_scheduled_time == now:
                n = req.num_computed_tokens
                assert n < req.num_prompt_tokens
                assert self.slot_tokens[self.slot_of[req.request_id]] == tuple(req.prompt_token_ids[:n])
        return out


@settings(max_examples=80, deadline=None)
@given(specs=workloads, when=arrivals, slots=st.integers(1, 3), ram=st.sampled_from([0, 25, 1 << 20]))
def test_llama_server_reuses_only_the_prompts_own_prefix(specs, when, slots, ram):
    sched = _CheckedLlama(num_parallel=slots, num_ctx=64, n_batch=9, ram_cache_tokens=ram)
    run_to_completion(sched, make_requests(specs), when[:len(specs)])
    assert sched._ram_tokens <= max(ram, 0) or not sched.ram
    assert sched._ram_tokens == sum(len(t) for t in sched.ram.values())


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=10), when=arrivals,
       slots=st.integers(1, 3))
def test_llama_server_batches_like_sequential_when_no_prompt_repeats(lengths, when, slots):
    """Prompts with distinct first tokens never hit a cache: the same chunks each step as SequentialScheduler
    (n_batch large enough that the order in which prompts fill it does not matter)."""
    specs = [([100 + i] + [1] * (p - 1), m) for i, (p, m) in enumerate(lengths)]
    steps = {}
    for name, make in (("seq", lambda: SequentialScheduler(slots, 64, 0, 2048)),
                       ("llama", lambda: LlamaServerScheduler(slots, 64, 0, 2048))):
        out = run_to_completion(make(), make_requests(specs), when[:len(specs)])
        steps[name] = [sorted((c.request.request_id, c.start, c.num_tokens) for c in o.chunks) for o in out]
    assert steps["seq"] == steps["llama"]


def _run_one(sched, prompt, max_tokens=3, rid="x", now=0):
    req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens))
    assert sched.add(req, now)
    t = now
    first = None
    while req.status is not Status.FINISHED:
        out = sched.schedule(t)
        first = first or next(c for c in out.chunks if c.request is req)
        t += 1
        sched.update(out, check_and_sample(sched, out), t)
    return req, first


def test_llama_server_slot_keeps_the_last_prompt_and_recomputes_only_the_rest():
    sched = LlamaServerScheduler(num_parallel=2, num_ctx=64)
    a, first_a = _run_one(sched, [7] * 10, rid="a")
    assert first_a.start == 0 and first_a.slot == 1  # LRU with every slot unused: the last slot
    b, first_b = _run_one(sched, [7] * 10 + [8] * 5, rid="b", now=10)
    assert first_b.slot == 1 and first_b.start == 10  # the slot holds a's prompt (and outputs): 10 tokens match
    assert b.num_cached_prompt_tokens == first_b.start
    assert sched.num_cached_tokens == first_b.start


def test_llama_server_computes_at_least_one_token_of_a_cached_prompt():
    sched = LlamaServerScheduler(num_parallel=1, num_ctx=64)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    _run_one(sched, prompt, max_tokens=1, rid="a")
    _, first = _run_one(sched, prompt, max_tokens=1, rid="b", now=5)
    assert (first.start, first.num_tokens) == (len(prompt) - 1, 1)


def test_llama_server_picks_the_idle_slot_sharing_the_prompt_else_lru():
    sched = LlamaServerScheduler(num_parallel=3, num_ctx=64)
    _, fa = _run_one(sched, [1] * 8, rid="a")
    _, fb = _run_one(sched, [2] * 8, rid="b", now=10)
    _, fc = _run_one(sched, [1] * 6 + [3] * 4, rid="c", now=20)  # shares 6 of 10 with a's slot
    assert fa.slot == 2 and fb.slot == 1  # LRU: unused slots (ties: the last), then the least recent
    assert fc.slot == fa.slot and fc.start == 6
    _, fd = _run_one(sched, [4] * 8, rid="d", now=30)  # nothing similar: LRU = slot 0 (never used)
    assert fd.slot == 0 and fd.start == 0


def test_llama_server_ram_cache_brings_back_an_evicted_prompt():
    sched = LlamaServerScheduler(num_parallel=1, num_ctx=64)
    _run_one(sched, [5] * 12, max_tokens=1, rid="a")
    _run_one(sched, [6] * 12, max_tokens=1, rid="b", now=5)  # the only slot now holds b's prompt
    _, first = _run_one(sched, [5] * 12 + [9] * 4, max_tokens=1, rid="c", now=10)
    assert first.start == 12  # a's prompt came back from RAM (keeps 12 of its 12 tokens)
    none = LlamaServerScheduler(num_parallel=1, num_ctx=64, ram_cache_tokens=0)
    _run_one(none, [5] * 12, max_tokens=1, rid="a")
    _run_one(none, [6] * 12, max_tokens=1, rid="b", now=5)
    _, first = _run_one(none, [5] * 12 + [9] * 4, max_tokens=1, rid="c", now=10)
    assert first.start == 0


def test_llama_server_ram_cache_does_not_trash_a_large_prompt_for_a_short_match():
    sched = LlamaServerScheduler(num_parallel=1, num_ctx=64)
    _run_one(sched, [5] * 3 + [1] * 20, max_tokens=1, rid="a")  # 23 tokens cached
    _run_one(sched, [6] * 12, max_tokens=1, rid="b", now=5)
    _, first = _run_one(sched, [5] * 3 + [2] * 10, max_tokens=1, rid="c", now=10)
    assert first.start == 0  # would keep 3/23 < 0.25 of the cached prompt: not loaded


def test_llama_server_batches_generating_slots_then_prompts_in_slot_order():
    sched = LlamaServerScheduler(num_parallel=3, num_ctx=64, n_batch=2048)
    reqs = [Request(f"r{i}", [10 + i] * 5, SamplingParams(max_tokens=4)) for i in range(3)]
    sched.add(reqs[0], 0)
    out = sched.schedule(0)
    sched.update(out, check_and_sample(sched, out), 1)
    sched.add(reqs[1], 1)
    sched.add(reqs[2], 1)
    out = sched.schedule(1)
    assert [c.num_tokens for c in out.chunks] == [1, 5, 5]  # r0's decode first
    slots = [c.slot for c in out.chunks[1:]]
    assert slots == sorted(slots)  # prompts in slot order, not arrival order
    assert [c.request.request_id for c in out.chunks[1:]] == ["r2", "r1"]  # r1 got slot 1 (LRU), r2 slot 0


def test_llama_server_bad_knobs_name_the_field():
    with pytest.raises(ConfigError, match="slot_prompt_similarity"):
        LlamaServerScheduler(slot_prompt_similarity=1.5)
    with pytest.raises(ConfigError, match="ram_cache_tokens"):
        LlamaServerScheduler(ram_cache_tokens=-1)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix((), [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=10), when=arrivals)
def test_vllm_v1_decides_as_continuous_when_the_pool_is_ample_and_no_prompt_repeats(lengths, when):
    """With blocks for every request at once the full-sequence gate never binds, and with prompts that share no
    block the caching time does not matter: identical steps."""
    specs = [([100 + i] + [1] * (p - 1), m) for i, (p, m) in enumerate(lengths)]
    steps = {}
    for name, cls in (("continuous", ContinuousScheduler), ("vllm", VllmV1Scheduler)):
        sched = cls(num_blocks=200, block_size=4, max_num_batched_tokens=9, max_num_seqs=4, max_model_len=52)
        out = run_to_completion(sched, make_requests(specs), when[:len(specs)])
        steps[name] = [[(c.request.request_id, c.start, c.num_tokens, tuple(c.block_table)) for c in o.chunks]
                       for o in out]
    assert steps["continuous"] == steps["vllm"]


def test_vllm_v1_caches_an_admission_s_blocks_for_the_next_admission_of_the_same_step():
    prompt = [7] * 12 + [1]
    for cls, hit in ((ContinuousScheduler, 0), (VllmV1Scheduler, 12)):
        sched = cls(num_blocks=20, block_size=4, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=40)
        a = Request("a", list(prompt), SamplingParams(max_tokens=2))
        b = Request("b", prompt[:12] + [2], SamplingParams(max_tokens=2))
        sched.add(a, 0)
        sched.add(b, 0)
        out = sched.schedule(0)
        assert [(c.request.request_id, c.start) for c in out.chunks] == [("a", 0), ("b", hit)]
        assert b.num_cached_prompt_tokens == hit
        sched.update(out, check_and_sample(sched, out), 1)
        while sched.has_unfinished():
            out = sched.schedule(1)
            sched.update(out, check_and_sample(sched, out), 2)
        assert sched.blocks.num_free_blocks == sched.blocks.num_usable_blocks


def test_vllm_v1_admits_only_a_request_whose_whole_prompt_fits():
    """A 13-token prompt beside a request holding 5 of 8 blocks: its first chunk fits the 3 free blocks, not all of it."""
    def admitted(cls):
        sched = cls(num_blocks=9, block_size=4, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=44)
        hog = Request("hog", [1] * 19, SamplingParams(max_tokens=10))  # holds 5 of the 8 usable blocks
        sched.add(hog, 0)
        for t in range(3):
            out = sched.schedule(t)
            sched.update(out, check_and_sample(sched, out), t + 1)
        long = Request("long", [2] * 13, SamplingParams(max_tokens=1))
        sched.add(long, 3)
        out = sched.schedule(3)
        return long.status is Status.RUNNING, out

    ok_cont, _ = admitted(ContinuousScheduler)
    ok_vllm, out = admitted(VllmV1Scheduler)
    assert ok_cont and not ok_vllm
    assert all(c.request.request_id == "hog" for c in out.chunks)
