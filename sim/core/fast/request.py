"""A request whose prompt token ids are generated only when something reads them.

The simulator's workloads make each prompt from a seeded random stream (sim.lab.workload); drawing
it costs ~20 us a request, most of it seeding the generator. The fast schedulers read token ids
only for the blocks that prefix caching could share (sim.core.fast.pool), so a million-request
run does not pay for prompts nobody reads. Whoever reads `prompt_token_ids` (a teaching scheduler,
a trace) gets the same list the eager request would have held.

Its token_times are an array("d") rather than a list: a simulated request's few hundred token
times are then one contiguous buffer, copied in one go from the step timeline and read in one go
by the metrics (a list would hold pointers to float objects spread over the heap, each touched
when written, read and freed). It behaves as a sequence of floats (len, index, iterate, append).

`unique_from` says which blocks no other request can hold (see sim.core.fast.pool): the smallest
position p such that every KV block whose last position is >= p holds content that no other
request's block can hold. None: any block may be shared (every block is then tracked exactly).
"""
from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence

from reference.errors import ConfigError
from reference.request import Request, SamplingParams, Status


class LazyRequest(Request):
    """A reference.request.Request with a prompt of known length whose token ids are drawn on first read."""

    def __init__(self, request_id: str, num_prompt_tokens: int, head: Sequence[int],
                 draw_prompt: Callable[[], list[int]], sampling: SamplingParams, arrival_time: float,
                 unique_from: int | None = None):
        """head: the prompt's first tokens, known without drawing (a shared prefix); draw_prompt() -> the whole prompt.

        arrival_time in s; unique_from in token positions (module docstring).
        """
        if num_prompt_tokens < 1:
            raise ConfigError("prompt", "must have at least one token")
        # Request's fields, set here rather than through its generated __init__ (this runs for every simulated
        # request); tests/test_fastpath.py checks that every field of Request is set.
        self.request_id = request_id
        self.sampling = sampling
        self.arrival_time = arrival_time
        self.output_token_ids = []
        self.num_computed_tokens = 0
        self.status = Status.WAITING
        self.outcome = None
        self.reason = ""
        self.first_scheduled_time = None
        self.first_token_time = None
        self.token_times = array("d")  # a list of floats would cost a pointer chase per token in every reader
        self.finish_time = None
        self.num_preemptions = 0
        self.num_cached_prompt_tokens = 0
        self._num_prompt = num_prompt_tokens
        self._head = head
        self._draw = draw_prompt
        self._prompt = None
        self.unique_from = unique_from

    def __post_init__(self):
        pass  # the length was checked in __init__ without drawing the prompt

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt (drawn now if nobody read it before)."""
        if self._prompt is None:
            prompt = self._draw()
            if len(prompt) != self._num_prompt:
                raise ValueError(f"{self.request_id}: drew {len(prompt)} prompt tokens, expected {self._num_prompt}")
            self._prompt = prompt
        return self._prompt

    @prompt_token_ids.setter
    def prompt_token_ids(self, value) -> None:
        if value is not None:  # Request.__init__ assigns the field; None keeps it lazy
            self._prompt = list(value)
            self._num_prompt = len(self._prompt)

    def prompt_head(self, n: int) -> Sequence[int]:
        """The first n prompt tokens (n <= num_prompt_tokens), drawing the prompt only when the head is too short."""
        if self._prompt is None and n <= len(self._head):
            return self._head[:n]
        return self.prompt_token_ids[:n]

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length (tokens)."""
        return self._num_prompt

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return self._num_prompt + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold (prompt + max_tokens)."""
        return self._num_prompt + self.sampling.max_tokens


def shared_head(req: Request) -> Sequence[int]:
    """The prompt's first tokens that other requests may share (a LazyRequest's head; () for any other request).

    Requests built from one shared prefix hold the same head object, which lets a reader compute what
    depends only on those tokens once per head (sim.core.fast.pool's cache keys).
    """
    return req._head if req.__class__ is LazyRequest else ()


def prompt_slice(req: Request, start: int, stop: int) -> Sequence[int]:
    """Prompt token ids [start, stop) of any request, drawing a lazy prompt only when needed."""
    if isinstance(req, LazyRequest):
        return req.prompt_head(stop)[start:stop]
    return req.prompt_token_ids[start:stop]
