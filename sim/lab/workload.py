"""Request generation: length distributions, arrival processes, closed-loop clients, trace replay.

Everything here is a pure function of a seed, never of a clock, so the reference engine
(wall clock) and the simulator (SimPy clock) replay exactly the same requests, and the
fidelity comparison compares like with like.

How determinism is kept without holding requests in memory:

- Request i of an experiment (i = 0, 1, 2, ...) is the same whatever the cell, engine or
  driver: its prompt length, output length and shared-prefix choice come from per-feature
  random streams keyed by (seed, feature, block of 4096 indices), generated a block at a
  time and cached (a few blocks). Changing the output distribution does not change the
  prompt lengths (each feature has its own stream), and cells that differ only in
  concurrency or rate see the same requests (common random numbers).
- Prompt token ids are generated on demand from (seed, i) when a spec is turned into a
  `Request`, so they exist only while the request is alive.
- Open-loop arrival gaps come from their own stream as standard gamma draws scaled by the
  cell's rate, so cells at different rates share the same arrival pattern, compressed.
- Closed loop: client c of N issues requests c, c + N, c + 2N, ...; its think times come
  from a per-client stream. Which request a client sends next never depends on timing.

Shared prefix: a fraction of requests start with one of `num_prefixes` system prompts of
K tokens (prepended to the sampled prompt length); all other tokens are uniform in
[1, vocab_size), so prefix caching hits only where it should (token 0 is never drawn).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import numpy as np
import pandas as pd
from pydantic import BeforeValidator, Field, model_validator

from reference.errors import ConfigError
from reference.request import Request, SamplingParams
from sim.lab.schema import ConfigModel, Int, Number, Str, finite

BLOCK = 4096  # requests per cached block of sampled lengths
CLOSED_LOOP_CACHE_BLOCKS = 256  # at most ~25 MB of lengths: the clients' spread (RequestSequence.cache_window)

# Independent random streams, keyed (seed, stream, ...). Never renumber: results depend on them.
_S_PROMPT, _S_OUTPUT, _S_SHARED, _S_PREFIX_CHOICE, _S_TOKENS, _S_PREFIX_TOKENS, _S_ARRIVALS, _S_THINK = range(1, 9)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])



# ---------------------------------------------------------------------------------------
# Length distributions (tokens): declared tables with vectorised samplers

PositiveInt = Annotated[Int, Field(ge=1)]


class LengthDist(ConfigModel):
    """A distribution of token counts (integers >= 1); `dist` names the kind."""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """size draws as int64 (each >= 1)."""
        raise NotImplementedError

    @property
    def min_value(self) -> int:
        """Smallest value the sampler can return."""
        raise NotImplementedError

    @property
    def max_value(self) -> float:
        """Largest value the sampler can return (inf when unbounded)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The TOML table that builds this distribution."""
        return self.model_dump(exclude_none=True)


class FixedLength(LengthDist):
    """Always `value` tokens."""

    dist: Literal["fixed"] = "fixed"
    value: PositiveInt

    def sample(self, rng, size):
        return np.full(size, self.value, dtype=np.int64)

    @property
    def min_value(self):
        return self.value

    @property
    def max_value(self):
        return self.value


class UniformLength(LengthDist):
    """Uniform integers in [low, high] (both inclusive)."""

    dist: Literal["uniform"] = "uniform"
    low: PositiveInt
    high: PositiveInt

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ConfigError("high", f"{self.high} is below low = {self.low}", f"integers >= {self.low}")
        return self

    def sample(self, rng, size):
        return rng.integers(self.low, self.high + 1, size=size, dtype=np.int64)

    @property
    def min_value(self):
        return self.low

    @property
    def max_value(self):
        return self.high


class LognormalLength(LengthDist):
    """Lognormal token counts, rounded to integers and clipped to [min, max].

    Give exactly one of `mean` (the distribution's mean: mu = ln(mean) - sigma^2 / 2) or
    `median` (mu = ln(median)); `sigma` is the standard deviation of ln(length).
    Clipping and rounding move the mean slightly; with min=1 and no max the shift is
    negligible unless mean is within a few units of 1.
    """

    dist: Literal["lognormal"] = "lognormal"
    sigma: Annotated[Number, Field(ge=0)]
    mean: Annotated[Number, Field(gt=0)] | None = None
    median: Annotated[Number, Field(gt=0)] | None = None
    min: PositiveInt = 1
    max: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_centre(self):
        if (self.mean is None) == (self.median is None):
            raise ConfigError("mean", "give exactly one of mean and median", "mean = <tokens> or median = <tokens>")
        finite(self.mean or self.median, "mean" if self.mean is not None else "median")
        finite(self.sigma, "sigma")
        if self.max is not None and self.max < self.min:
            raise ConfigError("max", f"{self.max} is below min = {self.min}", f"integers >= {self.min}")
        return self

    @property
    def mu(self) -> float:
        """Mean of ln(length)."""
        if self.median is not None:
            return math.log(self.median)
        return math.log(self.mean) - self.sigma ** 2 / 2

    def sample(self, rng, size):
        x = np.rint(rng.lognormal(self.mu, self.sigma, size=size))
        hi = self.max if self.max is not None else np.iinfo(np.int64).max // 2
        return np.clip(x, self.min, hi).astype(np.int64)

    @property
    def min_value(self):
        return self.min

    @property
    def max_value(self):
        return self.max if self.max is not None else math.inf


class EmpiricalLength(LengthDist):
    """Draws from `values` with probabilities proportional to `weights` (equal when omitted)."""

    dist: Literal["empirical"] = "empirical"
    values: Annotated[tuple[PositiveInt, ...], Field(min_length=1)]
    weights: tuple[Annotated[Number, Field(ge=0)], ...] | None = None

    @model_validator(mode="after")
    def _weights_fit(self):
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ConfigError("weights", f"must be a list as long as values ({len(self.values)}), got "
                                  f"{list(self.weights)}", "one number >= 0 per value")
            if sum(self.weights) <= 0 or any(math.isinf(w) for w in self.weights):
                raise ConfigError("weights", "must be finite and not all zero", "numbers >= 0 with a positive sum")
        return self

    def sample(self, rng, size):
        p = None
        if self.weights is not None:
            p = np.asarray(self.weights, dtype=float)
            p = p / p.sum()
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=size, p=p)

    def _support(self) -> list[int]:
        if self.weights is None:
            return list(self.values)
        return [v for v, w in zip(self.values, self.weights) if w > 0]

    @property
    def min_value(self):
        return min(self._support())

    @property
    def max_value(self):
        return max(self._support())

    def to_dict(self) -> dict:
        d = super().to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


Lengths = Annotated[Union[FixedLength, UniformLength, LognormalLength, EmpiricalLength], Field(discriminator="dist")]


class SharedPrefix(ConfigModel):
    """A `fraction` of requests start with one of `num_prefixes` system prompts of `tokens` tokens."""

    fraction: Annotated[Number, Field(ge=0, le=1)]
    tokens: PositiveInt
    num_prefixes: PositiveInt = 1


class ThinkTime:
    """A closed-loop client's pause between receiving a response and sending its next request (s).

    dist = "fixed" (always mean_s) or "exponential" (mean mean_s).
    """

    def __init__(self, mean_s: float = 0.0, dist: str = "fixed"):
        if dist not in ("fixed", "exponential"):
            raise ConfigError("think_time_dist", f"unknown {dist!r}", "fixed | exponential")
        self.mean_s, self.dist = float(mean_s), dist

    def sample(self, rng: np.random.Generator) -> float:
        """One pause (s)."""
        if self.mean_s == 0.0:
            return 0.0
        if self.dist == "fixed":
            return self.mean_s
        return float(rng.exponential(self.mean_s))


# ---------------------------------------------------------------------------------------
# Request specs

@functools.lru_cache(maxsize=64)
def _prefix_tokens(seed: int, prefix_id: int, length: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(_rng(seed, _S_PREFIX_TOKENS, prefix_id).integers(1, vocab_size, size=length).tolist())


@dataclass(frozen=True)
class RequestSpec:
    """What a client sends: request i of the experiment's sequence.

    prompt_len includes the shared prefix (prefix_len tokens, 0 when none). arrival_time is
    set for open-loop and trace workloads; closed-loop drivers stamp the send time.
    The token ids are generated on demand (`prompt_token_ids`) from (seed, index).
    """

    request_id: str
    index: int
    prompt_len: int
    max_tokens: int
    arrival_time: float | None = None  # s
    client_id: int | None = None
    prefix_id: int | None = None
    prefix_len: int = 0
    seed: int = field(default=0, repr=False)
    vocab_size: int = field(default=32000, repr=False)

    @property
    def prefix_token_ids(self) -> tuple[int, ...]:
        """The shared prefix's tokens (empty when none), without drawing the rest of the prompt."""
        if self.prefix_id is None:
            return ()
        return _prefix_tokens(self.seed, self.prefix_id, self.prefix_len, self.vocab_size)

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt: shared prefix (if any) then tokens uniform in [1, vocab_size). Same every call."""
        prefix: list[int] = []
        if self.prefix_id is not None:
            prefix = list(_prefix_tokens(self.seed, self.prefix_id, self.prefix_len, self.vocab_size))
        n = self.prompt_len - self.prefix_len
        rest = _rng(self.seed, _S_TOKENS, self.index).integers(1, self.vocab_size, size=n)
        return prefix + rest.tolist()


_SPEC_FIELDS = tuple(f.name for f in fields(RequestSpec))


def _spec(*values) -> RequestSpec:
    """RequestSpec(*values) (every field, in order) without the frozen dataclass's per-field object.__setattr__.

    A simulation makes one spec per request (~1.5 us of its __init__ a request); the instance is the same.
    """
    spec = object.__new__(RequestSpec)
    spec.__dict__.update(zip(_SPEC_FIELDS, values))
    return spec


def to_request(spec: RequestSpec, arrival_time: float | None = None, *, temperature: float = 0.0) -> Request:
    """A fresh `reference.request.Request` for spec, arriving at arrival_time (s; default spec.arrival_time).

    Output length is exactly spec.max_tokens (ignore_eos, no stop tokens), like vLLM's
    benchmark with --ignore-eos, so both drivers generate the same number of tokens.
    """
    t = spec.arrival_time if arrival_time is None else arrival_time
    if t is None:
        raise ValueError(f"request {spec.request_id}: closed-loop specs need an arrival_time (the send time)")
    sampling = SamplingParams(max_tokens=int(spec.max_tokens), temperature=temperature, ignore_eos=True)
    return Request(request_id=spec.request_id, prompt_token_ids=spec.prompt_token_ids, sampling=sampling,
                   arrival_time=float(t))


class RequestSequence:
    """Random access to request i of an experiment: lengths and prefix choice, deterministic in (seed, i).

    Lengths come from the two distributions, or from explicit arrays (trace replay).
    """

    def __init__(self, seed: int, vocab_size: int, *, prompt_tokens: LengthDist | None = None,
                 output_tokens: LengthDist | None = None, shared_prefix: SharedPrefix | None = None,
                 prompt_lens: np.ndarray | None = None, output_lens: np.ndarray | None = None,
                 cache_blocks: int = 8):
        if seed < 0 or vocab_size < 2:
            raise ConfigError("seed" if seed < 0 else "vocab_size", f"out of range: seed {seed}, vocab {vocab_size}",
                              "seed >= 0, vocab_size >= 2")
        if (prompt_lens is None) != (output_lens is None) or (prompt_lens is None) == (prompt_tokens is None):
            raise ValueError("give either both length distributions or both length arrays")
        self.seed = int(seed)
        self.vocab_size = int(vocab_size)
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens
        self.shared_prefix = shared_prefix
        self.prompt_lens = None if prompt_lens is None else np.asarray(prompt_lens, dtype=np.int64)
        self.output_lens = None if output_lens is None else np.asarray(output_lens, dtype=np.int64)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_blocks = cache_blocks

    def __len__(self) -> int:
        """Requests available (trace length; effectively unbounded for sampled lengths)."""
        return len(self.prompt_lens) if self.prompt_lens is not None else 2 ** 62

    def _block(self, b: int) -> tuple[list[int], list[int], list[int]]:
        hit = self._cache.get(b)
        if hit is not None:
            self._cache.move_to_end(b)
            return hit
        s = self.seed
        if self.prompt_lens is not None:
            prompt = self.prompt_lens[b * BLOCK:(b + 1) * BLOCK]
            output = self.output_lens[b * BLOCK:(b + 1) * BLOCK]
        else:
            prompt = self.prompt_tokens.sample(_rng(s, _S_PROMPT, b), BLOCK)
            output = self.output_tokens.sample(_rng(s, _S_OUTPUT, b), BLOCK)
        n = len(prompt)
        prefix = np.full(n, -1, dtype=np.int64)
        sp = self.shared_prefix
        if sp is not None and sp.fraction > 0:
            shared = _rng(s, _S_SHARED, b).random(BLOCK)[:n] < sp.fraction
            choice = _rng(s, _S_PREFIX_CHOICE, b).integers(0, sp.num_prefixes, size=BLOCK)[:n]
            prefix = np.where(shared, choice, -1)
        out = (prompt.tolist(), output.tolist(), prefix.tolist())  # lists: spec() reads one int at a time
        self._cache[b] = out
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return out

    def cache_window(self, max_blocks: int, below: int) -> None:
        """Cache up to max_blocks blocks, and drop those wholly below request index `below` (nobody will ask again).

        A closed-loop run's clients drift apart (their spread in request index grows like the square
        root of the requests sent), so a fixed handful of blocks thrashes: a block is resampled at
        each miss (~25,000 misses in 300k requests with 8 blocks, +30 % CPU). Only speed depends on it.
        """
        self._cache_blocks = max_blocks
        low = below // BLOCK
        while self._cache and min(self._cache) < low:
            del self._cache[min(self._cache)]

    def spec(self, index: int, *, arrival_time: float | None = None, client_id: int | None = None) -> RequestSpec:
        """Request number index (0-based)."""
        if not 0 <= index < len(self):
            raise IndexError(f"request index {index} out of range (0..{len(self) - 1})")
        prompt, output, prefix = self._block(index // BLOCK)
        j = index % BLOCK
        pid = prefix[j]
        plen = self.shared_prefix.tokens if pid >= 0 else 0
        return _spec(f"r{index}", index, prompt[j] + plen, output[j], arrival_time, client_id,
                     pid if pid >= 0 else None, plen, self.seed, self.vocab_size)


# ---------------------------------------------------------------------------------------
# Arrival processes and drivers' views of a workload

def gamma_arrivals(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless arrival times (s): the first at 0, then gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)).

    Mean gap 1/rate; coefficient of variation 1/sqrt(burstiness); burstiness 1 = Poisson
    (exponential gaps), < 1 burstier, > 1 more regular. rate = inf sends everything at 0.
    Like vLLM's benchmark_serving (it additionally rescales the gaps so the last arrival
    lands exactly at n/rate; we keep a plain renewal process).
    """
    if not rate > 0 or not 0 < burstiness < math.inf:
        raise ConfigError("rate" if not rate > 0 else "burstiness", f"out of range: rate {rate}, burstiness "
                          f"{burstiness}", "rate > 0 (inf allowed), burstiness > 0")
    return _gamma_arrivals(float(rate), float(burstiness), seed)


def _gamma_arrivals(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    t = 0.0
    yield t
    b = 0
    while True:
        gaps = _rng(seed, _S_ARRIVALS, b).standard_gamma(burstiness, size=BLOCK) * scale
        for g in gaps.tolist():
            t += g
            yield t
        b += 1


class OpenLoopWorkload:
    """Requests with precomputed arrival times (Poisson, gamma, trace). Iterate to get specs in arrival order.

    Stops after num_requests, or at the first arrival at or after duration_s, whichever is set
    (both may be set; the first limit reached wins). max_concurrency (0 = none) caps in-flight
    requests; the driver enforces it (a request that finds the cap reached waits client-side,
    like vLLM's --max-concurrency).
    """

    def __init__(self, sequence: RequestSequence, arrivals: Iterator[float], *, num_requests: int | None = None,
                 duration_s: float | None = None, max_concurrency: int = 0, timeout_s: float = 0.0):
        if num_requests is None and duration_s is None and len(sequence) >= 2 ** 62:
            raise ValueError("an open-loop workload needs num_requests or duration_s")
        self.sequence = sequence
        self._arrivals = arrivals
        self.num_requests = num_requests
        self.duration_s = duration_s
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self._used = False

    def __iter__(self) -> Iterator[RequestSpec]:
        if self._used:
            raise RuntimeError("an OpenLoopWorkload can be iterated once; build a new one")
        self._used = True
        limit = min(self.num_requests if self.num_requests is not None else len(self.sequence), len(self.sequence))
        for i, t in zip(range(limit), self._arrivals):
            if self.duration_s is not None and t >= self.duration_s:
                return
            yield self.sequence.spec(i, arrival_time=t)


class ClosedLoopWorkload:
    """N clients; each sends a request, waits for its response, thinks, and sends the next.

    Client c (0-based) sends requests c, c + N, c + 2N, ... of the sequence, below
    total_requests, so the content each client sends never depends on timing. Driver loop:

        while (spec := wl.next_for_client(c)) is not None:
            req = to_request(spec, arrival_time=now); ...wait for it to finish...
            wait wl.think_time_s(c)
    """

    def __init__(self, sequence: RequestSequence, num_clients: int, *, requests_per_client: int | None = None,
                 num_requests: int | None = None, think_time: ThinkTime = ThinkTime(), timeout_s: float = 0.0):
        if num_clients < 1:
            raise ConfigError("clients", f"must be >= 1, got {num_clients}", "integers >= 1")
        if (requests_per_client is None) == (num_requests is None):
            raise ValueError("give exactly one of requests_per_client and num_requests")
        self.sequence = sequence
        self.num_clients = int(num_clients)
        self.total_requests = (num_requests if num_requests is not None
                               else requests_per_client * self.num_clients)
        self.total_requests = min(self.total_requests, len(sequence))
        self.think_time = think_time
        self.timeout_s = timeout_s
        self._sent = [0] * self.num_clients
        self._think_rngs: dict[int, np.random.Generator] = {}
        self._handed_out = 0
        sequence.cache_window(CLOSED_LOOP_CACHE_BLOCKS, 0)

    def requests_for_client(self, client_id: int) -> int:
        """How many requests client_id sends in all."""
        n, c = self.num_clients, client_id
        return max(0, (self.total_requests - c + n - 1) // n)

    def next_for_client(self, client_id: int) -> RequestSpec | None:
        """The client's next request (arrival_time unset: stamp it with to_request), or None when it is done."""
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client_id {client_id} out of range (0..{self.num_clients - 1})")
        index = client_id + self._sent[client_id] * self.num_clients
        if index >= self.total_requests:
            return None
        self._sent[client_id] += 1
        self._handed_out += 1
        if self._handed_out % BLOCK == 0:  # forget the blocks every client has moved past
            n = self.num_clients
            self.sequence.cache_window(CLOSED_LOOP_CACHE_BLOCKS, min(c + k * n for c, k in enumerate(self._sent)))
        return self.sequence.spec(index, client_id=client_id)

    def think_time_s(self, client_id: int) -> float:
        """The client's next pause (s), from its own stream."""
        rng = self._think_rngs.get(client_id)
        if rng is None:
            rng = self._think_rngs[client_id] = _rng(self.sequence.seed, _S_THINK, client_id)
        return self.think_time.sample(rng)


# ---------------------------------------------------------------------------------------
# Traces

TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


@functools.lru_cache(maxsize=8)
def _read_trace_cached(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:  # pandas' parser errors are ValueErrors
        raise ConfigError("workload.path", f"cannot read trace {path}: {e}") from None
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError("workload.path", f"trace {path} lacks column(s) {', '.join(missing)} "
                          f"(has {', '.join(map(str, df.columns))})", ", ".join(TRACE_COLUMNS))
    if len(df) == 0:
        raise ConfigError("workload.path", f"trace {path} has no rows", "at least one request")
    cols = []
    for name in TRACE_COLUMNS:
        v = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(v))
        if name != "arrival_s":
            bad = np.union1d(bad, np.flatnonzero(np.isfinite(v) & ((v < 1) | (v != np.round(v)))))
        if len(bad):
            i = int(bad[0])
            want = "a finite number" if name == "arrival_s" else "an integer >= 1"
            raise ConfigError("workload.path", f"trace {path} row {i} (line {i + 2}), column {name}: "
                              f"{df[name].iloc[i]!r} is not {want}", want)
        cols.append(v)
    arrival, prompt, output = cols
    back = np.flatnonzero(np.diff(arrival) < 0)
    if len(back):
        i = int(back[0]) + 1
        raise ConfigError("workload.path", f"trace {path} row {i} (line {i + 2}): arrival_s {arrival[i]!r} comes "
                          f"before the previous row's {arrival[i - 1]!r}", "arrival_s non-decreasing")
    return arrival - arrival[0], prompt.astype(np.int64), output.astype(np.int64)


def read_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_s shifted to start at 0, prompt_tokens, output_tokens) from a CSV; ConfigError on bad input.

    Columns arrival_s (non-decreasing), prompt_tokens and output_tokens (integers >= 1)
    are required; other columns are ignored. Errors name the row and CSV line.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise ConfigError("workload.path", f"trace file {str(p)!r} not found", "a CSV file with columns "
                          + ", ".join(TRACE_COLUMNS)) from None
    return _read_trace_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)



# ---------------------------------------------------------------------------------------
# The [workload] table: each kind builds its drivers' view of one cell


def _as_list(value):
    """A single value stands for a list of one (clients = 4, rates = 2.0)."""
    return value if isinstance(value, (list, tuple)) else [value]


def _distinct(values, field: str) -> None:
    if len(set(values)) != len(values):
        raise ConfigError(field, f"has duplicates: {list(values)}", "distinct values (one cell each)")


NonNegative = Annotated[Number, Field(ge=0)]
Rate = Annotated[Number, Field(gt=0)]  # req/s; inf = all at once


class _WorkloadKind(ConfigModel):
    """What every [workload] kind does: its cells, its request sequence, its drivers' workload per cell."""

    KEYS: ClassVar[tuple[str, ...]] = ()  # the kind's own keys, in the order the TOML writer prints them
    LOAD_KEY: ClassVar[str | None] = None  # the key holding the swept loads (clients, rates; none for a trace)
    is_closed_loop: ClassVar[bool] = False

    @property
    def loads(self) -> tuple:
        """One entry per cell: client counts, rates, or (None,) for a trace."""
        raise NotImplementedError

    def cell_fields(self, load) -> dict:
        """The Cell fields of one load: concurrency, request_rate, or none (trace)."""
        raise NotImplementedError

    def sequence(self, seed: int, vocab_size: int) -> RequestSequence:
        """The experiment's request sequence (the same for every cell)."""
        return RequestSequence(seed, vocab_size, prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
                               shared_prefix=self.shared_prefix)

    def build(self, seed: int, vocab_size: int, load) -> OpenLoopWorkload | ClosedLoopWorkload:
        """A fresh workload for one cell (load: its client count or rate)."""
        raise NotImplementedError

    def _lengths(self, samples: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        return self.prompt_tokens.sample(rng, samples), self.output_tokens.sample(rng, samples)

    def _shortest(self) -> int:
        return self.prompt_tokens.min_value + self.output_tokens.min_value

    def min_request_tokens(self) -> int:
        """The fewest tokens (prompt + output) a request can hold; the shared prefix counts when every request has it."""
        shortest = self._shortest()
        if self.shared_prefix is not None and self.shared_prefix.fraction == 1.0:
            shortest += self.shared_prefix.tokens
        return shortest

    def mean_lengths(self, samples: int = 4096) -> tuple[float, float]:
        """Mean prompt and output tokens of the requests (shared prefix included), from samples of the sequence."""
        prompt, output = self._lengths(samples)
        p = float(np.mean(prompt))
        if self.shared_prefix is not None:
            p += self.shared_prefix.fraction * self.shared_prefix.tokens
        return p, float(np.mean(output))

    def describe(self) -> str:
        """The loads in words, for reports."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The TOML table: kind, its own keys, timeout_s, the lengths, the shared prefix; None omitted."""
        d: dict = {"kind": self.kind}
        for name in self.KEYS + ("timeout_s",):
            v = getattr(self, name)
            if v is not None:
                d[name] = list(v) if isinstance(v, tuple) else v
        for name in ("prompt_tokens", "output_tokens"):
            v = getattr(self, name, None)
            if v is not None:
                d[name] = v.to_dict()
        if self.shared_prefix is not None:
            d["shared_prefix"] = self.shared_prefix.model_dump()
        return d


class ClosedLoop(_WorkloadKind):
    """N clients (one cell per entry of clients), each sending its next request when the last one ends."""

    kind: Literal["closed_loop"]
    clients: Annotated[tuple[PositiveInt, ...], BeforeValidator(_as_list), Field(min_length=1)]
    requests_per_client: PositiveInt | None = None
    num_requests: PositiveInt | None = None  # total per cell, instead of requests_per_client
    think_time_s: NonNegative = 0.0
    think_time_dist: Literal["fixed", "exponential"] = "fixed"
    timeout_s: NonNegative = 0.0
    prompt_tokens: Lengths
    output_tokens: Lengths
    shared_prefix: SharedPrefix | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("clients", "requests_per_client", "num_requests", "think_time_s",
                                       "think_time_dist")
    LOAD_KEY: ClassVar[str | None] = "clients"
    is_closed_loop: ClassVar[bool] = True

    @model_validator(mode="after")
    def _one_count(self):
        _distinct(self.clients, "clients")
        if (self.requests_per_client is None) == (self.num_requests is None):
            raise ConfigError("requests_per_client", "give exactly one of requests_per_client and num_requests",
                              "requests_per_client = <per client> or num_requests = <total per cell>")
        if self.num_requests is not None and self.num_requests < max(self.clients):
            raise ConfigError("num_requests", f"{self.num_requests} is fewer than clients = {max(self.clients)}, "
                              "so some clients would send nothing", f"integers >= {max(self.clients)}")
        object.__setattr__(self, "think_time_s", finite(float(self.think_time_s), "think_time_s"))
        object.__setattr__(self, "timeout_s", finite(float(self.timeout_s), "timeout_s"))
        return self

    @property
    def think_time(self) -> ThinkTime:
        """The closed-loop think-time sampler."""
        return ThinkTime(self.think_time_s, self.think_time_dist)

    @property
    def loads(self):
        return self.clients

    def cell_fields(self, load):
        return {"concurrency": load}

    def describe(self):
        each = f", {self.requests_per_client} requests each" if self.requests_per_client else ""
        return f"closed-loop clients {', '.join(map(str, self.clients))}{each}"

    def build(self, seed, vocab_size, load):
        return ClosedLoopWorkload(self.sequence(seed, vocab_size), load, requests_per_client=self.requests_per_client,
                                  num_requests=self.num_requests, think_time=self.think_time,
                                  timeout_s=self.timeout_s)


class _OpenLoop(_WorkloadKind):
    """Requests at precomputed arrival times; fields every open-loop kind has."""

    def _limits(self) -> dict:
        return dict(num_requests=self.num_requests, duration_s=self.duration_s,
                    max_concurrency=self.max_concurrency, timeout_s=self.timeout_s)

    def _check_limits(self) -> None:
        object.__setattr__(self, "timeout_s", finite(float(self.timeout_s), "timeout_s"))
        if self.duration_s is not None:
            finite(self.duration_s, "duration_s")


class Poisson(_OpenLoop):
    """Poisson arrivals at each of `rates` (req/s, one cell each; inf sends everything at once)."""

    kind: Literal["poisson"]
    rates: Annotated[tuple[Rate, ...], BeforeValidator(_as_list), Field(min_length=1)]
    num_requests: PositiveInt | None = None
    duration_s: Annotated[Number, Field(gt=0)] | None = None
    max_concurrency: Annotated[Int, Field(ge=0)] = 0  # in-flight cap, client side (0 = none)
    timeout_s: NonNegative = 0.0
    prompt_tokens: Lengths
    output_tokens: Lengths
    shared_prefix: SharedPrefix | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("rates", "num_requests", "duration_s", "max_concurrency")
    LOAD_KEY: ClassVar[str | None] = "rates"
    BURSTINESS: ClassVar[float] = 1.0

    @model_validator(mode="after")
    def _enough(self):
        _distinct(self.rates, "rates")
        self._check_limits()
        if self.num_requests is None and self.duration_s is None:
            raise ConfigError("num_requests", f"kind = {self.kind!r} needs num_requests or duration_s (or both)",
                              "num_requests = <requests per cell>, duration_s = <seconds>")
        if self.num_requests is None and any(math.isinf(r) for r in self.rates):
            raise ConfigError("num_requests", "rate = inf sends everything at once, so it needs num_requests",
                              "integers >= 1")
        return self

    @property
    def loads(self):
        return self.rates

    def cell_fields(self, load):
        return {"request_rate": load}

    def describe(self):
        rates = ", ".join(f"{r:g}" for r in self.rates)
        return f"{self.kind} arrivals at {rates} req/s, {self.num_requests} requests per rate"

    def build(self, seed, vocab_size, load):
        burstiness = getattr(self, "burstiness", self.BURSTINESS)
        return OpenLoopWorkload(self.sequence(seed, vocab_size), gamma_arrivals(load, burstiness, seed),
                                **self._limits())


class Gamma(Poisson):
    """Gamma-distributed gaps (burstiness = shape; 1 = Poisson, < 1 burstier) at each of `rates`."""

    kind: Literal["gamma"]
    burstiness: Annotated[Number, Field(gt=0)] = 1.0

    KEYS: ClassVar[tuple[str, ...]] = ("rates", "burstiness", "num_requests", "duration_s", "max_concurrency")


class Trace(_OpenLoop):
    """Replay of a CSV trace (arrival_s, prompt_tokens, output_tokens), its gaps divided by speedup: one cell."""

    kind: Literal["trace"]
    path: Str  # relative to the experiment file
    speedup: Annotated[Number, Field(gt=0)] = 1.0
    num_requests: PositiveInt | None = None
    duration_s: Annotated[Number, Field(gt=0)] | None = None
    max_concurrency: Annotated[Int, Field(ge=0)] = 0
    timeout_s: NonNegative = 0.0
    shared_prefix: SharedPrefix | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("path", "speedup", "num_requests", "duration_s", "max_concurrency")

    @model_validator(mode="after")
    def _limits_ok(self):
        self._check_limits()
        finite(self.speedup, "speedup")
        return self

    @property
    def loads(self):
        return (None,)

    def cell_fields(self, load):
        return {}

    def describe(self):
        return f"trace replay of {Path(self.path).name} at {self.speedup:g}x speed"

    def _lengths(self, samples):
        _, prompt, output = read_trace(self.path)
        return prompt, output

    def _shortest(self):
        prompt, output = self._lengths(0)
        return int((prompt + output).min())

    def sequence(self, seed, vocab_size):
        _, prompt, output = read_trace(self.path)
        return RequestSequence(seed, vocab_size, prompt_lens=prompt, output_lens=output,
                               shared_prefix=self.shared_prefix)

    def build(self, seed, vocab_size, load):
        arrival, _, _ = read_trace(self.path)
        return OpenLoopWorkload(self.sequence(seed, vocab_size), iter((arrival / self.speedup).tolist()),
                                **self._limits())


Workload = Annotated[Union[ClosedLoop, Poisson, Gamma, Trace], Field(discriminator="kind")]
