"""How the model runner pads a step's batch so that a serving loop compiles a handful of shapes.

Plain Python, no JAX: ModelRunner sizes its device arrays with these rules, and the calibrated
cost model prices the very same padded sizes, because on this engine a step costs what its
padded arrays cost, not what its real tokens would. The rules follow from the KV layout
(Padding.for_layout): paged contexts are bucketed in blocks, slot contexts in tokens.

A step's flat tokens are [decode part | prefill part]:
- decode part: one row per decoding sequence, padded to `decode_rows` rows; each row reads a
  padded context of `decode_context` tokens (the bucket of the longest sequence in the part);
- prefill part: the multi-token chunks back to back, padded to `prefill_tokens` tokens and
  `prefill_rows` sequences; attention cuts the queries into `prefill_tiles` tiles of
  `query_tile` queries, and every tile reads a padded context of `prefill_context` tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from reference.errors import ConfigError
from reference.layout import Layout, PagedLayout


def bucket(n: int, minimum: int, cap: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum, 1), capped at cap."""
    b = 1 << (max(n, minimum, 1) - 1).bit_length()
    return b if cap is None else min(b, cap)


@dataclass(frozen=True, slots=True)
class PaddedStep:
    """The padded sizes of one step's arrays (0 for an absent part)."""

    decode_rows: int  # sequences, padded
    decode_context: int  # tokens of K/V each decode row reads
    prefill_rows: int  # sequences, padded
    prefill_tokens: int  # flat query tokens, padded
    prefill_tiles: int  # query tiles of the ragged attention
    prefill_context: int  # tokens of K/V each tile reads

    @property
    def tokens(self) -> int:
        """Flat tokens every layer's matmuls run over."""
        return self.decode_rows + self.prefill_tokens

    @property
    def rows(self) -> int:
        """Output rows: LM head and sampling."""
        return self.decode_rows + self.prefill_rows


@dataclass(frozen=True, slots=True)
class Padding:
    """The runner's bucket rules for one KV layout (build it with Padding.for_layout).

    block_size: the paged layout's block size, or None for slots (whose context is bucketed in
    tokens). context_cap: the most context tokens a row can read (paged: max blocks per
    sequence x block size; slots: the slot length).
    """

    block_size: int | None
    context_cap: int
    min_tokens: int = 16
    min_seqs: int = 4
    min_blocks: int = 4
    query_tile: int = 32
    min_context: int = 16  # slot layout: smallest context bucket (tokens)

    def __post_init__(self):
        for name in ("context_cap", "min_tokens", "min_seqs", "min_blocks", "query_tile", "min_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")

    @classmethod
    def for_layout(cls, layout: Layout, max_position: int, **rules) -> Padding:
        """The rules for a layout serving a model of max_position tokens.

        Paged: a table holds at most ceil(max_position / block_size) blocks, and no more than the pool.
        """
        if isinstance(layout, PagedLayout):
            max_blocks = min(math.ceil(max_position / layout.block_size), layout.num_usable_blocks)
            return cls(layout.block_size, max_blocks * layout.block_size, **rules)
        return cls(None, layout.max_len, **rules)

    def context(self, longest: int) -> int:
        """Padded context (tokens) that every row of a part reads, given its longest sequence (tokens)."""
        if self.block_size is None:
            return bucket(longest, self.min_context, self.context_cap)
        bs = self.block_size
        return bs * bucket(-(-longest // bs), self.min_blocks, self.context_cap // bs)

    def step(self, decode_seqs: int, decode_longest: int, prefill_seqs: int, prefill_tokens: int,
             prefill_longest: int) -> PaddedStep:
        """Padded sizes of a step with decode_seqs one-token rows and prefill_seqs chunks of prefill_tokens in all.

        *_longest: the longest sequence of the part (tokens after the step).
        """
        sd = bucket(decode_seqs, self.min_seqs) if decode_seqs else 0
        sp = bucket(prefill_seqs, self.min_seqs) if prefill_seqs else 0
        tp = bucket(prefill_tokens, self.min_tokens) if prefill_seqs else 0
        return PaddedStep(sd, self.context(decode_longest) if sd else 0, sp, tp,
                          sp + -(-tp // self.query_tile) if sp else 0, self.context(prefill_longest) if sp else 0)

    def metadata(self) -> str:
        """The rules as one line for a profile header ('min_tokens=16 min_seqs=4 ...')."""
        return " ".join(f"{k}={getattr(self, k)}" for k in ("min_tokens", "min_seqs", "min_blocks", "query_tile",
                                                            "min_context"))
