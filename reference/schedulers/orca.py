"""Orca-style iteration batching with max-length reservation, as the PagedAttention paper ran it.

Orca (Yu et al., OSDI 2022) batches at the iteration level like vLLM, but allocates each
request's KV contiguously, so it must reserve room for the longest the request may grow when it
is admitted: reservation = "max_model_len" (Orca (Max)) or "request" (prompt + max_tokens:
Orca (Oracle), which knows the output length in advance). Modelled here as the continuous
scheduler whose admissions hold their whole reservation, with no prefix caching (Orca has none).
Over-reservation is what the paper measures: blocks reserved but never filled.
"""
from __future__ import annotations

from reference.errors import ConfigError
from reference.request import Request
from reference.schedulers.continuous import ContinuousScheduler

RESERVATIONS = ("max_model_len", "request")


class OrcaScheduler(ContinuousScheduler):
    """Continuous batching whose requests reserve KV for their longest length when admitted."""

    def __init__(self, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 8192,
                 enable_chunked_prefill: bool = True, reservation: str = "max_model_len", max_queue: int = 0):
        if reservation not in RESERVATIONS:
            raise ConfigError("reservation", f"unknown value {reservation!r}", ", ".join(RESERVATIONS))
        super().__init__(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
                         enable_chunked_prefill, enable_prefix_caching=False, max_queue=max_queue)
        self.reservation = reservation

    def _tokens_held(self, req: Request) -> int:
        """The whole reservation: max_model_len (Orca (Max)) or prompt + max_tokens (Orca (Oracle))."""
        return self.max_model_len if self.reservation == "max_model_len" else req.max_total_tokens

    def _allocate_admitted(self, req: Request, num_computed: int, num_new: int, hits: list[int]) -> bool:
        """Blocks for the whole reservation at once, or none."""
        reserve = max(num_computed + num_new, self._tokens_held(req))
        if not self.blocks.can_allocate(self.layout.blocks_for(reserve) - len(hits)):
            return False
        self.blocks.allocate_slots(req.request_id, num_computed, num_new, hits)
        self.blocks.reserve(req.request_id, reserve)
        return True

    def describe(self) -> str:
        """Pool size, block size, reservation."""
        return (f"paged pool of {self.layout.num_usable_blocks} blocks x {self.layout.block_size} tokens, each request "
                f"reserving {'max_model_len' if self.reservation == 'max_model_len' else 'prompt + max_tokens'} "
                "at admission, no prefix caching")
