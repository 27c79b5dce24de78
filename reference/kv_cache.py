"""The two KV-cache layouts as device arrays: contiguous per slot, and a paged block pool.

Contiguous (llama.cpp / Ollama): each of `num_slots` requests owns a fixed region of
`max_len` tokens, reserved whether it uses them or not. Per layer, K and V are
[num_slots, max_len, K, D].

Paged (vLLM): per layer, K and V are a pool [num_blocks, block_size, K, D]; a request's
block table lists the physical block holding each of its logical blocks, so its tokens can
sit anywhere in the pool. Block 0 is the reserved null block: it pads block tables and takes
the writes of padding tokens, and is never given to a sequence.

Both are addressed the same way when writing: a flat slot index into the layout seen as
[rows * row_len, K, D] (paged: block * block_size + offset; contiguous: slot * max_len + position).
So the contiguous layout is a paged layout with one block of max_len tokens per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reference.config import ModelConfig
from reference.errors import ConfigError

NULL_BLOCK = 0  # reserved: pads block tables, absorbs padding writes, never allocated


@dataclass(frozen=True)
class PagedLayout:
    """A pool of num_blocks blocks of block_size tokens (block 0 reserved)."""

    num_blocks: int
    block_size: int = 16

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError("block_size", f"must be a positive integer, got {self.block_size!r}",
                              "an integer >= 1 (vLLM uses 16)")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 2:
            raise ConfigError("num_blocks", f"must be an integer >= 2, got {self.num_blocks!r}",
                              "an integer >= 2 (block 0 is the reserved null block)")

    @property
    def rows(self) -> int:
        """Leading dimension of each cache array."""
        return self.num_blocks

    @property
    def row_len(self) -> int:
        """Tokens per row (block)."""
        return self.block_size


@dataclass(frozen=True)
class ContiguousLayout:
    """num_slots fixed regions of max_len tokens each."""

    num_slots: int
    max_len: int

    def __post_init__(self):
        if not isinstance(self.num_slots, int) or self.num_slots < 1:
            raise ConfigError("num_slots", f"must be a positive integer, got {self.num_slots!r}",
                              "an integer >= 1")
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise ConfigError("max_len", f"must be a positive integer, got {self.max_len!r}",
                              "an integer >= 1")

    @property
    def rows(self) -> int:
        """Leading dimension of each cache array."""
        return self.num_slots

    @property
    def row_len(self) -> int:
        """Tokens per row (slot)."""
        return self.max_len


Layout = PagedLayout | ContiguousLayout
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


def allocate_paged(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: Any = jnp.float32) -> KVCache:
    """Paged pool: per layer K, V [num_blocks, block_size, K, D]."""
    return allocate(cfg, PagedLayout(num_blocks, block_size), dtype)


def allocate_contiguous(cfg: ModelConfig, num_slots: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """Contiguous slots: per layer K, V [num_slots, max_len, K, D]."""
    return allocate(cfg, ContiguousLayout(num_slots, max_len), dtype)


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
