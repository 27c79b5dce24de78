"""Scheduler properties: conservation, budgets, KV accounting, and outputs independent of scheduling."""
import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from reference.errors import ConfigError
from reference.request import Outcome, Request, SamplingParams, Status
from reference.schedulers import ContinuousScheduler, OrcaScheduler, SequentialScheduler, StaticScheduler
from tests.scheduler_harness import expected_output, make_requests, run_to_completion
from tests.test_peer_schedulers import MODELS as PEER_MODELS

workloads = st.lists(
    st.tuples(st.lists(st.integers(1, 5), min_size=1, max_size=40), st.integers(1, 12)),
    min_size=1, max_size=12)
arrivals = st.lists(st.integers(0, 30), min_size=12, max_size=12)

SCHEDULERS = {
    "sequential-1": lambda: SequentialScheduler(num_parallel=1, num_ctx=64),
    "sequential-3": lambda: SequentialScheduler(num_parallel=3, num_ctx=64, n_batch=7),
    "static": lambda: StaticScheduler(max_batch_size=3, max_model_len=64),
    "static-fitted": lambda: StaticScheduler(max_batch_size=4, max_model_len=64, kv_capacity_tokens=100,
                                             reserve_max_len=False),
    "continuous": lambda: ContinuousScheduler(num_blocks=40, block_size=4, max_num_batched_tokens=16,
                                              max_num_seqs=5, max_model_len=64),
    "continuous-tight": lambda: ContinuousScheduler(num_blocks=14, block_size=4, max_num_batched_tokens=9,
                                                    max_model_len=52),
    "continuous-no-cache": lambda: ContinuousScheduler(num_blocks=30, block_size=2, max_num_batched_tokens=5,
                                                       enable_prefix_caching=False, max_model_len=52),
    "orca-max": lambda: OrcaScheduler(num_blocks=40, block_size=4, max_num_batched_tokens=64, max_model_len=64,
                                      reservation="max_model_len", enable_chunked_prefill=False),
    "orca-oracle": lambda: OrcaScheduler(num_blocks=30, block_size=4, max_num_batched_tokens=64, max_model_len=64,
                                         reservation="request", enable_chunked_prefill=False),
    **PEER_MODELS,  # the real servers' variants (llama-server slots, vLLM V1 admission)
}


@pytest.mark.parametrize("name", SCHEDULERS)
@settings(max_examples=60, deadline=None)
@given(specs=workloads, when=arrivals)
def test_every_request_ends_once_with_the_right_tokens(name, specs, when):
    sched = SCHEDULERS[name]()
    reqs = make_requests(specs)
    run_to_completion(sched, reqs, when[:len(reqs)])
    for req, (prompt, max_tokens) in zip(reqs, specs):
        assert req.status is Status.FINISHED
        if req.outcome is Outcome.COMPLETED:
            assert req.output_token_ids == expected_output(prompt, max_tokens)
            assert len(req.token_times) == max_tokens
            assert req.arrival_time <= req.first_scheduled_time <= req.first_token_time <= req.finish_time
        else:
            assert req.outcome is Outcome.REFUSED and req.reason
            assert len(prompt) + max_tokens > 52 or ("server busy" in req.reason and sched.max_queue)
    assert not sched.running and not sched.waiting
    usage = sched.kv_usage()
    if hasattr(sched, "blocks"):
        assert sched.blocks.num_free_blocks == sched.blocks.num_usable_blocks, "blocks leaked"
        assert usage.reserved_tokens == 0
    elif hasattr(sched, "free_slots"):
        assert sorted(sched.free_slots) == list(range(sched.layout.num_slots)), "slots leaked"


@settings(max_examples=60, deadline=None)
@given(specs=workloads, when=arrivals)
def test_continuous_respects_budget_seq_limit_and_pool(specs, when):
    sched = SCHEDULERS["continuous-tight"]()
    steps = run_to_completion(sched, make_requests(specs), when[:len(specs)])
    for out in steps:
        assert out.shape.new_tokens <= sched.max_num_batched_tokens
        assert len(out.chunks) <= sched.max_num_seqs


def test_sequential_with_one_slot_is_strictly_one_at_a_time():
    sched = SequentialScheduler(num_parallel=1, num_ctx=64)
    reqs = make_requests([([1] * 5, 3)] * 4)
    steps = run_to_completion(sched, reqs)
    assert all(len({id(c.request) for c in out.chunks}) <= 1 for out in steps)
    finishes = [r.finish_time for r in reqs]
    starts = [r.first_scheduled_time for r in reqs]
    assert all(starts[i + 1] >= finishes[i] for i in range(3))


def test_sequential_refuses_beyond_max_queue():
    sched = SequentialScheduler(num_parallel=1, num_ctx=64, max_queue=2)
    reqs = make_requests([([1, 2], 2)] * 5)
    accepted = [sched.add(r, 0.0) for r in reqs]
    # one request takes the free slot at the next schedule, two more wait, the rest are refused
    assert accepted == [True, True, True, False, False]
    assert "max_queue=2" in reqs[3].reason and reqs[3].outcome is Outcome.REFUSED


def test_static_batch_answers_together_and_admits_nobody_mid_batch():
    sched = StaticScheduler(max_batch_size=2, max_model_len=32)
    reqs = make_requests([([1] * 4, 2), ([2] * 4, 6), ([3] * 4, 1)])
    run_to_completion(sched, reqs, [0, 0, 1])
    assert reqs[0].finish_time == reqs[1].finish_time
    assert reqs[0].token_times[-1] < reqs[0].finish_time
    assert reqs[2].first_scheduled_time >= reqs[1].finish_time


def test_preemption_recomputes_and_keeps_outputs():
    # 6 usable blocks of 4 tokens: two requests of 12 tokens cannot both finish without preemption.
    sched = ContinuousScheduler(num_blocks=7, block_size=4, max_num_batched_tokens=32, max_model_len=24,
                                enable_prefix_caching=False)
    specs = [([1, 2, 3, 4, 5, 6], 8), ([6, 5, 4, 3, 2, 1], 8)]
    reqs = make_requests(specs)
    steps = run_to_completion(sched, reqs)
    assert sum(len(o.preempted) for o in steps) >= 1
    assert reqs[1].num_preemptions >= 1  # the newest is preempted
    for req, (prompt, m) in zip(reqs, specs):
        assert req.output_token_ids == expected_output(prompt, m)


def test_prefix_cache_hits_are_counted_and_skip_compute():
    sched = ContinuousScheduler(num_blocks=40, block_size=4, max_model_len=64)
    shared = list(range(1, 13))
    reqs = make_requests([(shared + [20, 21], 2), (shared + [30], 2)])
    steps = run_to_completion(sched, reqs, [0, 5])
    assert reqs[1].num_cached_prompt_tokens == 12
    second = [c for o in steps for c in o.chunks if c.request is reqs[1]]
    assert second[0].start == 12 and second[0].num_tokens == 1


@pytest.mark.parametrize("make, field", [
    (lambda: SequentialScheduler(num_parallel=0), "num_parallel"),
    (lambda: ContinuousScheduler(num_blocks=10, block_size=64, max_model_len=32), "block_size"),
    (lambda: OrcaScheduler(num_blocks=10, reservation="sometimes"), "reservation"),
    (lambda: ContinuousScheduler(num_blocks=1), "num_blocks"),
    (lambda: ContinuousScheduler(num_blocks=10, max_num_seqs=0), "max_num_seqs"),
    (lambda: StaticScheduler(max_batch_size=0), "max_batch_size"),
])
def test_bad_knobs_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_bad_sampling_names_the_field():
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ConfigError, match="prompt"):
        Request("x", [])
