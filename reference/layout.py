"""Where a sequence's K/V live: the two KV-cache layouts, and what a snapshot of their memory holds.

One object per engine, from the scheduler that fills it to the runner that allocates it and
the cost model that prices its reads:

- SlotLayout (llama.cpp / Ollama, static batching): num_slots fixed regions of max_len tokens,
  reserved whether they hold tokens or not. A request owns one slot for its whole life.
- PagedLayout (vLLM): a pool of num_blocks blocks of block_size tokens; a request's block
  table lists the physical block holding each of its logical blocks, so its tokens can sit
  anywhere in the pool. Block 0 is the null block: it pads block tables and absorbs the
  writes of padding tokens, and is never given to a sequence (in JAX an index of -1 would
  silently read the last block instead).

Both are addressed the same way on the device: a flat slot index into the layout seen as
[rows * row_len] token positions (paged: block * block_size + offset; slots: slot * max_len +
position), so the slot layout is a paged layout with one block of max_len tokens per request.

Plain Python (no JAX): the schedulers and the simulator use these objects too.
"""
from __future__ import annotations

from dataclasses import dataclass

from reference.errors import ConfigError

NULL_BLOCK = 0  # pads block tables, absorbs padding writes, never allocated


def _positive(value, field: str, low: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(field, f"must be an integer >= {low}, got {value!r}", allowed)


@dataclass(frozen=True)
class PagedLayout:
    """A pool of num_blocks blocks of block_size tokens each; block 0 is the null block."""

    num_blocks: int  # null block included
    block_size: int = 16  # tokens

    def __post_init__(self):
        _positive(self.block_size, "block_size", 1, "an integer >= 1 (vLLM uses 16)")
        _positive(self.num_blocks, "num_blocks", 2, "an integer >= 2 (block 0 is the reserved null block)")

    @property
    def rows(self) -> int:
        """Leading dimension of each cache array (blocks)."""
        return self.num_blocks

    @property
    def row_len(self) -> int:
        """Tokens per row (block)."""
        return self.block_size

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can hold tokens (all but the null block)."""
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        """Token positions the pool can hold for sequences."""
        return self.num_usable_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens positions."""
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class SlotLayout:
    """num_slots fixed regions of max_len tokens each, reserved up front."""

    num_slots: int
    max_len: int  # tokens per slot

    def __post_init__(self):
        _positive(self.num_slots, "num_slots", 1, "an integer >= 1")
        _positive(self.max_len, "max_len", 1, "an integer >= 1")

    @property
    def rows(self) -> int:
        """Leading dimension of each cache array (slots)."""
        return self.num_slots

    @property
    def row_len(self) -> int:
        """Tokens per row (slot)."""
        return self.max_len

    @property
    def capacity_tokens(self) -> int:
        """Token positions reserved in all slots."""
        return self.num_slots * self.max_len


Layout = PagedLayout | SlotLayout


@dataclass(frozen=True)
class KVUsage:
    """A snapshot of KV memory: what is reserved for sequences versus what holds tokens.

    waste_fraction = 1 - stored / reserved: slots allocated to sequences that hold no token
    (the unfilled tail of each last block, or whole reservations for static slots).
    """

    capacity_tokens: int  # token slots in the layout
    reserved_tokens: int  # token slots allocated to live sequences
    stored_tokens: int  # tokens actually held for live sequences (shared blocks counted once)

    @property
    def usage_fraction(self) -> float:
        """Reserved share of capacity (what vLLM reports as kv_cache_usage_perc / 100)."""
        return self.reserved_tokens / self.capacity_tokens if self.capacity_tokens else 0.0

    @property
    def stored_fraction(self) -> float:
        """Share of capacity holding tokens (what llama.cpp reports as its KV usage ratio)."""
        return self.stored_tokens / self.capacity_tokens if self.capacity_tokens else 0.0

    @property
    def waste_fraction(self) -> float:
        """Share of reserved slots that hold no token."""
        return 1.0 - self.stored_tokens / self.reserved_tokens if self.reserved_tokens else 0.0
