"""A serving runner's bounded shape set: dynamic-context attention gives the bucketed runner's
tokens, Padding.shapes() holds every shape step() can return within the scheduler's limits, and
a runner that compiled shapes() ahead never compiles on a real step."""
import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from reference.buckets import Padding, bucket_sizes
from reference.errors import ConfigError
from reference.layout import PagedLayout, SlotLayout
from reference.request import SamplingParams
from tests.test_runner import CFG, GREEDY, MiniScheduler, PARAMS, Request, contiguous, paged, prompts, run
from reference.runner import ModelRunner


def test_dynamic_context_equals_bucketed_paged_and_slots():
    ps = prompts([13, 30, 5, 40])
    arrivals = [0, 1, 3, 4]
    expected = run(paged(), ps, arrivals)
    assert run(paged(dynamic_context=True), ps, arrivals) == expected
    # a chunk narrower than the longest context: the loop runs several times (block 4, 16 blocks -> 64 tokens)
    runner = paged(num_blocks=64, block_size=4, dynamic_context=True)
    runner.chunk = 8
    assert run(runner, ps, arrivals, chunk_size=5) == expected
    assert run(contiguous(dynamic_context=True), ps, arrivals, chunk_size=11) == expected
    sampled = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7)
    assert run(paged(dynamic_context=True), ps, arrivals, sampling=sampled) == run(paged(), ps, arrivals,
                                                                                    sampling=sampled)


LIMITS = st.tuples(st.integers(1, 40), st.integers(2, 300), st.sampled_from([2, 4, 8]), st.sampled_from([2, 4]),
                   st.integers(1, 8), st.sampled_from([4, 16, 32]), st.booleans(), st.booleans(), st.booleans())


@settings(max_examples=60, deadline=None)
@given(LIMITS, st.data())
def test_every_step_within_the_limits_has_an_enumerated_shape(limits, data):
    max_seqs, max_tokens, growth, mixed_growth, min_seqs, min_tokens, slots, floor, coarse = limits
    layout = SlotLayout(max_seqs, 256) if slots else PagedLayout(200, 16)
    pad = Padding.for_layout(layout, 256, min_seqs=min_seqs, min_tokens=min_tokens, max_seqs=max_seqs,
                             max_tokens=max_tokens, growth=growth, mixed_growth=mixed_growth,
                             dynamic_context=data.draw(st.booleans()), mixed_floor=floor, coarse_mixed=coarse,
                             few_prefill_rows=data.draw(st.integers(1, 8)))
    shapes = set(pad.shapes())
    for _ in range(20):
        dn = data.draw(st.integers(0, min(max_seqs, max_tokens)))
        pn = data.draw(st.integers(0, min(max_seqs - dn, (max_tokens - dn) // 2)))
        tn = data.draw(st.integers(2 * pn, max_tokens - dn)) if pn else 0
        if dn + pn == 0:
            continue
        dl = data.draw(st.integers(1, 256)) if dn else 0
        pl = data.draw(st.integers(min(256, max(1, tn // max(pn, 1))), 256)) if pn else 0
        assert pad.step(dn, dl, pn, tn, pl) in shapes


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 256), st.integers(2, 8192), st.sampled_from([2, 4, 8]), st.sampled_from([1, 5, 16]))
def test_coarse_shape_set_is_the_decode_buckets_plus_two_per_token_bucket(max_seqs, max_tokens, growth, min_tokens):
    pad = Padding.for_layout(PagedLayout(600, 16), 4096, min_seqs=1, min_tokens=min_tokens, max_seqs=max_seqs,
                             max_tokens=max_tokens, growth=growth, dynamic_context=True, coarse_mixed=True)
    decode_buckets = min(max_seqs, max_tokens).bit_length() + 1  # 1, 2, 4, ... and the cap
    token_buckets = len(bucket_sizes(min_tokens, max_tokens, growth))
    assert len(pad.shapes()) <= decode_buckets + 2 * token_buckets
    if growth >= 4 and min_tokens == 16:  # the server's rules: up to 256 sequences and 8192 tokens, <= 21 shapes
        assert len(pad.shapes()) <= 9 + 2 * 6


def test_coarse_mixed_needs_max_seqs():
    with pytest.raises(ConfigError, match="coarse_mixed"):
        Padding(None, 256, coarse_mixed=True)


@pytest.mark.parametrize("coarse", [False, True])
def test_compiled_ahead_means_no_compile_when_serving(coarse):
    runner = ModelRunner(CFG, PARAMS, layout=PagedLayout(64, 4), min_seqs=1, min_tokens=16, max_seqs=3,
                         max_tokens=24, growth=4, mixed_growth=4, dynamic_context=True, max_context=64,
                         coarse_mixed=coarse)
    shapes = runner.shapes()
    assert 0 < len(shapes) < 20
    for p in shapes:
        runner.compile_shape(p)
    assert not any(runner.compile_shape(p) for p in shapes)  # every shape is compiled (here or by a runner before)
    compiled = runner.num_compilations
    reqs = [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts([9, 3, 11], seed=4))]
    sched = MiniScheduler(runner, chunk_size=8)
    while not all(r.is_done_generating() for r in reqs):
        sched.step([r for r in reqs if not r.is_done_generating()])
    assert runner.num_compilations == compiled
    assert [r.output_token_ids for r in reqs] == run(paged(), [r.prompt_token_ids for r in reqs])
