"""ModelRunner: paged == contiguous == full recomputation, no recompiles in a bucket,
sampling that does not depend on batch composition, and bad input named."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from reference.batch import ScheduledChunk, SchedulerOutput, StepShape
from reference.buckets import Padding
from reference.config import get_preset
from reference.errors import ConfigError
from reference.layout import PagedLayout, SlotLayout
from reference.model import forward_dense, init_params
from reference.request import Request, SamplingParams
from reference.runner import ModelRunner
from reference.sampling import sample
from sim.lab.bench import make_runner
from sim.lab.experiment import load_experiment
from sim.lab.validate import sim_experiment

CFG = get_preset("tiny")
PROFILE = Path(__file__).resolve().parents[1] / "experiments" / "profiles" / "cpu_tiny.csv"
PARAMS = init_params(CFG, seed=3)
GREEDY = SamplingParams(max_tokens=6)


def is_paged(runner) -> bool:
    return isinstance(runner.layout, PagedLayout)


def execute(runner, chunks, block_copies=()):
    """One step of these chunks on the runner."""
    return runner.execute(SchedulerOutput(list(chunks), block_copies=list(block_copies)))


class MiniScheduler:
    """Just enough scheduling for tests: chunked prefill, then decode; fragmented block tables."""

    def __init__(self, runner, chunk_size=8, seed=0):
        self.runner, self.chunk_size = runner, chunk_size
        self.rng = np.random.default_rng(seed)
        if is_paged(runner):
            self.free = [int(b) for b in self.rng.permutation(np.arange(1, runner.layout.num_blocks))]
        self.free_slots = list(range(runner.layout.num_slots)) if not is_paged(runner) else []
        self.tables, self.slots = {}, {}

    def chunk(self, req):
        start = req.num_computed_tokens
        n = min(self.chunk_size, req.num_tokens - start)
        if is_paged(self.runner):
            table = self.tables.setdefault(req.request_id, [])
            while len(table) * self.runner.layout.block_size < start + n:
                table.append(self.free.pop())
            return ScheduledChunk(req, start, n, block_table=list(table))
        if req.request_id not in self.slots:
            self.slots[req.request_id] = self.free_slots.pop(int(self.rng.integers(len(self.free_slots))))
        return ScheduledChunk(req, start, n, slot=self.slots[req.request_id])

    def step(self, reqs):
        chunks = [self.chunk(r) for r in reqs if not r.is_done_generating()]
        tokens = iter(execute(self.runner, chunks))
        for c in chunks:
            c.request.num_computed_tokens = c.end
            if c.samples:
                c.request.append_token(next(tokens), 0.0)
        return chunks


def run(runner, prompts, arrivals=None, sampling=GREEDY, chunk_size=8, seed=0, ids=None):
    """Serve the prompts (request i joins at step arrivals[i]); output tokens per request."""
    arrivals = arrivals or [0] * len(prompts)
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    reqs = [Request(i, list(p), sampling) for i, p in zip(ids, prompts)]
    sched, step = MiniScheduler(runner, chunk_size, seed), 0
    while not all(r.is_done_generating() for r in reqs):
        sched.step([r for r, a in zip(reqs, arrivals) if a <= step])
        step += 1
    return [r.output_token_ids for r in reqs]


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


_dense = jax.jit(forward_dense, static_argnums=1)


def dense_greedy(prompt, n, pad_to=64):
    """Greedy tokens by full recomputation each step (one compiled shape: causal, so padding is harmless)."""
    toks = list(prompt)
    for _ in range(n):
        x = np.zeros((1, pad_to), np.int32)
        x[0, : len(toks)] = toks
        toks.append(int(jnp.argmax(_dense(PARAMS, CFG, jnp.asarray(x))[0, len(toks) - 1])))
    return toks[len(prompt):]


def paged(num_blocks=64, block_size=4, **kw):
    kw = {"min_blocks": 16, "min_tokens": 32, **kw}  # few buckets: fewer compiles in tests
    return ModelRunner(CFG, PARAMS, layout=PagedLayout(num_blocks, block_size), **kw)


def contiguous(num_slots=4, max_len=64, **kw):
    kw = {"min_tokens": 32, **kw}
    return ModelRunner(CFG, PARAMS, layout=SlotLayout(num_slots, max_len), **kw)


def test_greedy_paged_equals_contiguous_equals_dense():
    ps = prompts([13, 30, 5])
    arrivals = [0, 1, 3]  # later requests prefill (in chunks of 8) while earlier ones decode
    expected = [dense_greedy(p, GREEDY.max_tokens) for p in ps]
    assert run(paged(), ps, arrivals) == expected
    assert run(paged(block_size=1, num_blocks=128, min_blocks=64), ps, arrivals, chunk_size=5) == expected
    assert run(contiguous(), ps, arrivals, chunk_size=11) == expected


def test_no_recompilation_within_a_bucket():
    runner = paged(num_blocks=72, block_size=4, min_blocks=4, min_tokens=16)  # shapes no other test compiles
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=40)) for i, p in enumerate(prompts([17, 18, 19]))]
    sched = MiniScheduler(runner, chunk_size=32)
    sched.step(reqs)  # mixed path: 54 tokens -> bucket 64
    sched.step(reqs)  # decode path: contexts 18..20 -> 8 blocks of 4
    compiled = runner.num_compilations
    assert compiled == 2
    for _ in range(10):  # contexts stay <= 32 tokens = 8 blocks: same bucket
        sched.step(reqs)
    assert runner.num_compilations == compiled
    more = [Request(f"s{i}", p, GREEDY) for i, p in enumerate(prompts([20, 25, 12], seed=1))]
    sched.step(more)  # 57 prefill tokens, 3 sequences, <= 8 blocks: the same mixed bucket
    assert runner.num_compilations == compiled


SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.95, seed=1234)


@pytest.mark.parametrize("make", [paged, contiguous])
def test_sampling_does_not_depend_on_batch(make):
    p, others = prompts([11])[0], prompts([7, 25, 3], seed=5)
    alone = run(make(), [p], sampling=SAMPLED)[0]
    crowd = run(make(), others + [p], arrivals=[0, 0, 2, 1], sampling=SAMPLED, seed=9,
                ids=["a", "b", "c", "r0"])[-1]
    assert alone == crowd
    other_seed = run(make(), [p], sampling=SamplingParams(**{**SAMPLED.__dict__, "seed": 99}))[0]
    assert other_seed != alone  # the seed matters
    # Without a seed, the runner seed and request id decide, not the batch.
    unseeded = SamplingParams(max_tokens=8, temperature=1.0)
    a = run(make(sampling_seed=4), [p], sampling=unseeded)[0]
    b = run(make(sampling_seed=4), others + [p], sampling=unseeded, ids=["a", "b", "c", "r0"])[-1]
    assert a == b


def test_top_k_one_equals_greedy():
    ps = prompts([9, 14])
    greedy = run(paged(), ps)
    top1 = run(paged(), ps, sampling=SamplingParams(max_tokens=6, temperature=1.5, top_k=1, seed=3))
    tiny_p = run(paged(), ps, sampling=SamplingParams(max_tokens=6, temperature=1.5, top_p=1e-6, seed=3))
    assert greedy == top1 == tiny_p


def test_sample_follows_the_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    n = logits.shape[0]
    one = lambda x: jnp.full((n,), x)  # noqa: E731
    draws = sample(logits, one(1.0), one(0).astype(jnp.int32), one(1.0), one(7).astype(jnp.uint32),
                   jnp.arange(n, dtype=jnp.int32))
    freq = np.bincount(np.asarray(draws), minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    top2 = sample(logits, one(1.0), one(2).astype(jnp.int32), one(1.0), one(7).astype(jnp.uint32),
                  jnp.arange(n, dtype=jnp.int32))
    np.testing.assert_allclose(np.bincount(np.asarray(top2), minlength=4) / n, [0.625, 0.375, 0, 0], atol=0.04)
    nucleus = sample(logits, one(1.0), one(0).astype(jnp.int32), one(0.7), one(7).astype(jnp.uint32),
                     jnp.arange(n, dtype=jnp.int32))  # 0.5 + 0.3 reaches 0.7: two tokens left
    assert set(np.unique(np.asarray(nucleus))) == {0, 1}


def test_reports_bytes():
    r = paged(num_blocks=10, block_size=4)
    assert r.kv_bytes == 2 * CFG.num_layers * 10 * 4 * CFG.kv_size * 4
    assert r.weight_bytes == CFG.num_params * 4
    assert contiguous(num_slots=2, max_len=8).kv_bytes == 2 * CFG.num_layers * 2 * 8 * CFG.kv_size * 4


def test_block_copies_before_the_step():
    """A forked request reads its copied last block: same greedy tokens as the original."""
    runner = paged()
    p = prompts([10])[0]
    a = Request("a", p, GREEDY)
    execute(runner, [ScheduledChunk(a, 0, 10, block_table=[5, 2, 7])])
    b = Request("b", p, GREEDY)  # shares blocks 5, 2 with a; its partial last block is a copy of 7
    tok_b = execute(runner, [ScheduledChunk(b, 9, 1, block_table=[5, 2, 9])], block_copies=[(7, 9)])
    assert tok_b == [dense_greedy(p, 1)[0]]


@pytest.mark.parametrize("make, error_field", [
    (lambda: ModelRunner("no-such-model", layout=PagedLayout(8, 4)), "model"),
    (lambda: ModelRunner(CFG, PARAMS, layout=PagedLayout(8, 0)), "block_size"),
    (lambda: ModelRunner(CFG, PARAMS, layout=PagedLayout(8, -4)), "block_size"),
    (lambda: ModelRunner(CFG, PARAMS, layout=PagedLayout(1, 4)), "num_blocks"),
    (lambda: ModelRunner(CFG, PARAMS, layout=SlotLayout(0, 16)), "num_slots"),
    (lambda: ModelRunner(CFG, PARAMS, layout=PagedLayout(8, 4), dtype=jnp.int8), "dtype"),
])
def test_bad_construction_names_the_field(make, error_field):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.field == error_field and e.value.allowed


def test_bad_chunks_name_the_field():
    r = paged(num_blocks=8, block_size=4)
    req = Request("x", list(range(12)), GREEDY)
    cases = [
        (ScheduledChunk(req, 0, 12, block_table=[1, 2]), "block_table"),  # too few for 12 tokens
        (ScheduledChunk(req, 0, 12, block_table=[1, 2, 0]), "block_table"),  # the null block
        (ScheduledChunk(req, 0, 12, block_table=[1, 2, 3, 4, 5, 6, 7, 1]), "block_table"),  # too many
        (ScheduledChunk(req, 0, 12, slot=0), "block_table"),  # paged runner, no table
        (ScheduledChunk(req, 5, 8, block_table=[1, 2, 3, 4]), "chunk"),  # past the known tokens
    ]
    long = Request("long", [1] * (CFG.max_position + 1), GREEDY)
    cases.append((ScheduledChunk(long, 0, len(long.prompt_token_ids), block_table=[1]), "max_position"))
    c = contiguous(num_slots=2, max_len=8)
    cases += [(ScheduledChunk(req, 0, 12, slot=0), "max_len"), (ScheduledChunk(req, 0, 4, slot=2), "slot")]
    for chunk, field in cases:
        runner = r if chunk.slot is None or field == "block_table" else c
        with pytest.raises(ConfigError) as e:
            execute(runner, [chunk])
        assert e.value.field == field, (field, str(e.value))
    assert r.num_compilations == 0  # refused before any work


@pytest.mark.parametrize("make", [paged, contiguous])
def test_mixed_step_equals_its_parts(make):
    """A mixed step (decodes + prefill chunks, interleaved in the chunk list) gives the same logits as
    running its decode part and its prefill part as two separate steps, in the caller's chunk order."""
    def setup(runner):
        """Two requests prefilled and one token in (ready to decode), two new prompts to prefill."""
        sched = MiniScheduler(runner, chunk_size=32, seed=2)
        olds = [Request(f"d{i}", p, GREEDY) for i, p in enumerate(prompts([9, 14], seed=7))]
        sched.step(olds)  # prefill both; each samples its first token
        news = [Request(f"p{i}", p, GREEDY) for i, p in enumerate(prompts([11, 6], seed=8))]
        chunks = [sched.chunk(r) for r in (news[0], olds[0], news[1], olds[1])]  # prefill, decode, prefill, decode
        assert [c.num_tokens for c in chunks] == [11, 1, 6, 1]
        return chunks

    mixed_runner = make()
    chunks = setup(mixed_runner)
    mixed_tokens = execute(mixed_runner, chunks)
    mixed = mixed_runner.last_logits()

    sep_runner = make()
    chunks = setup(sep_runner)
    dec_tokens = execute(sep_runner, [chunks[1], chunks[3]])
    dec = sep_runner.last_logits()
    pre_tokens = execute(sep_runner, [chunks[0], chunks[2]])
    pre = sep_runner.last_logits()

    assert mixed.shape == (4, CFG.vocab_size)
    np.testing.assert_allclose(mixed[[1, 3]], dec, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[[0, 2]], pre, rtol=1e-5, atol=1e-5)
    assert mixed_tokens == [pre_tokens[0], dec_tokens[0], pre_tokens[1], dec_tokens[1]]


@given(decode_ctx=st.lists(st.integers(2, 60), max_size=9),
       prefill=st.lists(st.tuples(st.integers(2, 40), st.integers(0, 20)), max_size=5))
@settings(max_examples=40, deadline=None)
def test_prepared_arrays_have_the_padded_sizes_the_cost_model_prices(decode_ctx, prefill):
    """runner.prepare pads exactly as reference.buckets.Padding says, and the padding the simulator prices an
    engine's steps with is the runner's (so the calibrated model prices the arrays the runner builds)."""
    if not decode_ctx and not prefill:
        return
    for engine in ('scheduler = "continuous"\nblock_size = 4\nnum_blocks = 400\nmax_model_len = 128',
                   'scheduler = "sequential"\nnum_parallel = 16\nnum_ctx = 128'):
        exp = load_experiment(f'model = "tiny"\n[workload]\nkind = "closed_loop"\nclients = [1]\nnum_requests = 1\n'
                              '[workload.prompt_tokens]\ndist = "fixed"\nvalue = 8\n'
                              '[workload.output_tokens]\ndist = "fixed"\nvalue = 8\n'
                              f'[engines.e]\n{engine}\n')
        e = exp.engines[0]
        layout = e.build_scheduler(exp.plan(e)).layout
        runner = make_runner(exp, e, PARAMS)
        assert runner.layout == layout == e.layout(exp.plan(e))
        assert runner.padding == Padding.for_layout(layout, exp.model_spec.max_position)
        calibrated = sim_experiment(exp, PROFILE)
        assert calibrated.cost_model_for(calibrated.engines[0]).padding == runner.padding
        chunks, next_block = [], 1
        parts = [(c - 1, 1, c - 1) for c in decode_ctx] + [(cached + n, 0, cached) for n, cached in prefill]
        for i, (prompt_len, out_len, start) in enumerate(parts):
            req = Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8))
            req.output_token_ids = [7] * out_len
            if is_paged(runner):
                need = -(-req.num_tokens // layout.block_size)
                table, next_block = list(range(next_block, next_block + need)), next_block + need
                chunks.append(ScheduledChunk(req, start, req.num_tokens - start, block_table=table))
            else:
                chunks.append(ScheduledChunk(req, start, req.num_tokens - start, slot=i))
        step = runner.prepare(chunks)
        s = StepShape.from_chunks((c.num_tokens, c.end) for c in chunks)
        pad = runner.padding.step(s.decode_seqs, s.decode_max_context, s.prefill_seqs, s.prefill_tokens,
                                  s.prefill_max_context)
        assert step.batch["tokens"].shape == (pad.tokens,)
        assert step.batch["context_lens"].shape == (pad.rows,)
        key = "tables" if is_paged(runner) else "slots"
        if pad.decode_rows:
            assert step.batch["decode"][key].shape[0] == pad.decode_rows
        if pad.prefill_rows:
            assert step.batch["prefill"][key].shape[0] == pad.prefill_rows
            assert pad.prefill_tiles == pad.prefill_rows + -(-pad.prefill_tokens // runner.query_tile)
        if is_paged(runner):
            for part, ctx in (("decode", pad.decode_context), ("prefill", pad.prefill_context)):
                if part in step.batch:
                    assert step.batch[part]["tables"].shape[1] * layout.block_size == ctx
        else:
            assert step.contexts == (pad.decode_context, pad.prefill_context)


def test_the_pallas_kernel_serves_the_paged_runner():
    """attention="pallas" (interpreted here) runs the whole model through the kernel: the same greedy tokens."""
    ps = prompts([13, 5])
    expected = [dense_greedy(p, 3) for p in ps]
    kernel = paged(attention="pallas")
    assert kernel.access.decode_fn.__name__ == "paged_decode_attention_pallas"
    assert run(kernel, ps, [0, 1], sampling=SamplingParams(max_tokens=3)) == expected
    with pytest.raises(ConfigError) as e:
        paged(attention="cuda")
    assert e.value.field == "attention" and "pallas" in e.value.allowed


def test_unfiltered_draw_skips_the_sort_and_draws_the_same_tokens():
    """With top-k off and top-p 1, the sampler's plain path gives the filtering path's very tokens."""
    rng = np.random.default_rng(0)
    n, V = 64, 512
    logits = jnp.asarray(rng.normal(size=(n, V)) * 3, jnp.float32)
    temps = jnp.asarray(rng.uniform(0.2, 2.0, size=n), jnp.float32)
    seeds = jnp.asarray(rng.integers(0, 2**32, size=n), jnp.uint32)
    positions = jnp.arange(n, dtype=jnp.int32)
    off_k, off_p = jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.float32)
    plain = sample(logits, temps, off_k, off_p, seeds, positions)
    # One row with top-k = V filters nothing but sends the whole batch through the sorting path.
    forced = sample(logits, temps, off_k.at[0].set(V), off_p, seeds, positions)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(forced))
    assert len(set(np.asarray(plain).tolist())) > 10  # really drawn, not greedy
