"""Attention over a KV cache, in pure jnp: paged (block tables) and contiguous (slots).

Each layer first writes the step's new K/V into the cache (`write_kv`), then every query
attends over its own sequence's cached K/V, which now includes the tokens of this very step.

One piece of math serves every case (`attend_tiles`): a tile of queries from ONE sequence
against that sequence's context, with the mask key_position <= query_position. What
differs between the layouts is only how a sequence's context is fetched:

  paged       k_cache[block_table]  -> [max_blocks, block_size, K, D] -> [max_blocks * block_size, K, D]
  contiguous  k_cache[slot, :L]     -> [L, K, D]

Decode is a tile of one query per sequence. Ragged prefill (chunked prefill, mixed with
decodes) cuts each sequence's new tokens into tiles of `tile` queries, so a context is
gathered once per tile instead of once per token, and no tile mixes two sequences.

Block tables are padded with the null block 0 (never -1: JAX would silently read the last
block); padded positions are masked out. Masks use a large finite negative, never -inf,
so a fully masked (padding) row stays finite.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
_MASKED = -1e30


def write_kv(k_cache: Array, v_cache: Array, k: Array, v: Array, slot_mapping: Array) -> tuple[Array, Array]:
    """Scatter new K/V into the cache. k_cache [R, N, K, D], k, v [T, K, D], slot_mapping [T].

    slot = row * N + offset (paged: block * block_size + offset; contiguous: slot * max_len + position).
    Paged padding tokens point at the null block (slot 0 .. block_size-1); indices past the end
    (contiguous padding) are dropped.
    """
    # Indexed as (row, offset) on the 4-D array, not through a reshape to [R * N, K, D]: with the
    # reshape, XLA CPU turns a one-token write into a dynamic-update-slice that it duplicates across
    # the bitcast and then copies the donated cache in its program (no run-time cost was measurable,
    # but the program without copies is the one to keep; experiments/results/server16/engine_speed16.md).
    N = k_cache.shape[1]
    row, offset = slot_mapping // N, slot_mapping % N  # a slot past the end has row >= R: dropped
    return (k_cache.at[row, offset].set(k.astype(k_cache.dtype), mode="drop"),
            v_cache.at[row, offset].set(v.astype(v_cache.dtype), mode="drop"))


def attend_tiles(q: Array, q_pos: Array, k: Array, v: Array, context_lens: Array) -> Array:
    """Tiles of queries against their sequence's context (GQA, causal by position).

    q [S, Q, H, D], q_pos [S, Q], k, v [S, C, K, D] (key c is at position c), context_lens [S]
    -> [S, Q, H, D]. A query at position p sees keys at positions <= p and < context_len.
    """
    S, Q, H, D = q.shape
    C, K = k.shape[1], k.shape[2]
    qg = q.reshape(S, Q, K, H // K, D)  # [S, Q, K, G, D]
    s = jnp.einsum("sqkgd,sckd->skgqc", qg, k, preferred_element_type=jnp.float32)  # [S, K, G, Q, C]
    s = s * (1.0 / math.sqrt(D))
    key_pos = jnp.arange(C)  # [C]
    mask = (key_pos <= q_pos[:, :, None]) & (key_pos < context_lens[:, None, None])  # [S, Q, C]
    s = jnp.where(mask[:, None, None], s, _MASKED)  # [S, K, G, Q, C]
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)  # [S, K, G, Q, C]
    o = jnp.einsum("skgqc,sckd->sqkgd", p, v, preferred_element_type=jnp.float32)  # [S, Q, K, G, D]
    return o.reshape(S, Q, H, D).astype(q.dtype)


def gather_paged(cache: Array, block_tables: Array) -> Array:
    """The context of each sequence from the pool: cache [NB, BS, K, D], block_tables [S, MB] -> [S, MB*BS, K, D]."""
    S, MB = block_tables.shape
    _, BS, K, D = cache.shape
    return cache[block_tables].reshape(S, MB * BS, K, D)  # gather only the blocks in the tables


def gather_contiguous(cache: Array, slots: Array, max_context: int) -> Array:
    """The context of each sequence from its slot: cache [R, N, K, D], slots [S] -> [S, max_context, K, D]."""
    return cache[slots, :max_context]


# ----------------------------------------------------------------------------- decode


def paged_decode_attention(q: Array, k_cache: Array, v_cache: Array, block_tables: Array,
                           context_lens: Array) -> Array:
    """One query per sequence over its paged context.

    q [B, H, D] (the query at position context_len - 1), k_cache, v_cache [NB, BS, K, D],
    block_tables [B, MB] int32 padded with 0, context_lens [B] (including this token) -> [B, H, D].
    """
    k = gather_paged(k_cache, block_tables)  # [B, MB*BS, K, D]
    v = gather_paged(v_cache, block_tables)  # [B, MB*BS, K, D]
    q_pos = (context_lens - 1)[:, None]  # [B, 1]
    return attend_tiles(q[:, None], q_pos, k, v, context_lens)[:, 0]  # [B, H, D]


def contiguous_decode_attention(q: Array, k_cache: Array, v_cache: Array, slots: Array,
                                context_lens: Array, max_context: int) -> Array:
    """One query per sequence over its slot: q [B, H, D], k_cache [R, N, K, D], slots [B] -> [B, H, D].

    Only the first max_context (>= max(context_lens)) positions of each slot are read.
    """
    k = gather_contiguous(k_cache, slots, max_context)  # [B, C, K, D]
    v = gather_contiguous(v_cache, slots, max_context)  # [B, C, K, D]
    q_pos = (context_lens - 1)[:, None]  # [B, 1]
    return attend_tiles(q[:, None], q_pos, k, v, context_lens)[:, 0]  # [B, H, D]


# ----------------------------------------------------------------------------- ragged prefill


def query_tiles(query_start: Array, num_tiles: int, tile: int) -> tuple[Array, Array, Array, Array]:
    """Cut each sequence's new tokens into tiles of `tile` tokens, no tile spanning two sequences.

    query_start [S+1]: sequence s owns flat tokens [query_start[s], query_start[s+1]).
    Returns tile_seq [num_tiles] (sequence of each tile), tile_tokens [num_tiles, tile]
    (flat token index of each query, 0 where invalid), tile_valid [num_tiles, tile], and
    tile_begin [S] (first tile of each sequence). num_tiles must be >= sum ceil(q_len / tile);
    S + T // tile always is.
    """
    S = query_start.shape[0] - 1
    q_len = query_start[1:] - query_start[:-1]  # [S]
    n_tiles = (q_len + tile - 1) // tile  # [S]
    tile_end = jnp.cumsum(n_tiles)  # [S]
    tile_begin = tile_end - n_tiles  # [S]
    i = jnp.arange(num_tiles)  # [N]
    seq = jnp.searchsorted(tile_end, i, side="right")  # [N]; == S for unused tiles
    tile_seq = jnp.minimum(seq, S - 1)  # [N]
    first = query_start[tile_seq] + (i - tile_begin[tile_seq]) * tile  # [N]
    tokens = first[:, None] + jnp.arange(tile)  # [N, tile]
    valid = (tokens < query_start[tile_seq + 1][:, None]) & (seq < S)[:, None]  # [N, tile]
    return tile_seq, jnp.where(valid, tokens, 0), valid, tile_begin


def _ragged_attention(q, seq_ids, positions, query_start, context_lens, fetch, tile):
    """Shared ragged path: tile the queries, fetch each tile's context, attend, scatter back."""
    T, H, D = q.shape
    S = query_start.shape[0] - 1
    num_tiles = S + -(-T // tile)
    tile_seq, tile_tokens, valid, tile_begin = query_tiles(query_start, num_tiles, tile)
    k, v = fetch(tile_seq)  # [N, C, K, D] each
    q_tiles = q[tile_tokens]  # [N, tile, H, D]
    q_pos = jnp.where(valid, positions[tile_tokens], -1)  # [N, tile]; invalid rows see nothing
    o = attend_tiles(q_tiles, q_pos, k, v, context_lens[tile_seq])  # [N, tile, H, D]
    # Token t of sequence s is query (t - query_start[s]) of s's tiles, which are consecutive.
    row = tile_begin[seq_ids] * tile + (jnp.arange(T) - query_start[seq_ids])  # [T]
    row = jnp.clip(row, 0, num_tiles * tile - 1)  # padding tokens: any row
    return o.reshape(num_tiles * tile, H, D)[row]  # [T, H, D]


def paged_prefill_attention(q: Array, k_cache: Array, v_cache: Array, block_tables: Array,
                            seq_ids: Array, positions: Array, query_start: Array,
                            context_lens: Array, tile: int = 32) -> Array:
    """Ragged (chunked prefill / mixed) attention over a paged cache.

    q [T, H, D] flat new tokens; seq_ids [T] and positions [T] per token; block_tables [S, MB];
    query_start [S+1] (sequence s owns tokens [query_start[s], query_start[s+1]));
    context_lens [S] (cached + new tokens). Token at position p of sequence s sees positions
    <= p of s. The new K/V must already be written. -> [T, H, D]
    """
    def fetch(tile_seq):
        tables = block_tables[tile_seq]  # [N, MB]
        return gather_paged(k_cache, tables), gather_paged(v_cache, tables)

    return _ragged_attention(q, seq_ids, positions, query_start, context_lens, fetch, tile)


def contiguous_prefill_attention(q: Array, k_cache: Array, v_cache: Array, slots: Array,
                                 seq_ids: Array, positions: Array, query_start: Array,
                                 context_lens: Array, max_context: int, tile: int = 32) -> Array:
    """Ragged attention over contiguous slots; as paged_prefill_attention with slots [S] for block tables."""
    def fetch(tile_seq):
        s = slots[tile_seq]  # [N]
        return gather_contiguous(k_cache, s, max_context), gather_contiguous(v_cache, s, max_context)

    return _ragged_attention(q, seq_ids, positions, query_start, context_lens, fetch, tile)
