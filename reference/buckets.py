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


def bucket(n: int, minimum: int, cap: int | None = None, growth: int = 2) -> int:
    """Smallest power of two >= max(n, minimum, 1), capped at cap.

    growth > 2: the buckets are the power of two >= minimum times growth**k (fewer, coarser
    buckets: growth 4 keeps every other power of two).
    """
    b = 1 << (max(n, minimum, 1) - 1).bit_length()
    if growth > 2:
        b = base = 1 << (max(minimum, 1) - 1).bit_length()
        while b < n:
            b *= growth
        b = max(b, base)
    return b if cap is None else min(b, cap)


def bucket_sizes(minimum: int, cap: int, growth: int = 2) -> list[int]:
    """Every bucket that n in 1..cap can fall in, ascending."""
    out, n = [], 1
    while n <= cap:
        b = bucket(n, minimum, cap, growth)
        out.append(b)
        n = b + 1
    return out


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
    # A serving engine bounds its shape set (so that it can compile all of it before serving):
    max_seqs: int | None = None  # most sequences in a step (the scheduler's max_num_seqs): caps row buckets
    max_tokens: int | None = None  # most new tokens in a step (max_num_batched_tokens): caps token buckets
    growth: int = 2  # ratio of successive prefill buckets (rows, tokens); 4 halves their number
    mixed_growth: int = 2  # ratio of successive decode-row buckets in a step that also prefills
    dynamic_context: bool = False  # attention loops over the context at run time: no context buckets
    # In a step that also prefills, pad the decode rows at least to the prefill token bucket (capped by
    # max_seqs): the step's matmuls at most double, and decode rows stop multiplying the shape set.
    mixed_floor: bool = False
    # A serving engine's coarse rule for steps with a prefill part (needs max_seqs): the decode part is always
    # max_seqs rows (all padding when nobody decodes: an all-padding part walks no context), and the prefill
    # part is few_prefill_rows sequences, or, beyond, the most its token bucket can hold (a chunk has >= 2
    # tokens). Then such steps have two shapes per token bucket, and the set is the decode buckets plus that.
    coarse_mixed: bool = False
    few_prefill_rows: int = 4

    def __post_init__(self):
        for name in ("context_cap", "min_tokens", "min_seqs", "min_blocks", "query_tile", "min_context",
                     "few_prefill_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("max_seqs", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(name, f"must be None or an integer >= 1, got {value!r}")
        for name in ("growth", "mixed_growth"):
            if getattr(self, name) not in (2, 4, 8):
                raise ConfigError(name, f"must be 2, 4 or 8, got {getattr(self, name)!r}", "2 | 4 | 8")
        if self.coarse_mixed and self.max_seqs is None:
            raise ConfigError("coarse_mixed", "needs max_seqs (the decode part of a prefill step is max_seqs rows)",
                              "max_seqs set, or coarse_mixed=False")

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
        """Padded context (tokens) that every row of a part reads, given its longest sequence (tokens).

        With dynamic_context: the whole context_cap (the arrays' width; attention reads only what is used).
        """
        if self.dynamic_context:
            return self.context_cap
        if self.block_size is None:
            return bucket(longest, self.min_context, self.context_cap)
        bs = self.block_size
        return bs * bucket(-(-longest // bs), self.min_blocks, self.context_cap // bs)

    def step(self, decode_seqs: int, decode_longest: int, prefill_seqs: int, prefill_tokens: int,
             prefill_longest: int) -> PaddedStep:
        """Padded sizes of a step with decode_seqs one-token rows and prefill_seqs chunks of prefill_tokens in all.

        *_longest: the longest sequence of the part (tokens after the step).
        """
        rows_cap = self.max_seqs
        if prefill_seqs and self.coarse_mixed:
            return self._coarse_step(decode_longest, prefill_seqs, prefill_tokens, prefill_longest)
        sp = bucket(prefill_seqs, self.min_seqs, rows_cap, self.growth) if prefill_seqs else 0
        tp = bucket(prefill_tokens, self.min_tokens, self.max_tokens, self.growth) if prefill_seqs else 0
        floor = self.min_seqs
        if prefill_seqs and self.mixed_floor:
            floor = max(floor, tp if rows_cap is None else min(tp, rows_cap))
        sd = bucket(decode_seqs, floor, rows_cap, self.mixed_growth if prefill_seqs else 2) if decode_seqs else 0
        return PaddedStep(sd, self.context(decode_longest) if sd else 0, sp, tp,
                          sp + -(-tp // self.query_tile) if sp else 0, self.context(prefill_longest) if sp else 0)

    def _coarse_step(self, decode_longest: int, prefill_seqs: int, prefill_tokens: int,
                     prefill_longest: int) -> PaddedStep:
        """step() of a step with a prefill part under coarse_mixed (decode rows: max_seqs, decodes or not)."""
        tp = bucket(prefill_tokens, self.min_tokens, self.max_tokens, self.growth)
        most = min(self.max_seqs, max(1, tp // 2))
        few = min(self.few_prefill_rows, most)
        sp = few if prefill_seqs <= few else most
        return PaddedStep(self.max_seqs, self.context(max(decode_longest, 1)), sp, tp, sp + -(-tp // self.query_tile),
                          self.context(prefill_longest))

    def shapes(self) -> list[PaddedStep]:
        """Every padded step a scheduler within max_seqs and max_tokens can produce (both must be set).

        A prefill chunk has >= 2 tokens (one token is a decode), decodes and prefill tokens share
        max_tokens, decodes and prefill chunks share max_seqs. Each shape is what step() gives for
        the smallest real counts of its buckets, so the set is exactly what step() can return.
        Context buckets multiply the set unless dynamic_context. This is what a server compiles
        before it serves.
        """
        if self.max_seqs is None or self.max_tokens is None:
            raise ConfigError("max_seqs", "shapes() needs max_seqs and max_tokens (the scheduler's limits)",
                              "integers >= 1")
        seqs, budget = self.max_seqs, self.max_tokens
        contexts = sorted({self.context(n) for n in _bucket_starts(lambda n: self.context(n), self.context_cap)})
        out: set[PaddedStep] = set()
        for dn in _bucket_starts(lambda n: self.step(n, 1, 0, 0, 0).decode_rows, min(seqs, budget)):
            for c in contexts:
                out.add(self._with_contexts(self.step(dn, 1, 0, 0, 0), c, 0))
        row_starts = _bucket_starts(lambda n: self.step(0, 0, n, 2 * n, 2 * n).prefill_rows, min(seqs, budget // 2))
        token_ranges = _bucket_ranges(lambda n: self.step(0, 0, 1, n, n).prefill_tokens, budget)
        for pn in row_starts:
            for lo, hi in token_ranges:
                tn = max(lo, 2 * pn)
                if tn > hi:
                    continue
                mixed = _bucket_starts(lambda n: self.step(n, 1, pn, tn, tn).decode_rows,
                                       min(seqs - pn, budget - tn))
                for dn in [0] + mixed:
                    padded = self.step(dn, 1, pn, tn, tn)
                    for pc in contexts:
                        for dc in (contexts if padded.decode_rows else [0]):
                            out.add(self._with_contexts(padded, dc, pc))
        return sorted(out, key=lambda p: (p.tokens, p.rows, p.decode_context, p.prefill_context))

    @staticmethod
    def _with_contexts(p: PaddedStep, decode_context: int, prefill_context: int) -> PaddedStep:
        return PaddedStep(p.decode_rows, decode_context if p.decode_rows else 0, p.prefill_rows, p.prefill_tokens,
                          p.prefill_tiles, prefill_context if p.prefill_rows else 0)

    def metadata(self) -> str:
        """The rules as one line for a profile header ('min_tokens=16 min_seqs=4 ...')."""
        return " ".join(f"{k}={getattr(self, k)}" for k in ("min_tokens", "min_seqs", "min_blocks", "query_tile",
                                                            "min_context"))


def _bucket_ranges(size_of, limit: int) -> list[tuple[int, int]]:
    """[(lo, hi)]: the runs of n in 1..limit that size_of maps to one bucket (size_of is non-decreasing)."""
    out, n = [], 1
    while n <= limit:
        b = size_of(n)
        hi = n
        step = 1
        while hi + step <= limit and size_of(hi + step) == b:  # gallop to the end of the run
            hi += step
            step *= 2
        while step > 1:
            step //= 2
            if hi + step <= limit and size_of(hi + step) == b:
                hi += step
        out.append((n, hi))
        n = hi + 1
    return out


def _bucket_starts(size_of, limit: int) -> list[int]:
    """The smallest n of each run of _bucket_ranges."""
    return [lo for lo, _ in _bucket_ranges(size_of, limit)]

