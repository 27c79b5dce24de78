"""One step decided by a fast scheduler: its shape and what was preempted, without a chunk per decoding request.

The replica prices `shape` and checks `is_empty`, as with reference.batch.SchedulerOutput. The
chunks of requests outside the decode group (prompt chunks, recomputes) are listed; the decode
group's one-token chunks are implied (every member decodes).
"""
from __future__ import annotations

from reference.batch import StepShape
from reference.request import Request

_EMPTY = StepShape()


class FastStep:
    """A step: `specials` are (request, start, num_tokens) chunks in the order the teaching scheduler lists them."""

    __slots__ = ("index", "num_decodes", "specials", "preempted", "shape")

    def __init__(self, index: int, num_decodes: int, specials: list[tuple[Request, int, int]],
                 preempted: list[Request], shape: StepShape):
        self.index = index  # the decode group's step number
        self.num_decodes = num_decodes  # decode-group members, each computing one token
        self.specials = specials
        self.preempted = preempted
        self.shape = shape

    @property
    def is_empty(self) -> bool:
        """Nothing to compute."""
        return not self.num_decodes and not self.specials

    @property
    def num_chunks(self) -> int:
        """Chunks in the batch (requests computed this step)."""
        return self.num_decodes + len(self.specials)


def empty_step(index: int, preempted: list[Request]) -> FastStep:
    """A step with nothing to compute (the replica idles)."""
    return FastStep(index, 0, [], preempted, _EMPTY)


def step_shape(num_decodes: int, decode_context_sum: int, decode_max_context: int,
               specials: list[tuple[Request, int, int]]) -> StepShape:
    """StepShape.from_chunks of the decoders' one-token chunks plus the special chunks, from aggregates.

    num_decodes one-token chunks whose contexts after the step sum to decode_context_sum, the
    longest decode_max_context; specials as (request, start, num_tokens).
    """
    return StepShape.from_chunks([(n, start + n) for _, start, n in specials],
                                 (num_decodes, decode_context_sum, decode_max_context))
