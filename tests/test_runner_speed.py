"""What keeps the runner's step fast on a CPU: the donated KV cache is updated in place (no copy of a
cache-sized array in any step shape's compiled program), and the bfloat16 matrices for batched
steps (an explicit option) stay within their tolerance of float32."""
import re

import jax.numpy as jnp
import numpy as np
import pytest

from reference.errors import ConfigError
from reference.layout import PagedLayout, SlotLayout
from reference.request import Request
from reference.runner import _COMPILED, ModelRunner
from tests.test_runner import (
    CFG,
    GREEDY,
    PARAMS,
    MiniScheduler,
    execute,
    paged,
    prompts,
    run,
)


def cache_copies(runner: ModelRunner) -> dict:
    """{step shape: number of copy instructions producing an array as large as one layer's K (or V) cache}."""
    rows, row_len = runner.layout.rows, runner.layout.row_len
    K, D = CFG.num_kv_heads, CFG.head_dim
    cache_array = re.compile(rf"= f32\[({rows},{row_len}|{rows * row_len}),{K},{D}\]\S* copy\(")
    out = {}
    for shape in runner.shapes():
        runner.compile_shape(shape)
        step = runner._abstract_step(shape)
        out[shape] = len(cache_array.findall(_COMPILED[runner._compile_key(step)].as_text()))
    return out


@pytest.mark.parametrize("layout, dynamic", [(PagedLayout(64, 4), True), (PagedLayout(64, 4), False),
                                             (SlotLayout(3, 64), True)])
def test_every_step_shape_updates_the_kv_cache_in_place(layout, dynamic):
    runner = ModelRunner(CFG, PARAMS, layout=layout, min_seqs=1, min_tokens=16, max_seqs=3, max_tokens=24,
                         growth=4, mixed_growth=4, dynamic_context=dynamic, max_context=64, coarse_mixed=True)
    copies = cache_copies(runner)
    assert copies and not any(copies.values()), copies


SERVER_LIKE = dict(min_seqs=1, min_tokens=16, max_seqs=4, max_tokens=64, growth=4, dynamic_context=True,
                   max_context=64, coarse_mixed=True)  # the server's runner options, small


@pytest.mark.parametrize("options", [{}, SERVER_LIKE], ids=["bucketed context", "dynamic context"])
def test_bfloat16_matrices_stay_close_to_float32(options):
    """matmul_dtype is an explicit option with its own tolerance against the float32 runner: the
    logits of every step (prefills on the [in, out] copy, decodes on the [out, in] one) stay within
    bfloat16 rounding of float32's. With a run-time context (the server's runner) attention's two
    products are in bfloat16 too."""
    ps = prompts([13, 30, 5, 40], seed=2)
    # prefills [in, out], 4-row decodes [out, in]
    exact, low = paged(**options), paged(matmul_dtype="bfloat16", batched_from=5, **options)
    assert low.attention_dtype == "bfloat16" and exact.attention_dtype == "float32"
    reqs = [Request(f"r{i}", p, GREEDY) for i, p in enumerate(ps)]
    sched = MiniScheduler(exact)  # block tables for both runners (same layout)
    steps = 0
    while not all(r.is_done_generating() for r in reqs):
        chunks = [sched.chunk(r) for r in reqs if not r.is_done_generating()]
        tokens = iter(execute(exact, chunks))
        execute(low, chunks)  # teacher forcing: both runners see the float32 runner's tokens
        a, b = exact.last_logits(), low.last_logits()
        np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())
        assert np.abs(b - a).max() > 0  # the bfloat16 matrices were used
        for c in chunks:
            c.request.num_computed_tokens = c.end
            if c.samples:
                c.request.append_token(next(tokens), 0.0)
        steps += 1
    assert steps > 6
    assert low.batched_params.layers[0].wq.dtype == jnp.bfloat16 and low.params.layers[0].wq.dtype == jnp.float32
    assert low.few_rows_params.layers[0].wq.t.shape == low.params.layers[0].wq.T.shape


def test_float32_matmul_copies_give_the_same_tokens():
    """matmul_dtype="float32" only lays the matrices out differently: same tokens as the plain runner."""
    ps = prompts([13, 30, 5, 40], seed=2)
    assert run(paged(matmul_dtype="float32", batched_from=5), ps) == run(paged(), ps)


def test_bad_batched_options_name_the_field():
    with pytest.raises(ConfigError, match="matmul_dtype"):
        paged(matmul_dtype="int4")
    with pytest.raises(ConfigError, match="batched_from"):
        paged(batched_from=0)
