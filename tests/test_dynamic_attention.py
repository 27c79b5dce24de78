"""Attention over run-time contexts (reference.dynamic_attention) against dense float64 attention:
float32 products to 1e-5, bfloat16 products (a runner with bfloat16 matmul copies) within bfloat16
rounding; paged pools as tests/test_paged_attention.py builds them (fragmented blocks, garbage around)."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given

from reference import dynamic_attention as dyn
from tests.test_paged_attention import ATOL, EXAMPLES, batches, decode_case, expected_flat, prefill_case

BF16_ATOL = 0.05  # q, k, v are standard normal: outputs of order 1; bfloat16 keeps 8 bits of mantissa


@partial(jax.jit, static_argnames=("chunk", "dtype"))
def decode(q, kc, vc, tables, context_lens, *, chunk, dtype):
    return dyn.decode_attention(q, context_lens, dyn.paged_fetch(kc, vc, tables, chunk), chunk, dtype)


@partial(jax.jit, static_argnames=("chunk", "tile", "dtype"))
def prefill(q, kc, vc, tables, seq_ids, positions, query_start, context_lens, *, chunk, tile, dtype):
    return dyn.prefill_attention(q, seq_ids, positions, query_start, context_lens,
                                 lambda rows: dyn.paged_fetch(kc, vc, tables[rows], chunk), chunk, tile, dtype)


def chunk_of(b, tables) -> int:
    """A chunk of a few blocks, so longer contexts take several loop iterations."""
    return dyn.chunk_for(tables.shape[1] * b["block_size"], b["block_size"], chunk=2 * b["block_size"])


def check(out, expected, dtype):
    atol = ATOL if dtype == "float32" else BF16_ATOL
    np.testing.assert_allclose(np.asarray(out), expected, atol=atol, rtol=atol)


@EXAMPLES
@given(batches(decode_only=True))
def test_dynamic_decode_equals_dense_in_float32_and_bfloat16(b):
    seqs, flat, q, kc, vc, tables = decode_case(b)
    n = len(seqs)
    for dtype in ("float32", "bfloat16"):
        out = decode(q, kc, vc, tables, flat["context_lens"], chunk=chunk_of(b, tables), dtype=dtype)
        assert np.isfinite(np.asarray(out)).all()
        check(np.asarray(out)[:n], expected_flat(seqs), dtype)


@EXAMPLES
@given(batches())
def test_dynamic_prefill_equals_dense_in_float32_and_bfloat16(b):
    seqs, flat, _, _, kc, vc, tables = prefill_case(b)
    n_real = sum(b["new"])
    for dtype in ("float32", "bfloat16"):
        out = prefill(flat["q"], kc, vc, tables, flat["seq_ids"], flat["positions"], flat["query_start"],
                      flat["context_lens"], chunk=chunk_of(b, tables), tile=b["tile"], dtype=dtype)
        check(np.asarray(out)[:n_real], expected_flat(seqs), dtype)


def test_bfloat16_products_differ_from_float32():
    """The bfloat16 path is taken (it is not float32 under another name) and stays close."""
    rng = np.random.default_rng(0)
    kc = jnp.asarray(rng.standard_normal((9, 4, 2, 8)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((9, 4, 2, 8)), jnp.float32)
    tables = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    ctx = jnp.asarray([13, 16], jnp.int32)
    a = decode(q, kc, vc, tables, ctx, chunk=8, dtype="float32")
    b = decode(q, kc, vc, tables, ctx, chunk=8, dtype="bfloat16")
    assert 0 < np.abs(np.asarray(a) - np.asarray(b)).max() < BF16_ATOL
