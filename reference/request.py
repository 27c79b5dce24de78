"""A request's lifecycle and its timing record, shared by the engine, the schedulers and the simulator.

Times are seconds on whatever clock drives the scheduler: wall time in the reference
engine, SimPy time in the simulator.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from reference.errors import ConfigError


class Status(enum.Enum):
    """Where a request is in the scheduler."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Outcome(enum.Enum):
    """How a finished request ended."""

    COMPLETED = "completed"
    REFUSED = "refused"  # the server turned it away (full queue: HTTP 503; cannot ever fit)
    TIMED_OUT = "timed_out"  # the client gave up before it finished
    ABORTED = "aborted"  # the client went away (disconnect)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick output tokens. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = True  # random weights: stop only on explicit stop ids or max_tokens

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p!r}")


@dataclass(eq=False)
class Request:
    """One generation request: its tokens, its progress through the scheduler, and its timing record.

    The scheduler owns num_computed_tokens (tokens whose K/V are in the cache) and status;
    the engine appends sampled tokens through append_token.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0  # s
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    outcome: Outcome | None = None
    reason: str = ""  # why it was refused / timed out
    first_scheduled_time: float | None = None  # s
    first_token_time: float | None = None  # s
    token_times: list[float] = field(default_factory=list)  # s, one per output token
    finish_time: float | None = None  # s
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prefix-cache hits at first admission

    def __post_init__(self):
        if len(self.prompt_token_ids) == 0:
            raise ConfigError("prompt", "must have at least one token")

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length (tokens)."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the length the KV cache must hold once all are computed."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold (prompt + max_tokens)."""
        return len(self.prompt_token_ids) + self.sampling.max_tokens

    def token_id(self, position: int) -> int:
        """Token at a position of prompt + output."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Tokens prompt + output in [start, stop)."""
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]

    def append_token(self, token_id: int, now: float) -> None:
        """Record a sampled token and its time (s)."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_token_ids.append(token_id)
        self.token_times.append(now)

    def is_done_generating(self) -> bool:
        """True once max_tokens are out or the last token is a stop token."""
        if self.num_output_tokens >= self.sampling.max_tokens:
            return True
        return bool(self.output_token_ids) and self.output_token_ids[-1] in self.sampling.stop_token_ids

    def finish(self, outcome: Outcome, now: float, reason: str = "") -> None:
        """Mark the request ended; only the first call counts (a request ends exactly once)."""
        if self.status is Status.FINISHED:
            return
        self.status = Status.FINISHED
        self.outcome = outcome
        self.reason = reason
        self.finish_time = now
