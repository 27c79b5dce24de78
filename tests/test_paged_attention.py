"""Paged and contiguous attention equal dense causal attention (float32, atol 1e-5).

Hypothesis draws block sizes 1..64, GQA ratios 1..8, contexts that cross block boundaries,
permuted and fragmented block tables (random physical blocks, never the null block 0),
batches mixing prefill chunks (new tokens on top of cached context) with decodes, and
padding (extra tokens, sequences and table entries). The pool starts full of garbage, so
anything read that should be masked shows up.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import kv_cache as kvc
from reference import paged_attention as pa
from reference.config import get_preset
from reference.layout import NULL_BLOCK, PagedLayout

EXAMPLES = settings(max_examples=20, deadline=None)  # each example compiles new shapes: keep it modest
ATOL = 1e-5

paged_prefill = jax.jit(pa.paged_prefill_attention, static_argnames="tile")
paged_decode = jax.jit(pa.paged_decode_attention)
contiguous_prefill = jax.jit(pa.contiguous_prefill_attention, static_argnames=("max_context", "tile"))
contiguous_decode = jax.jit(pa.contiguous_decode_attention, static_argnames="max_context")
write_kv = jax.jit(pa.write_kv)


def reference_attention(q, k, v, ctx):
    """Dense causal attention in float64 for one sequence: q [n, H, D] at positions ctx.., k, v [ctx+n, K, D]."""
    n, H, D = q.shape
    G = H // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # [L, H, D]: query head h uses kv head h // G
    s = np.einsum("qhd,lhd->hql", q, k) / math.sqrt(D)  # [H, n, L]
    mask = np.arange(k.shape[0])[None, :] <= (ctx + np.arange(n))[:, None]  # [n, L]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hql,lhd->qhd", p, v)  # [n, H, D]


@st.composite
def batches(draw, decode_only=False):
    """Sequences (cached context, new tokens) and the shapes of one attention call."""
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 8))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    block_size = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 32, 64]))
    n_seqs = draw(st.integers(1, 4))
    ctx = draw(st.lists(st.integers(0, 70), min_size=n_seqs, max_size=n_seqs))
    new = [1] * n_seqs if decode_only else draw(
        st.lists(st.integers(1, 20), min_size=n_seqs, max_size=n_seqs))
    return dict(kv_heads=kv_heads, heads=kv_heads * group, head_dim=head_dim, block_size=block_size,
                ctx=ctx, new=new, tile=draw(st.sampled_from([1, 3, 8, 32])),
                pad_tokens=draw(st.integers(0, 5)), pad_seqs=draw(st.integers(0, 2)),
                pad_blocks=draw(st.integers(0, 2)), spare_blocks=draw(st.integers(0, 5)),
                seed=draw(st.integers(0, 2**16)))


def make_case(b):
    """Random q/k/v per sequence, the flat ragged layout, and the float64 expected output."""
    rng = np.random.default_rng(b["seed"])
    K, H, D = b["kv_heads"], b["heads"], b["head_dim"]
    seqs = []
    for ctx, n in zip(b["ctx"], b["new"]):
        k = rng.standard_normal((ctx + n, K, D)).astype(np.float32)
        v = rng.standard_normal((ctx + n, K, D)).astype(np.float32)
        q = rng.standard_normal((n, H, D)).astype(np.float32)
        seqs.append(dict(ctx=ctx, n=n, k=k, v=v, q=q,
                         expected=reference_attention(q.astype(np.float64), k.astype(np.float64),
                                                      v.astype(np.float64), ctx)))
    S = len(seqs) + b["pad_seqs"]
    T = sum(s["n"] for s in seqs) + b["pad_tokens"]
    flat = dict(q=np.zeros((T, H, D), np.float32), k=np.zeros((T, K, D), np.float32),
                v=np.zeros((T, K, D), np.float32), seq_ids=np.zeros(T, np.int32),
                positions=np.zeros(T, np.int32), query_start=np.zeros(S + 1, np.int32),
                context_lens=np.zeros(S, np.int32))
    t = 0
    for i, s in enumerate(seqs):
        sl = slice(t, t + s["n"])
        flat["q"][sl], flat["k"][sl], flat["v"][sl] = s["q"], s["k"][s["ctx"]:], s["v"][s["ctx"]:]
        flat["seq_ids"][sl], flat["positions"][sl] = i, np.arange(s["ctx"], s["ctx"] + s["n"])
        t += s["n"]
        flat["query_start"][i + 1] = t
        flat["context_lens"][i] = s["ctx"] + s["n"]
    flat["query_start"][len(seqs) + 1:] = t
    return rng, seqs, flat


def expected_flat(seqs):
    return np.concatenate([s["expected"] for s in seqs])  # [real tokens, H, D]


def paged_setup(b, rng, seqs, flat):
    """A garbage-filled pool holding each sequence's cached context in random, fragmented blocks."""
    bs, K, D = b["block_size"], b["kv_heads"], b["head_dim"]
    need = [-(-(s["ctx"] + s["n"]) // bs) for s in seqs]
    num_blocks = 1 + sum(need) + b["spare_blocks"]
    physical = rng.permutation(np.arange(1, num_blocks))  # never the null block
    k_pool = rng.standard_normal((num_blocks, bs, K, D)).astype(np.float32)
    v_pool = rng.standard_normal((num_blocks, bs, K, D)).astype(np.float32)
    S = len(flat["context_lens"])
    tables = np.zeros((S, max(need) + b["pad_blocks"]), np.int32)
    T = len(flat["positions"])
    slot_mapping = np.zeros(T, np.int32)  # padding tokens write into the null block
    used, t = 0, 0
    for i, (s, m) in enumerate(zip(seqs, need)):
        tables[i, :m] = physical[used: used + m]
        used += m
        for p in range(s["ctx"]):  # the cached context, placed by hand
            k_pool[tables[i, p // bs], p % bs] = s["k"][p]
            v_pool[tables[i, p // bs], p % bs] = s["v"][p]
        pos = np.arange(s["ctx"], s["ctx"] + s["n"])
        slot_mapping[t: t + s["n"]] = tables[i, pos // bs] * bs + pos % bs
        t += s["n"]
    return k_pool, v_pool, tables, slot_mapping


def prefill_case(b):
    """A mixed batch written into a paged pool: (seqs, flat, the K pool before the write, slot_mapping, K and V
    caches after it, block tables)."""
    rng, seqs, flat = make_case(b)
    k_pool, v_pool, tables, slot_mapping = paged_setup(b, rng, seqs, flat)
    kc, vc = write_kv(jnp.asarray(k_pool), jnp.asarray(v_pool), flat["k"], flat["v"], slot_mapping)
    return seqs, flat, k_pool, slot_mapping, kc, vc, tables


@EXAMPLES
@given(batches())
def test_paged_prefill_equals_dense(b):
    seqs, flat, k_pool, slot_mapping, kc, vc, tables = prefill_case(b)
    # The write touched only the new tokens' slots and the null block.
    touched = np.zeros(k_pool.shape[:2], bool)
    touched.reshape(-1)[slot_mapping] = True
    touched[NULL_BLOCK] = True
    np.testing.assert_array_equal(np.asarray(kc)[~touched], k_pool[~touched])
    out = paged_prefill(flat["q"], kc, vc, tables, flat["seq_ids"], flat["positions"],
                        flat["query_start"], flat["context_lens"], tile=b["tile"])
    n_real = sum(b["new"])
    np.testing.assert_allclose(np.asarray(out)[:n_real], expected_flat(seqs), atol=ATOL, rtol=ATOL)


def decode_case(b):
    """A decode batch written into a paged pool: (seqs, flat, q [S, H, D] with padded rows zero, K and V caches,
    block tables); rows past len(seqs) are padding (null tables, context 0)."""
    rng, seqs, flat = make_case(b)
    k_pool, v_pool, tables, slot_mapping = paged_setup(b, rng, seqs, flat)
    n = len(seqs)
    kc, vc = write_kv(jnp.asarray(k_pool), jnp.asarray(v_pool), flat["k"][:n], flat["v"][:n], slot_mapping[:n])
    q = np.zeros((len(flat["context_lens"]), b["heads"], b["head_dim"]), np.float32)
    q[:n] = flat["q"][:n]
    return seqs, flat, q, kc, vc, tables


@EXAMPLES
@given(batches(decode_only=True))
def test_paged_decode_equals_dense(b):
    seqs, flat, q, kc, vc, tables = decode_case(b)
    n = len(seqs)
    out = paged_decode(q, kc, vc, tables, flat["context_lens"])
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out)[:n], expected_flat(seqs), atol=ATOL, rtol=ATOL)


def contiguous_setup(b, rng, seqs, flat):
    """Garbage-filled slots [R, N, K, D], each sequence's context in a random slot."""
    K, D = b["kv_heads"], b["head_dim"]
    longest = max(s["ctx"] + s["n"] for s in seqs)
    R, N = len(seqs) + b["spare_blocks"], longest + b["pad_blocks"] * 3
    k_cache = rng.standard_normal((R, N, K, D)).astype(np.float32)
    v_cache = rng.standard_normal((R, N, K, D)).astype(np.float32)
    S, T = len(flat["context_lens"]), len(flat["positions"])
    slots = np.zeros(S, np.int32)
    slots[: len(seqs)] = rng.permutation(R)[: len(seqs)]
    slot_mapping = np.full(T, R * N, np.int32)  # padding tokens: past the end, dropped
    t = 0
    for i, s in enumerate(seqs):
        k_cache[slots[i], : s["ctx"]] = s["k"][: s["ctx"]]
        v_cache[slots[i], : s["ctx"]] = s["v"][: s["ctx"]]
        slot_mapping[t: t + s["n"]] = slots[i] * N + np.arange(s["ctx"], s["ctx"] + s["n"])
        t += s["n"]
    max_context = int(rng.integers(longest, N + 1))
    return k_cache, v_cache, slots, slot_mapping, max_context


@EXAMPLES
@given(batches())
def test_contiguous_prefill_equals_dense(b):
    rng, seqs, flat = make_case(b)
    k_cache, v_cache, slots, slot_mapping, max_context = contiguous_setup(b, rng, seqs, flat)
    kc, vc = write_kv(jnp.asarray(k_cache), jnp.asarray(v_cache), flat["k"], flat["v"], slot_mapping)
    touched = np.zeros(k_cache.shape[:2], bool)
    touched.reshape(-1)[slot_mapping[slot_mapping < touched.size]] = True
    np.testing.assert_array_equal(np.asarray(kc)[~touched], k_cache[~touched])  # padding writes dropped
    out = contiguous_prefill(flat["q"], kc, vc, slots, flat["seq_ids"], flat["positions"],
                             flat["query_start"], flat["context_lens"], max_context=max_context,
                             tile=b["tile"])
    np.testing.assert_allclose(np.asarray(out)[: sum(b["new"])], expected_flat(seqs), atol=ATOL, rtol=ATOL)


@EXAMPLES
@given(batches(decode_only=True))
def test_contiguous_decode_equals_dense(b):
    rng, seqs, flat = make_case(b)
    k_cache, v_cache, slots, slot_mapping, max_context = contiguous_setup(b, rng, seqs, flat)
    n = len(seqs)
    kc, vc = write_kv(jnp.asarray(k_cache), jnp.asarray(v_cache), flat["k"][:n], flat["v"][:n], slot_mapping[:n])
    q = np.zeros((len(slots), b["heads"], b["head_dim"]), np.float32)
    q[:n] = flat["q"][:n]
    out = contiguous_decode(q, kc, vc, slots, flat["context_lens"], max_context=max_context)
    np.testing.assert_allclose(np.asarray(out)[:n], expected_flat(seqs), atol=ATOL, rtol=ATOL)


def test_query_tiles_never_mix_sequences():
    query_start = jnp.array([0, 5, 5, 6, 14, 14])  # lengths 5, 0, 1, 8, 0 (padding)
    tile_seq, tokens, valid, begin = pa.query_tiles(query_start, num_tiles=5 + 14 // 4 + 1, tile=4)
    tile_seq, tokens, valid = map(np.asarray, (tile_seq, tokens, valid))
    seen = tokens[valid]
    assert sorted(seen.tolist()) == list(range(14))  # every token exactly once
    owner = np.searchsorted(np.asarray(query_start), tokens, side="right") - 1
    assert ((owner == tile_seq[:, None]) | ~valid).all()
    np.testing.assert_array_equal(np.asarray(begin), [0, 2, 2, 3, 5])


def test_copy_blocks_copies_every_layer():
    cfg = get_preset("tiny")
    cache = kvc.allocate(cfg, PagedLayout(num_blocks=8, block_size=4))
    rng = np.random.default_rng(0)
    cache = [(jnp.asarray(rng.standard_normal(k.shape), jnp.float32), v + 1.0) for k, v in cache]
    before = [(np.asarray(k), np.asarray(v)) for k, v in cache]
    cache = kvc.copy_blocks(cache, [(3, 5), (5, 6), (1, 2)])  # reads see the pool before the copies
    for (k0, v0), (k, v) in zip(before, cache):
        k, v = np.asarray(k), np.asarray(v)
        for src, dst in [(3, 5), (5, 6), (1, 2)]:
            np.testing.assert_array_equal(k[dst], k0[src])
            np.testing.assert_array_equal(v[dst], v0[src])
        np.testing.assert_array_equal(k[[0, 1, 3, 4, 7]], k0[[0, 1, 3, 4, 7]])
    assert kvc.kv_bytes(cfg, PagedLayout(8, 4)) == kvc.cache_bytes(cache) == 2 * 2 * 8 * 4 * 2 * 16 * 4
