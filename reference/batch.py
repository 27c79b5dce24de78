"""What a scheduler decides for one engine step, and what the model runner executes.

Plain Python: the simulator prices the same object with a cost model instead of running it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from reference.request import Request


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one request, computed in this step.

    A chunk of several tokens is (part of) a prefill, or a recompute after preemption;
    a chunk of one token at the end of the known tokens is a decode.
    Exactly one of block_table (paged KV) and slot (contiguous KV) is set.
    """

    request: Request
    start: int  # first position computed (tokens before it are already in the KV cache)
    num_tokens: int
    block_table: list[int] | None = None  # paged: physical block per logical block
    slot: int | None = None  # contiguous: the request's KV slot

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
        """One new token on top of a cached context that already holds the whole prompt."""
        return self.num_tokens == 1 and self.start >= self.request.num_prompt_tokens


@dataclass
class SchedulerOutput:
    """One step's batch: chunks to compute, requests preempted to make room, block copies to do first."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write, before the step

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed in this step (prefill + decode)."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens computed in chunks of more than one token (the runner's prefill part)."""
        return sum(c.num_tokens for c in self.chunks if c.num_tokens > 1)

    @property
    def num_decode_seqs(self) -> int:
        """One-token chunks (the runner's decode part: a decode, or the last token of a chunked prompt)."""
        return sum(1 for c in self.chunks if c.num_tokens == 1)

    @property
    def is_empty(self) -> bool:
        """Nothing to compute (idle engine or everything blocked)."""
        return not self.chunks
