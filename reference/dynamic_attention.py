"""Attention over a KV cache whose context length is a run-time value, not a compiled shape.

reference.paged_attention gathers each sequence's context padded to a bucket that is part of the
compiled shape, so a server meets one compiled step per (rows, context bucket) pair and the
shape set multiplies. Here the context arrays are always as wide as the longest possible context
(context_cap), and attention walks them in chunks of `chunk` tokens with an online softmax
(running max and sum, as FlashAttention and vLLM's paged kernels do), for only as many chunks as
the step's longest sequence needs: `lax.fori_loop` with a trip count computed on the device. A
step then costs what its real contexts cost, and its compiled shape no longer depends on them.

The two products (q.k, p.v) take their inputs in float32 by default; a runner with bfloat16 matmul
copies runs them in bfloat16 with float32 accumulation (ModelRunner matmul_dtype): at 16 decode rows
on this CPU that cut attention from ~13 to ~8.5 ms of a ~37 ms step (engine_speed16.md section 6).

Same mask as paged_attention.attend_tiles: a query at position p sees keys at positions <= p and
< context_len; padding rows (no valid key) stay finite.

Shape letters: S rows (sequences or tiles), Q queries per row, C chunk tokens, H query heads,
K kv heads, G = H // K, D head dim.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from reference import paged_attention as pa

Array = jax.Array
_MASKED = -1e30
DEFAULT_CHUNK = 256  # context tokens per loop iteration


def _online_attention(q: Array, q_pos: Array, context_lens: Array, fetch: Callable, chunk: int,
                      dtype=jnp.float32) -> Array:
    """q [S, Q, H, D], q_pos [S, Q] (-1: sees nothing), context_lens [S] -> [S, Q, H, D].

    fetch(j) -> (k, v) [S, chunk, K, D]: keys j*chunk .. (j+1)*chunk - 1 of each row's sequence.
    dtype: the inputs of the two products (q.k and p.v), accumulated in float32; the softmax (max,
    exp, sums) stays float32 either way.
    """
    S, Q, H, D = q.shape
    k0, _ = jax.eval_shape(fetch, 0)
    K = k0.shape[2]
    G = H // K
    qg = (q.reshape(S, Q, K, G, D).astype(jnp.float32) * (1.0 / math.sqrt(D))).astype(dtype)  # [S, Q, K, G, D]
    limit = jnp.minimum(context_lens[:, None], q_pos + 1)  # [S, Q]: keys < limit are visible
    num_chunks = (jnp.max(limit) + chunk - 1) // chunk

    def body(j, carry):
        m, l, acc = carry  # [S, K, G, Q], [S, K, G, Q], [S, K, G, Q, D]
        k, v = fetch(j)  # [S, C, K, D]
        s = jnp.einsum("sqkgd,sckd->skgqc", qg, k.astype(dtype), preferred_element_type=jnp.float32)  # [S, K, G, Q, C]
        key_pos = j * chunk + jnp.arange(chunk)  # [C]
        visible = key_pos[None, None, :] < limit[:, :, None]  # [S, Q, C]
        s = jnp.where(visible[:, None, None], s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])  # [S, K, G, Q, C]
        corr = jnp.exp(m - m_new)
        acc = acc * corr[..., None] + jnp.einsum("skgqc,sckd->skgqd", p.astype(dtype), v.astype(dtype),
                                                 preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc

    init = (jnp.full((S, K, G, Q), _MASKED, jnp.float32), jnp.zeros((S, K, G, Q), jnp.float32),
            jnp.zeros((S, K, G, Q, D), jnp.float32))
    if getattr(fetch, "num_chunks", 0) == 1:  # one chunk covers every context: no loop to compile
        _, l, acc = body(0, init)
    else:
        _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # [S, K, G, Q, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(S, Q, H, D).astype(q.dtype)


def paged_fetch(k_cache: Array, v_cache: Array, tables: Array, chunk: int) -> Callable:
    """fetch(j) for rows reading through block tables [S, MB] (MB * block_size >= every context)."""
    bs = k_cache.shape[1]
    per = chunk // bs  # blocks per chunk
    S, MB = tables.shape
    width = -(-MB // per) * per
    tables = jnp.pad(tables, ((0, 0), (0, width - MB)))  # the null block: masked anyway

    def fetch(j):
        t = jax.lax.dynamic_slice(tables, (0, j * per), (S, per))  # [S, per]
        return (k_cache[t].reshape(S, per * bs, *k_cache.shape[2:]),
                v_cache[t].reshape(S, per * bs, *v_cache.shape[2:]))
    fetch.num_chunks = width // per
    return fetch


def slot_fetch(k_cache: Array, v_cache: Array, slots: Array, chunk: int) -> Callable:
    """fetch(j) for rows reading their slot's positions (slots [S]); past the slot's end is clipped and masked."""
    max_len = k_cache.shape[1]

    def fetch(j):
        pos = jnp.minimum(j * chunk + jnp.arange(chunk), max_len - 1)  # [C]
        return k_cache[slots[:, None], pos[None, :]], v_cache[slots[:, None], pos[None, :]]
    fetch.num_chunks = -(-max_len // chunk)
    return fetch


def chunk_for(row_len: int, block_size: int | None, chunk: int = DEFAULT_CHUNK) -> int:
    """The loop's chunk (tokens): a multiple of the block size, no wider than needed."""
    if block_size is None:
        return min(chunk, row_len)
    return max(block_size, (min(chunk, row_len) // block_size) * block_size)


def decode_attention(q: Array, context_lens: Array, fetch: Callable, chunk: int, dtype=jnp.float32) -> Array:
    """One query per row, at position context_len - 1: q [S, H, D] -> [S, H, D] (dtype: the products' inputs)."""
    return _online_attention(q[:, None], (context_lens - 1)[:, None], context_lens, fetch, chunk, dtype)[:, 0]


def prefill_attention(q: Array, seq_ids: Array, positions: Array, query_start: Array, context_lens: Array,
                      make_fetch: Callable, chunk: int, tile: int, dtype=jnp.float32) -> Array:
    """Ragged queries (as paged_attention.paged_prefill_attention) over run-time contexts: q [T, H, D] -> [T, H, D].

    make_fetch(tile_seq [N]) -> fetch(j) for the N tiles' sequences. dtype: the products' inputs.
    """
    T, H, D = q.shape
    S = query_start.shape[0] - 1
    num_tiles = S + -(-T // tile)
    tile_seq, tile_tokens, valid, tile_begin = pa.query_tiles(query_start, num_tiles, tile)
    q_pos = jnp.where(valid, positions[tile_tokens], -1)  # [N, tile]
    o = _online_attention(q[tile_tokens], q_pos, context_lens[tile_seq], make_fetch(tile_seq), chunk, dtype)
    row = tile_begin[seq_ids] * tile + (jnp.arange(T) - query_start[seq_ids])  # [T]
    row = jnp.clip(row, 0, num_tiles * tile - 1)
    return o.reshape(num_tiles * tile, H, D)[row]
