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

import dataclasses
import functools
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from reference.errors import ConfigError
from reference.request import Request, SamplingParams

if TYPE_CHECKING:  # experiment.py imports this module; only type names go the other way
    from sim.experiment import Cell, Experiment

BLOCK = 4096  # requests per cached block of sampled lengths

# Independent random streams, keyed (seed, stream, ...). Never renumber: results depend on them.
_S_PROMPT, _S_OUTPUT, _S_SHARED, _S_PREFIX_CHOICE, _S_TOKENS, _S_PREFIX_TOKENS, _S_ARRIVALS, _S_THINK = range(1, 9)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# ---------------------------------------------------------------------------------------
# Validation helpers (shared with sim.experiment)

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_int(value, field_name: str, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """value as an int, or ConfigError naming field_name and the allowed range."""
    lo = "" if min_value is None else f">= {min_value}"
    hi = "" if max_value is None else f"<= {max_value}"
    allowed = "integers " + " and ".join(s for s in (lo, hi) if s) if (lo or hi) else "integers"
    if not _is_int(value):
        raise ConfigError(field_name, f"must be an integer, got {value!r} ({type(value).__name__})", allowed)
    if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
        raise ConfigError(field_name, f"out of range, got {value!r}", allowed)
    return int(value)


def check_real(value, field_name: str, *, min_value: float | None = None, max_value: float | None = None,
               min_open: bool = False, allow_inf: bool = False) -> float:
    """value as a float, or ConfigError naming field_name and the allowed range."""
    parts = []
    if min_value is not None:
        parts.append(f"{'>' if min_open else '>='} {min_value:g}")
    if max_value is not None:
        parts.append(f"<= {max_value:g}")
    allowed = "numbers " + " and ".join(parts) if parts else "numbers"
    if allow_inf:
        allowed += " (inf allowed)"
    if not _is_real(value):
        raise ConfigError(field_name, f"must be a number, got {value!r} ({type(value).__name__})", allowed)
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ConfigError(field_name, f"must be finite, got {value!r}", allowed)
    if min_value is not None and (v < min_value or (min_open and v == min_value)):
        raise ConfigError(field_name, f"out of range, got {value!r}", allowed)
    if max_value is not None and v > max_value:
        raise ConfigError(field_name, f"out of range, got {value!r}", allowed)
    return v


# ---------------------------------------------------------------------------------------
# Length distributions (tokens): frozen, validated, vectorised samplers

class LengthDist:
    """A distribution of token counts (integers >= 1). Subclasses are frozen dataclasses."""

    kind: ClassVar[str] = ""

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
        d = {"dist": self.kind}
        for k, v in self.__dict__.items():
            if v is not None:
                d[k] = list(v) if isinstance(v, tuple) else v
        return d


@dataclass(frozen=True)
class FixedLength(LengthDist):
    """Always `value` tokens."""

    kind: ClassVar[str] = "fixed"
    value: int

    def __post_init__(self):
        check_int(self.value, "value", min_value=1)

    def sample(self, rng, size):
        return np.full(size, self.value, dtype=np.int64)

    @property
    def min_value(self):
        return self.value

    @property
    def max_value(self):
        return self.value


@dataclass(frozen=True)
class UniformLength(LengthDist):
    """Uniform integers in [low, high] (both inclusive)."""

    kind: ClassVar[str] = "uniform"
    low: int
    high: int

    def __post_init__(self):
        check_int(self.low, "low", min_value=1)
        check_int(self.high, "high", min_value=self.low)

    def sample(self, rng, size):
        return rng.integers(self.low, self.high + 1, size=size, dtype=np.int64)

    @property
    def min_value(self):
        return self.low

    @property
    def max_value(self):
        return self.high


@dataclass(frozen=True)
class LognormalLength(LengthDist):
    """Lognormal token counts, rounded to integers and clipped to [min, max].

    Give exactly one of `mean` (the distribution's mean: mu = ln(mean) - sigma^2 / 2) or
    `median` (mu = ln(median)); `sigma` is the standard deviation of ln(length).
    Clipping and rounding move the mean slightly; with min=1 and no max the shift is
    negligible unless mean is within a few units of 1.
    """

    kind: ClassVar[str] = "lognormal"
    sigma: float
    mean: float | None = None
    median: float | None = None
    min: int = 1
    max: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "sigma", check_real(self.sigma, "sigma", min_value=0.0))
        if (self.mean is None) == (self.median is None):
            raise ConfigError("mean", "give exactly one of mean and median", "mean = <tokens> or median = <tokens>")
        if self.mean is not None:
            object.__setattr__(self, "mean", check_real(self.mean, "mean", min_value=0.0, min_open=True))
        if self.median is not None:
            object.__setattr__(self, "median", check_real(self.median, "median", min_value=0.0, min_open=True))
        check_int(self.min, "min", min_value=1)
        if self.max is not None:
            check_int(self.max, "max", min_value=self.min)

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


@dataclass(frozen=True)
class EmpiricalLength(LengthDist):
    """Draws from `values` with probabilities proportional to `weights` (equal when omitted)."""

    kind: ClassVar[str] = "empirical"
    values: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.values, (list, tuple)) or not self.values:
            raise ConfigError("values", f"must be a non-empty list of integers, got {self.values!r}",
                              "a list of integers >= 1")
        vals = tuple(check_int(v, f"values[{i}]", min_value=1) for i, v in enumerate(self.values))
        object.__setattr__(self, "values", vals)
        if self.weights is not None:
            if not isinstance(self.weights, (list, tuple)) or len(self.weights) != len(vals):
                raise ConfigError("weights", f"must be a list as long as values ({len(vals)}), got {self.weights!r}",
                                  "one number >= 0 per value")
            w = tuple(check_real(x, f"weights[{i}]", min_value=0.0) for i, x in enumerate(self.weights))
            if sum(w) <= 0:
                raise ConfigError("weights", "must not all be zero", "numbers >= 0 with a positive sum")
            object.__setattr__(self, "weights", w)

    def sample(self, rng, size):
        p = None
        if self.weights is not None:
            p = np.asarray(self.weights, dtype=float)
            p = p / p.sum()
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=size, p=p)

    @property
    def min_value(self):
        if self.weights is None:
            return min(self.values)
        return min(v for v, w in zip(self.values, self.weights) if w > 0)

    @property
    def max_value(self):
        if self.weights is None:
            return max(self.values)
        return max(v for v, w in zip(self.values, self.weights) if w > 0)


LENGTH_DISTS: dict[str, type[LengthDist]] = {
    c.kind: c for c in (FixedLength, UniformLength, LognormalLength, EmpiricalLength)
}


def length_dist_from_dict(table: dict) -> LengthDist:
    """Build a LengthDist from its TOML table ({dist = "...", ...}); errors name the relative key."""
    if not isinstance(table, dict):
        raise ConfigError("", f"must be a table, got {table!r}", "a table with dist = " + " | ".join(LENGTH_DISTS))
    kind = table.get("dist")
    if kind is None:
        raise ConfigError("dist", "required", " | ".join(LENGTH_DISTS))
    if not isinstance(kind, str) or kind not in LENGTH_DISTS:
        raise ConfigError("dist", f"unknown distribution {kind!r}", " | ".join(LENGTH_DISTS))
    cls = LENGTH_DISTS[kind]
    names = [f.name for f in dataclasses.fields(cls)]
    params = {k: v for k, v in table.items() if k != "dist"}
    unknown = [k for k in params if k not in names]
    if unknown:
        raise ConfigError(unknown[0], f"unknown key for dist = {kind!r}", ", ".join(["dist", *names]))
    missing = [f for f in names if f not in params and _field_required(cls, f)]
    if missing:
        raise ConfigError(missing[0], f"required for dist = {kind!r}", ", ".join(names))
    return cls(**params)


def _field_required(cls, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@dataclass(frozen=True)
class ThinkTime:
    """A closed-loop client's pause between receiving a response and sending its next request (s).

    dist = "fixed" (always mean_s) or "exponential" (mean mean_s).
    """

    mean_s: float = 0.0
    dist: str = "fixed"

    def __post_init__(self):
        object.__setattr__(self, "mean_s", check_real(self.mean_s, "think_time_s", min_value=0.0))
        if self.dist not in ("fixed", "exponential"):
            raise ConfigError("think_time_dist", f"unknown {self.dist!r}", "fixed | exponential")

    def sample(self, rng: np.random.Generator) -> float:
        """One pause (s)."""
        if self.mean_s == 0.0:
            return 0.0
        if self.dist == "fixed":
            return self.mean_s
        return float(rng.exponential(self.mean_s))


@dataclass(frozen=True)
class SharedPrefix:
    """A `fraction` of requests start with one of `num_prefixes` system prompts of `tokens` tokens."""

    fraction: float
    tokens: int
    num_prefixes: int = 1

    def __post_init__(self):
        object.__setattr__(self, "fraction", check_real(self.fraction, "fraction", min_value=0.0, max_value=1.0))
        check_int(self.tokens, "tokens", min_value=1)
        check_int(self.num_prefixes, "num_prefixes", min_value=1)


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
    def prompt_token_ids(self) -> list[int]:
        """The prompt: shared prefix (if any) then tokens uniform in [1, vocab_size). Same every call."""
        prefix: list[int] = []
        if self.prefix_id is not None:
            prefix = list(_prefix_tokens(self.seed, self.prefix_id, self.prefix_len, self.vocab_size))
        n = self.prompt_len - self.prefix_len
        rest = _rng(self.seed, _S_TOKENS, self.index).integers(1, self.vocab_size, size=n)
        return prefix + rest.tolist()


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
        check_int(seed, "seed", min_value=0)
        check_int(vocab_size, "vocab_size", min_value=2)
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

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        out = (prompt, output, prefix)
        self._cache[b] = out
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return out

    def spec(self, index: int, *, arrival_time: float | None = None, client_id: int | None = None) -> RequestSpec:
        """Request number index (0-based)."""
        if not 0 <= index < len(self):
            raise IndexError(f"request index {index} out of range (0..{len(self) - 1})")
        prompt, output, prefix = self._block(index // BLOCK)
        j = index % BLOCK
        pid = int(prefix[j])
        plen = self.shared_prefix.tokens if pid >= 0 else 0
        return RequestSpec(request_id=f"r{index}", index=index, prompt_len=int(prompt[j]) + plen,
                           max_tokens=int(output[j]), arrival_time=arrival_time, client_id=client_id,
                           prefix_id=pid if pid >= 0 else None, prefix_len=plen,
                           seed=self.seed, vocab_size=self.vocab_size)


# ---------------------------------------------------------------------------------------
# Arrival processes and drivers' views of a workload

def gamma_arrivals(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless arrival times (s): the first at 0, then gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)).

    Mean gap 1/rate; coefficient of variation 1/sqrt(burstiness); burstiness 1 = Poisson
    (exponential gaps), < 1 burstier, > 1 more regular. rate = inf sends everything at 0.
    Like vLLM's benchmark_serving (it additionally rescales the gaps so the last arrival
    lands exactly at n/rate; we keep a plain renewal process).
    """
    rate = check_real(rate, "rate", min_value=0.0, min_open=True, allow_inf=True)
    burstiness = check_real(burstiness, "burstiness", min_value=0.0, min_open=True)
    return _gamma_arrivals(rate, burstiness, seed)


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
        check_int(num_clients, "clients", min_value=1)
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
    import pandas as pd

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
# From an experiment

def request_sequence(exp: Experiment) -> RequestSequence:
    """The experiment's request sequence (the same for every cell)."""
    w = exp.workload
    vocab = exp.model_config.vocab_size
    if w.kind == "trace":
        _, prompt, output = read_trace(w.path)
        return RequestSequence(exp.seed, vocab, prompt_lens=prompt, output_lens=output, shared_prefix=w.shared_prefix)
    return RequestSequence(exp.seed, vocab, prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens,
                           shared_prefix=w.shared_prefix)


def build_workload(exp: Experiment, cell: Cell) -> OpenLoopWorkload | ClosedLoopWorkload:
    """A fresh workload for one cell of the experiment (closed loop: ClosedLoopWorkload; else OpenLoopWorkload)."""
    w = exp.workload
    seq = request_sequence(exp)
    if w.kind == "closed_loop":
        return ClosedLoopWorkload(seq, cell.concurrency, requests_per_client=w.requests_per_client,
                                  num_requests=w.num_requests, think_time=w.think_time, timeout_s=w.timeout_s)
    if w.kind == "trace":
        arrival, _, _ = read_trace(w.path)
        return OpenLoopWorkload(seq, iter((arrival / w.speedup).tolist()), num_requests=w.num_requests,
                                duration_s=w.duration_s, max_concurrency=w.max_concurrency, timeout_s=w.timeout_s)
    burst = 1.0 if w.kind == "poisson" else w.burstiness
    return OpenLoopWorkload(seq, gamma_arrivals(cell.request_rate, burst, exp.seed), num_requests=w.num_requests,
                            duration_s=w.duration_s, max_concurrency=w.max_concurrency, timeout_s=w.timeout_s)
