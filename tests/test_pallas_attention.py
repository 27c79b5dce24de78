"""The Pallas paged-attention kernel (interpret mode) equals the jnp reference and dense float64.

The cases are the ones of tests/test_paged_attention.py, drawn by the same hypothesis
strategy: block sizes 1..64, GQA ratios 1..8, contexts crossing block boundaries, permuted
and fragmented tables over a garbage-filled pool, ragged batches mixing prefill chunks with
decodes, padding tokens, sequences and table entries. On top, the kernel's own knobs (keys per
loop step, context splits) are drawn too.

"Reads K/V through the block table" is tested concretely: blocks that no table references are
filled with NaN (or huge values) and the output must not change; then every slot that holds no
live token (the null block, the unused tail of each last block) is filled with NaN too, and the
kernel must still equal the float64 reference with every output finite, padding included.
The Triton lowering (to the GPU backend's IR, without a GPU) is checked for Llama-like shapes:
the pools reach no op but the kernel, and float32 dots stay IEEE (not TF32).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Literal
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import paged_attention as pa
from reference import pallas_attention as pk
from reference.errors import ConfigError
from tests.test_paged_attention import (batches, expected_flat, make_case, paged_decode, paged_prefill,
                                        paged_setup, write_kv)

EXAMPLES = settings(max_examples=15, deadline=None)  # each example compiles an interpreted kernel
ATOL = 1e-5  # against float64, as the reference's own tests
ATOL_JNP = 2e-6  # against the float32 jnp reference: same math, different summation order

KNOBS = ("interpret", "keys_per_step", "context_splits")
prefill_kernel = jax.jit(functools.partial(pk.paged_prefill_attention_pallas, interpret=True),
                         static_argnames=("tile", *KNOBS))
decode_kernel = jax.jit(functools.partial(pk.paged_decode_attention_pallas, interpret=True),
                        static_argnames=KNOBS)

knobs = st.fixed_dictionaries(dict(keys_per_step=st.sampled_from([None, 16, 64]),
                                   context_splits=st.sampled_from([None, 1, 2, 5])))


def prefill_case(b):
    """The pool after this step's write, the tables and the flat ragged batch."""
    rng, seqs, flat = make_case(b)
    k_pool, v_pool, tables, slot_mapping = paged_setup(b, rng, seqs, flat)
    kc, vc = write_kv(jnp.asarray(k_pool), jnp.asarray(v_pool), flat["k"], flat["v"], slot_mapping)
    return seqs, flat, np.asarray(kc), np.asarray(vc), tables


def decode_case(b):
    """As prefill_case with one new token per sequence; q padded to the padded sequences."""
    rng, seqs, flat = make_case(b)
    k_pool, v_pool, tables, slot_mapping = paged_setup(b, rng, seqs, flat)
    n = len(seqs)
    kc, vc = write_kv(jnp.asarray(k_pool), jnp.asarray(v_pool), flat["k"][:n], flat["v"][:n], slot_mapping[:n])
    q = np.zeros((len(flat["context_lens"]), b["heads"], b["head_dim"]), np.float32)
    q[:n] = flat["q"][:n]
    return seqs, flat, q, np.asarray(kc), np.asarray(vc), tables


def run_prefill(fn, flat, kc, vc, tables, tile, **kw):
    return np.asarray(fn(flat["q"], kc, vc, tables, flat["seq_ids"], flat["positions"],
                         flat["query_start"], flat["context_lens"], tile=tile, **kw))


@EXAMPLES
@given(batches(), knobs)
def test_pallas_prefill_equals_references(b, kw):
    seqs, flat, kc, vc, tables = prefill_case(b)
    out = run_prefill(prefill_kernel, flat, kc, vc, tables, b["tile"], **kw)
    ref = run_prefill(paged_prefill, flat, kc, vc, tables, b["tile"])
    n_real = sum(b["new"])
    assert np.isfinite(out).all()  # padding tokens included
    np.testing.assert_allclose(out[:n_real], expected_flat(seqs), atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(out[:n_real], ref[:n_real], atol=ATOL_JNP, rtol=ATOL_JNP)


@EXAMPLES
@given(batches(decode_only=True), knobs)
def test_pallas_decode_equals_references(b, kw):
    seqs, flat, q, kc, vc, tables = decode_case(b)
    out = np.asarray(decode_kernel(q, kc, vc, tables, flat["context_lens"], **kw))
    ref = np.asarray(paged_decode(q, kc, vc, tables, flat["context_lens"]))
    n = len(seqs)
    assert np.isfinite(out).all()  # padding sequences (context 0) included
    np.testing.assert_allclose(out[:n], expected_flat(seqs), atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(out[:n], ref[:n], atol=ATOL_JNP, rtol=ATOL_JNP)


# ----------------------------------------------------------------------------- reads through the table

# One fixed ragged batch: GQA 4, block size 5 (live contexts end mid-block), a decode, two
# chunked prefills on top of cached context, a fresh prompt, padding tokens, a padding
# sequence and padding table entries; plenty of spare (never referenced) blocks.
FIXED = dict(kv_heads=2, heads=8, head_dim=16, block_size=5, ctx=[37, 0, 12, 64], new=[1, 9, 20, 3],
             tile=8, pad_tokens=3, pad_seqs=1, pad_blocks=2, spare_blocks=12, seed=7)


def live_slots(pool, flat, tables):
    """Boolean [NB, BS]: the slots of pool [NB, BS, K, D] holding a live token (< context_len)."""
    bs = pool.shape[1]
    live = np.zeros(pool.shape[:2], bool)
    for s, ctx in enumerate(flat["context_lens"]):
        for p in range(ctx):
            live[tables[s, p // bs], p % bs] = True
    return live


@pytest.mark.parametrize("poison", [np.nan, 3e38])
def test_kernel_reads_only_blocks_in_the_tables(poison):
    b = FIXED
    seqs, flat, kc, vc, tables = prefill_case(b)
    referenced = np.zeros(kc.shape[0], bool)
    referenced[tables] = True  # includes the null block 0 (padding entries)
    assert (~referenced).sum() >= b["spare_blocks"]
    kc_p, vc_p = kc.copy(), vc.copy()
    kc_p[~referenced], vc_p[~referenced] = poison, poison
    n_real = sum(b["new"])

    ref = run_prefill(paged_prefill, flat, kc, vc, tables, b["tile"])
    for kw in (dict(), dict(keys_per_step=16, context_splits=3)):
        out = run_prefill(prefill_kernel, flat, kc_p, vc_p, tables, b["tile"], **kw)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out[:n_real], ref[:n_real], atol=ATOL_JNP, rtol=ATOL_JNP)
        np.testing.assert_allclose(out[:n_real], expected_flat(seqs), atol=ATOL, rtol=ATOL)

    # Decode over the same pool: each sequence's query at its last position.
    last = flat["query_start"][1:] - 1  # [S]; the padding sequence's index is harmless (masked below)
    q = flat["q"][np.maximum(last, 0)]
    ctx = flat["context_lens"]
    out = np.asarray(decode_kernel(q, kc_p, vc_p, tables, ctx))
    ref = np.asarray(paged_decode(q, kc, vc, tables, ctx))
    assert np.isfinite(out).all()  # the padding sequence (context 0) too
    n = len(seqs)
    np.testing.assert_allclose(out[:n], ref[:n], atol=ATOL_JNP, rtol=ATOL_JNP)


def test_kernel_output_depends_only_on_live_tokens():
    """NaN in every slot without a live token (null block, tails of last blocks, spare blocks)."""
    b = FIXED
    seqs, flat, kc, vc, tables = prefill_case(b)
    live = live_slots(kc, flat, tables)
    assert not live[0].any() and (~live[1:]).sum() > 0  # the null block and some tails are poisoned
    kc, vc = kc.copy(), vc.copy()
    kc[~live], vc[~live] = np.nan, np.nan
    out = run_prefill(prefill_kernel, flat, kc, vc, tables, b["tile"], keys_per_step=16, context_splits=2)
    assert np.isfinite(out).all()  # padding tokens too
    np.testing.assert_allclose(out[: sum(b["new"])], expected_flat(seqs), atol=ATOL, rtol=ATOL)
    # The jnp reference multiplies masked probabilities (0) by the masked values: 0 * NaN = NaN.
    ref = run_prefill(paged_prefill, flat, kc, vc, tables, b["tile"])
    assert np.isnan(ref[: sum(b["new"])]).any()


def test_bfloat16_matches_the_reference():
    b = dict(FIXED, head_dim=32)
    seqs, flat, kc, vc, tables = prefill_case(b)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    args = (bf(flat["q"]), bf(kc), bf(vc), tables, flat["seq_ids"], flat["positions"],
            flat["query_start"], flat["context_lens"])
    out = prefill_kernel(*args, tile=b["tile"])
    ref = paged_prefill(*args, tile=b["tile"])
    assert out.dtype == jnp.bfloat16
    n_real = sum(b["new"])
    out, ref = np.asarray(out, np.float32)[:n_real], np.asarray(ref, np.float32)[:n_real]
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(out, expected_flat(seqs), atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------- GPU lowering, backend choice

S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("block_size,heads,kv_heads", [(16, 32, 8), (3, 12, 4)])
def test_lowers_to_triton_for_a_gpu(dtype, block_size, heads, kv_heads):
    """Pallas lowers both kernels to Triton IR for platform "cuda" (no GPU needed to lower)."""
    D, NB, MB, B, T, Sp = 128, 64, 8, 4, 64, 3
    pool = S((NB, block_size, kv_heads, D), dtype)
    decode = functools.partial(pk.paged_decode_attention_pallas, interpret=False)
    prefill = functools.partial(pk.paged_prefill_attention_pallas, interpret=False, tile=16)
    i32 = jnp.int32
    lowered = [
        jax.jit(decode).trace(S((B, heads, D), dtype), pool, pool, S((B, MB), i32), S((B,), i32)),
        jax.jit(prefill).trace(S((T, heads, D), dtype), pool, pool, S((Sp, MB), i32), S((T,), i32),
                               S((T,), i32), S((Sp + 1,), i32), S((Sp,), i32)),
    ]
    for traced in lowered:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text  # the kernel became a Triton call
        assert_pool_only_reaches_the_kernel(traced.jaxpr.jaxpr)


def assert_pool_only_reaches_the_kernel(jaxpr):
    """Outside the kernel, the K/V pools (inputs 1, 2) are only reshaped, then handed to pallas_call.

    So the wrapper never gathers a context: every read of K/V happens inside the kernel.
    """
    if jaxpr.eqns and jaxpr.eqns[0].primitive.name in ("pjit", "jit") and len(jaxpr.eqns) == 1:
        jaxpr = jaxpr.eqns[0].params["jaxpr"].jaxpr  # look inside the jit
    pool = {jaxpr.invars[1], jaxpr.invars[2]}
    reached_kernel = set()
    for eqn in jaxpr.eqns:
        used = pool.intersection(v for v in eqn.invars if not isinstance(v, Literal))
        if not used:
            continue
        name = eqn.primitive.name
        assert name in ("reshape", "pallas_call"), f"a K/V pool reaches {name} outside the kernel"
        if name == "reshape":
            pool.update(eqn.outvars)
        else:
            reached_kernel.update(used)
    assert len(reached_kernel) == 2


def test_float32_dots_are_ieee_not_tf32(monkeypatch, capsys):
    """At DEFAULT precision Triton would run float32 dots as TF32; the kernel asks for IEEE."""
    monkeypatch.setattr(pk, "DEBUG", True)  # pallas_call prints the Triton module it lowers
    pool = S((8, 16, 2, 16), jnp.float32)
    decode = functools.partial(pk.paged_decode_attention_pallas, interpret=False)
    jax.jit(decode).trace(S((2, 4, 16), jnp.float32), pool, pool, S((2, 4), jnp.int32),
                          S((2,), jnp.int32)).lower(lowering_platforms=("cuda",))
    ir = capsys.readouterr().out
    assert ir.count("tt.dot") == 2 and "tf32" not in ir


def test_gpu_path_rejects_what_triton_cannot_lower():
    pool = jnp.zeros((4, 16, 1, 8), jnp.float32)  # head_dim 8: not a Triton matmul tile
    args = (jnp.zeros((1, 2, 8)), pool, pool, jnp.zeros((1, 2), jnp.int32), jnp.ones(1, jnp.int32))
    with pytest.raises(ConfigError, match="head_dim"):
        pk.paged_decode_attention_pallas(*args, interpret=False)
    with pytest.raises(ConfigError, match="keys_per_step"):
        pk.paged_decode_attention_pallas(*args, interpret=True, keys_per_step=24)
    with pytest.raises(ConfigError, match="context_splits"):
        pk.paged_decode_attention_pallas(*args, interpret=True, context_splits=0)


def test_attention_backend_names():
    assert pk.attention_backend("jnp") == (pa.paged_decode_attention, pa.paged_prefill_attention)
    assert pk.attention_backend("pallas") == (pk.paged_decode_attention_pallas, pk.paged_prefill_attention_pallas)
    want = "pallas" if jax.default_backend() == "gpu" else "jnp"
    assert pk.attention_backend("auto") == pk.attention_backend(want)
    with pytest.raises(ConfigError, match=r"attention: .*'triton'.*allowed: auto, pallas, jnp"):
        pk.attention_backend("triton")


def test_backend_pair_swaps_in_under_jit():
    """As the runner will call the pair: positional arguments (tile too), inside one jitted step."""
    b = FIXED
    seqs, flat, kc, vc, tables = prefill_case(b)
    q_dec = flat["q"][np.maximum(flat["query_start"][1:] - 1, 0)]  # [S, H, D] a query per sequence

    def step(decode, prefill, tile):
        def run(q, kc, vc, tables, seq_ids, positions, query_start, context_lens, q_dec):
            return (prefill(q, kc, vc, tables, seq_ids, positions, query_start, context_lens, tile),
                    decode(q_dec, kc, vc, tables, context_lens))
        return jax.jit(run)

    args = (flat["q"], kc, vc, tables, flat["seq_ids"], flat["positions"], flat["query_start"],
            flat["context_lens"], q_dec)
    got = step(*pk.attention_backend("pallas"), b["tile"])(*args)
    want = step(*pk.attention_backend("jnp"), b["tile"])(*args)
    n_tokens, n_seqs = sum(b["new"]), len(seqs)  # real tokens, real sequences
    np.testing.assert_allclose(np.asarray(got[0])[:n_tokens], np.asarray(want[0])[:n_tokens],
                               atol=ATOL_JNP, rtol=ATOL_JNP)
    np.testing.assert_allclose(np.asarray(got[1])[:n_seqs], np.asarray(want[1])[:n_seqs],
                               atol=ATOL_JNP, rtol=ATOL_JNP)
