"""The KV cache on the device: arrays for a layout (reference.layout), and how a step addresses them.

Per layer, K and V are [rows, row_len, K, D]: paged, a pool [num_blocks, block_size, K, D];
slots, [num_slots, max_len, K, D]. A token is written at a flat slot index into the layout seen
as [rows * row_len, K, D] (paged: block * block_size + offset; slots: slot * max_len + position).

What differs between the layouts is only how a sequence's K/V are found: through its block
table, or at its slot. PagedAccess and SlotAccess hold that difference, on the host (the arrays
a step needs: block tables or slot ids, and the write positions) and on the device (which
attention reads them), so the model runner has one code path for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reference import paged_attention as pa
from reference.batch import ScheduledChunk
from reference.pallas_attention import attention_backend
from reference.config import ModelConfig
from reference.layout import NULL_BLOCK, Layout, PagedLayout, SlotLayout

Array = jax.Array
# A cache is a list over layers of (k, v), each [rows, row_len, K, D].
KVCache = list[tuple[jax.Array, jax.Array]]


def cache_shape(cfg: ModelConfig, layout: Layout) -> tuple[int, int, int, int]:
    """Shape of one layer's K (or V) array: [rows, row_len, K, D]."""
    return (layout.rows, layout.row_len, cfg.num_kv_heads, cfg.head_dim)


def kv_bytes(cfg: ModelConfig, layout: Layout, dtype: Any = jnp.float32) -> int:
    """Bytes the layout reserves for K and V over all layers (without allocating it)."""
    n = int(np.prod(cache_shape(cfg, layout)))
    return 2 * cfg.num_layers * n * jnp.dtype(dtype).itemsize


def allocate(cfg: ModelConfig, layout: Layout, dtype: Any = jnp.float32) -> KVCache:
    """Zero-filled K and V arrays for every layer."""
    shape = cache_shape(cfg, layout)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def cache_bytes(cache: KVCache) -> int:
    """Bytes held by an allocated cache."""
    return sum(int(k.nbytes) + int(v.nbytes) for k, v in cache)


@partial(jax.jit, donate_argnums=0)
def _copy_blocks(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    # src, dst [N] int32; the pool is updated in place (donated).
    return [(k.at[dst].set(k[src]), v.at[dst].set(v[src])) for k, v in cache]


def copy_blocks(cache: KVCache, copies) -> KVCache:
    """Copy-on-write: for each (src, dst) copy block src to block dst in every layer.

    Padded to a power of two with (0, 0) copies (null block onto itself) so few shapes compile.
    The input cache is donated: use the returned one.
    """
    copies = list(copies)
    if not copies:
        return cache
    n = 1 << (len(copies) - 1).bit_length()
    pairs = np.zeros((n, 2), np.int32)
    pairs[: len(copies)] = np.asarray(copies, np.int32)
    return _copy_blocks(cache, jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1]))


# ----------------------------------------------------------------------------- addressing a step


@dataclass(frozen=True)
class PagedAccess:
    """K/V found through block tables. Hashable: the jitted step takes it as a static argument.

    decode_fn / prefill_fn: the paged attention that reads them (reference.paged_attention, or the
    Pallas kernel of reference.pallas_attention, which reads K/V through the table in place).
    """

    layout: PagedLayout
    decode_fn: Callable = pa.paged_decode_attention
    prefill_fn: Callable = pa.paged_prefill_attention

    @property
    def pad_slot(self) -> int:
        """Where padding tokens write: the null block, which no sequence reads."""
        return NULL_BLOCK * self.layout.block_size

    def locate(self, chunks: Sequence[ScheduledChunk], rows: int, context: int) -> dict:
        """Host arrays of a part: {"tables": [rows, context // block_size] int32}, padded with the null block."""
        bs = self.layout.block_size
        tables = np.full((rows, context // bs), NULL_BLOCK, np.int32)
        for j, c in enumerate(chunks):
            need = -(-c.end // bs)
            tables[j, :need] = c.block_table[:need]
        return {"tables": tables}

    def write_slots(self, part: dict, j: int, chunk: ScheduledChunk) -> np.ndarray:
        """Flat write positions [num_tokens] of the chunk, the j-th sequence of its part."""
        pos = np.arange(chunk.start, chunk.end)
        bs = self.layout.block_size
        return part["tables"][j][pos // bs] * bs + pos % bs

    def decode(self, q: Array, k: Array, v: Array, part: dict, context_lens: Array, context: int) -> Array:
        """One query per row over its table: q [S, H, D] -> [S, H, D]."""
        return self.decode_fn(q, k, v, part["tables"], context_lens)

    def prefill(self, q: Array, k: Array, v: Array, part: dict, positions: Array, context_lens: Array,
                context: int, tile: int) -> Array:
        """Ragged queries over their tables: q [T, H, D] -> [T, H, D]."""
        return self.prefill_fn(q, k, v, part["tables"], part["seq_ids"], positions, part["query_start"], context_lens,
                               tile)


@dataclass(frozen=True)
class SlotAccess:
    """K/V found at each sequence's slot. Hashable: the jitted step takes it as a static argument."""

    layout: SlotLayout

    @property
    def pad_slot(self) -> int:
        """Where padding tokens write: one past the end, a write the scatter drops."""
        return self.layout.num_slots * self.layout.max_len

    def locate(self, chunks: Sequence[ScheduledChunk], rows: int, context: int) -> dict:
        """Host arrays of a part: {"slots": [rows] int32} (padding rows read slot 0 and are masked)."""
        slots = np.zeros(rows, np.int32)
        slots[:len(chunks)] = [c.slot for c in chunks]
        return {"slots": slots}

    def write_slots(self, part: dict, j: int, chunk: ScheduledChunk) -> np.ndarray:
        """Flat write positions [num_tokens] of the chunk."""
        return chunk.slot * self.layout.max_len + np.arange(chunk.start, chunk.end)

    def decode(self, q: Array, k: Array, v: Array, part: dict, context_lens: Array, context: int) -> Array:
        """One query per row over the first `context` positions of its slot: q [S, H, D] -> [S, H, D]."""
        return pa.contiguous_decode_attention(q, k, v, part["slots"], context_lens, context)

    def prefill(self, q: Array, k: Array, v: Array, part: dict, positions: Array, context_lens: Array,
                context: int, tile: int) -> Array:
        """Ragged queries over their slots: q [T, H, D] -> [T, H, D]."""
        return pa.contiguous_prefill_attention(q, k, v, part["slots"], part["seq_ids"], positions,
                                               part["query_start"], context_lens, context, tile)


Access = PagedAccess | SlotAccess


def access_for(layout: Layout, attention: str = "auto") -> Access:
    """How a step addresses this layout's arrays.

    attention (paged layout): "auto" (the Pallas kernel on a GPU, the jnp reference elsewhere), "pallas"
    or "jnp" (reference.pallas_attention.attention_backend). The slot layout always reads its slot in jnp.
    """
    decode_fn, prefill_fn = attention_backend(attention)  # checks the name for both layouts
    return PagedAccess(layout, decode_fn, prefill_fn) if isinstance(layout, PagedLayout) else SlotAccess(layout)
