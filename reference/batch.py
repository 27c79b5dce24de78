"""One engine step: what a scheduler decides, and the shape that the engine records and a cost model prices.

Vocabulary, used the same way everywhere:
- a *chunk* is tokens [start, start + num_tokens) of one request, computed in one step;
- a *decode* is a chunk of one token: one new query on top of its cached context. The runner
  sends it down the decode path and the cost model prices it as a decode, whether that token is
  a freshly sampled output token or the last token of a chunked prompt;
- every other chunk is *prefill* (a prompt chunk, or a recompute after preemption).

Plain Python: the simulator prices the same objects with a cost model instead of running them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

from reference.errors import ConfigError
from reference.request import Request


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one request, computed in this step.

    Exactly one of block_table (paged KV) and slot (slot KV) is set.
    """

    request: Request
    start: int  # first position computed (tokens before it are already in the KV cache)
    num_tokens: int
    block_table: list[int] | None = None  # paged: physical block per logical block
    slot: int | None = None  # slots: the request's KV slot

    @property
    def end(self) -> int:
        """One past the last position computed; the context length after this step."""
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last known token, so the step yields its next token."""
        return self.end == self.request.num_tokens

    @property
    def is_decode(self) -> bool:
        """One token on top of the cached context (see the module docstring)."""
        return self.num_tokens == 1

    @property
    def in_prompt(self) -> bool:
        """True when the chunk computes prompt tokens (first pass or recompute), not only generated ones."""
        return self.start < self.request.num_prompt_tokens


@dataclass(frozen=True, slots=True)
class StepShape:
    """One engine step reduced to the aggregates its cost depends on.

    A chunk of n new tokens whose context is c tokens after the step contributes n new tokens,
    c K/V tokens read by attention, and n * (c - n) + n * (n + 1) / 2 causal (query, key) pairs.
    """

    prefill_tokens: int = 0  # new tokens in prefill chunks
    decode_seqs: int = 0  # decodes (one-token chunks)
    prefill_seqs: int = 0  # prefill chunks
    kv_read_tokens: int = 0  # sum over chunks of the context length after the step
    attn_q_ctx: int = 0  # sum over chunks of causal (query, key) pairs
    decode_max_context: int = 0  # longest context (tokens after the step) among the decodes
    prefill_max_context: int = 0  # longest context (tokens after the step) among the prefill chunks

    def __post_init__(self):
        if min(self.prefill_tokens, self.decode_seqs, self.prefill_seqs, self.kv_read_tokens, self.attn_q_ctx,
               self.decode_max_context, self.prefill_max_context) < 0:
            raise ConfigError("step_shape", f"all fields must be >= 0, got {self}")

    @property
    def new_tokens(self) -> int:
        """Tokens computed this step (prefill + decode)."""
        return self.prefill_tokens + self.decode_seqs

    @property
    def num_seqs(self) -> int:
        """Chunks (sequences) in the batch."""
        return self.prefill_seqs + self.decode_seqs

    @property
    def is_empty(self) -> bool:
        """No tokens to compute."""
        return self.prefill_tokens + self.decode_seqs == 0

    @property
    def kind(self) -> str:
        """'decode', 'prefill' or 'mixed' (which parts the step has); 'idle' when empty."""
        if self.is_empty:
            return "idle"
        if not self.prefill_seqs:
            return "decode"
        return "mixed" if self.decode_seqs else "prefill"

    @staticmethod
    def chunk_q_ctx(num_new: int, context_after: int) -> int:
        """Causal (query, key) pairs of num_new queries ending at position context_after."""
        return num_new * (context_after - num_new) + num_new * (num_new + 1) // 2

    @classmethod
    def decode(cls, batch: int, context: int) -> StepShape:
        """batch sequences each decoding one token with context tokens after the step."""
        _require_int(batch, "decode_seqs", 0)
        _require_int(context, "context_len", 1 if batch else 0)
        return cls(0, batch, 0, batch * context, batch * context, context if batch else 0)

    @classmethod
    def prefill(cls, tokens: int, cached: int = 0, seqs: int = 1) -> StepShape:
        """seqs chunks of tokens new tokens each, on top of cached tokens already in the KV cache.

        A chunk of one token is a decode (see the module docstring).
        """
        _require_int(tokens, "prefill_tokens", 0)
        _require_int(cached, "cached_context", 0)
        _require_int(seqs, "prefill_seqs", 0)
        return cls.from_chunks([(tokens, cached + tokens)] * seqs if tokens else [])

    @classmethod
    def from_chunks(cls, chunks: Iterable[tuple[int, int]], decodes: tuple[int, int, int] = (0, 0, 0)) -> StepShape:
        """From (num_new_tokens, context_len_after_step) per chunk.

        decodes: more one-token chunks given as aggregates (count, sum of their contexts after the step,
        the longest), for a caller that tracks decoders as a group (the simulator's fast path).
        """
        d_seq, kv, d_max = decodes
        if d_seq < 0 or kv < 0 or d_max < 0:
            raise ConfigError("decodes", f"(count, context sum, longest) must be >= 0, got {decodes}")
        qc = kv
        p_tok = p_seq = p_max = 0
        for n, ctx in chunks:  # hot path (once per simulated step): plain ints, no properties
            if n <= 0 or ctx < n:
                raise ConfigError("chunk", f"need 0 < num_new_tokens <= context_len_after_step, got ({n}, {ctx})")
            kv += ctx
            if n == 1:
                d_seq += 1
                qc += ctx
                if ctx > d_max:
                    d_max = ctx
            else:
                p_tok += n
                p_seq += 1
                qc += n * (ctx - n) + n * (n + 1) // 2
                if ctx > p_max:
                    p_max = ctx
        # Every field is a sum of checked positive terms: built without __post_init__'s check (this runs once
        # per simulated step), as the dataclass's own __init__ would set the slots.
        shape = object.__new__(cls)
        _set_prefill_tokens(shape, p_tok)
        _set_decode_seqs(shape, d_seq)
        _set_prefill_seqs(shape, p_seq)
        _set_kv_read_tokens(shape, kv)
        _set_attn_q_ctx(shape, qc)
        _set_decode_max_context(shape, d_max)
        _set_prefill_max_context(shape, p_max)
        return shape

    def __add__(self, other: StepShape) -> StepShape:
        """Both batches in one step."""
        return StepShape(self.prefill_tokens + other.prefill_tokens, self.decode_seqs + other.decode_seqs,
                         self.prefill_seqs + other.prefill_seqs, self.kv_read_tokens + other.kv_read_tokens,
                         self.attn_q_ctx + other.attn_q_ctx, max(self.decode_max_context, other.decode_max_context),
                         max(self.prefill_max_context, other.prefill_max_context))


# The slots' setters (a frozen dataclass refuses attribute assignment; its own __init__ goes around it likewise).
_set_prefill_tokens = StepShape.prefill_tokens.__set__
_set_decode_seqs = StepShape.decode_seqs.__set__
_set_prefill_seqs = StepShape.prefill_seqs.__set__
_set_kv_read_tokens = StepShape.kv_read_tokens.__set__
_set_attn_q_ctx = StepShape.attn_q_ctx.__set__
_set_decode_max_context = StepShape.decode_max_context.__set__
_set_prefill_max_context = StepShape.prefill_max_context.__set__


def _require_int(value, field: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ConfigError(field, f"must be an integer >= {lo}, got {value!r}")


@dataclass
class SchedulerOutput:
    """One step's batch: chunks to compute, requests preempted to make room, block copies to do first."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write, before the step

    @cached_property
    def shape(self) -> StepShape:
        """The step's shape, computed once when first asked (after scheduling is done)."""
        return StepShape.from_chunks((c.num_tokens, c.start + c.num_tokens) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        """Nothing to compute (idle engine or everything blocked)."""
        return not self.chunks
