"""Experiment configs: one TOML file drives the reference engine (`servesim bench`) and the simulator (`servesim run`).

The file is parsed into frozen dataclasses and validated before anything runs: unknown keys,
wrong types and impossible values raise `ConfigError` naming the full key path (e.g.
`engines.vllm.max_num_seqs`) and what is allowed. Example (abridged; most keys have defaults):

    name = "cpu_tiny_sequential_vs_continuous"
    description = "..."
    seed = 0
    model = "tiny"                   # a reference.config preset
    dtype = "float32"                # reference engine compute dtype: float32 | bfloat16 | float16

    [workload]
    kind = "closed_loop"             # closed_loop | poisson | gamma | trace
    clients = [1, 4, 16]             # closed_loop: one cell per N
    requests_per_client = 4          # closed_loop: or num_requests (total per cell)
    think_time_s = 0.0               # closed_loop; think_time_dist = "fixed" | "exponential"
    timeout_s = 0.0                  # client timeout (0 = none)
    # poisson / gamma: rates = [1.0, 4.0, inf] (req/s, one cell each), num_requests and/or
    #   duration_s, max_concurrency (0 = none), gamma: burstiness (shape; 1 = Poisson)
    # trace: path = "trace.csv" (arrival_s, prompt_tokens, output_tokens; relative to this
    #   file), speedup = 1.0, optional num_requests / duration_s / max_concurrency
    [workload.prompt_tokens]         # fixed: value | uniform: low, high | lognormal: mean or
    dist = "fixed"                   #   median, sigma, min, max | empirical: values, weights
    value = 100
    [workload.output_tokens]
    dist = "fixed"
    value = 200
    [workload.shared_prefix]         # optional: requests that share a system prompt
    fraction = 0.5
    tokens = 64
    num_prefixes = 1

    [engines.ollama]                 # one table per engine variant, any name
    scheduler = "sequential"         # sequential | static | continuous | orca
    num_parallel = 1                 # + num_ctx, max_queue, n_batch, n_ubatch, weights, kv_dtype
    [engines.vllm]
    scheduler = "continuous"         # + block_size, max_num_seqs, max_num_batched_tokens,
                                     #   enable_chunked_prefill, enable_prefix_caching,
                                     #   gpu_memory_utilization, max_model_len, num_blocks, ...
    [engines.orca_max]
    scheduler = "orca"               # continuous fields + reservation = "max_model_len" | "request"
    [engines.ft]
    scheduler = "static"             # max_batch_size, max_model_len, reserve_max_len,
                                     #   kv_capacity_tokens, gpu_memory_utilization

    [hardware]                       # simulator only
    preset = "h100-sxm"
    replicas = 1
    router = "round_robin"           # round_robin | least_outstanding
    tp = 1
    [cost_model]                     # simulator only; a plain table checked by sim.costmodel
    kind = "roofline"
    [slo]                            # optional goodput objectives (ms)
    ttft_ms = 500.0
    [published]                      # optional, free-form: the figures this config targets

Engine defaults are the real engines' defaults (see the engine classes). Model-dependent
defaults (vLLM's max_model_len = the model's context length, Ollama's num_ctx capped by it)
are resolved against the model when the Experiment is built, so consumers always see ints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

from reference.config import ModelConfig, get_preset
from reference.errors import ConfigError
from sim.formats import KV_DTYPES, WEIGHT_FORMATS
from sim.metrics import SLO, cell_label
from sim.workload import (LengthDist, SharedPrefix, ThinkTime, check_int, check_real, length_dist_from_dict,
                          read_trace)

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("sequential", "static", "continuous", "orca")
WORKLOAD_KINDS = ("closed_loop", "poisson", "gamma", "trace")
ROUTERS = ("round_robin", "least_outstanding")
COST_MODEL_KINDS = ("roofline", "calibrated")

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# ---------------------------------------------------------------------------------------
# Small validation helpers

def _check_choice(value, field_name: str, choices) -> str:
    if value is None:
        raise ConfigError(field_name, "required", " | ".join(choices))
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(field_name, f"unknown value {value!r}", " | ".join(choices))
    return value


def _check_bool(value, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field_name, f"must be true or false, got {value!r}", "true | false")
    return value


def _check_str(value, field_name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(field_name, f"must be a string, got {value!r}", "a string")
    return value


def _split_error(e: ConfigError) -> str:
    """The message part of a ConfigError's text (without 'field: ' and ' (allowed: ...)')."""
    text = str(e)
    if text.startswith(f"{e.field}: "):
        text = text[len(e.field) + 2:]
    if e.allowed and text.endswith(f" (allowed: {e.allowed})"):
        text = text[: -len(f" (allowed: {e.allowed})")]
    return text


@contextlib.contextmanager
def _prefixed(prefix: str):
    """Re-raise ConfigErrors from inside with `prefix.` before their field (the full key path)."""
    try:
        yield
    except ConfigError as e:
        full = f"{prefix}.{e.field}" if e.field else prefix
        raise ConfigError(full, _split_error(e), e.allowed) from None


def _check_keys(table, path: str, allowed) -> dict:
    """table as a dict whose keys are all in allowed; ConfigError (with a did-you-mean) otherwise."""
    if not isinstance(table, dict):
        raise ConfigError(path, f"must be a table, got {table!r}", "a table with keys " + ", ".join(allowed))
    allowed = list(allowed)
    for k in table:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{k}" if path else k, f"unknown key{hint}", ", ".join(allowed))
    return table


def _int_list(value, field_name: str, *, min_value: int) -> tuple[int, ...]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    if not vals:
        raise ConfigError(field_name, "must not be empty", f"an integer or a list of integers >= {min_value}")
    out = tuple(check_int(v, f"{field_name}[{i}]" if isinstance(value, (list, tuple)) else field_name,
                          min_value=min_value) for i, v in enumerate(vals))
    if len(set(out)) != len(out):
        raise ConfigError(field_name, f"has duplicates: {list(out)}", "distinct values (one cell each)")
    return out


def _rate_list(value, field_name: str) -> tuple[float, ...]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    if not vals:
        raise ConfigError(field_name, "must not be empty", "a number or a list of numbers > 0 (inf allowed)")
    out = tuple(check_real(v, f"{field_name}[{i}]" if isinstance(value, (list, tuple)) else field_name,
                           min_value=0.0, min_open=True, allow_inf=True) for i, v in enumerate(vals))
    if len(set(out)) != len(out):
        raise ConfigError(field_name, f"has duplicates: {list(out)}", "distinct values (one cell each)")
    return out


# ---------------------------------------------------------------------------------------
# Engines

@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Fields every engine variant has. Subclasses: SequentialEngine, StaticEngine, ContinuousEngine."""

    SCHEDULERS: ClassVar[tuple[str, ...]] = ()
    name: str
    scheduler: str
    weights: str = "fp16"  # sim.formats.WEIGHT_FORMATS name, sim only; the reference engine ignores it
    kv_dtype: str = "fp16"  # sim.formats.KV_DTYPES name, sim only; the reference engine keeps K/V in its dtype
    max_queue: int = 0  # waiting requests beyond which new ones are refused (0 = unbounded)

    def __post_init__(self):
        _check_str(self.name, "name")
        if not _NAME_RE.match(self.name):
            raise ConfigError("name", f"engine name {self.name!r} must be letters, digits, '_' or '-'",
                              "[A-Za-z0-9_-]+")
        _check_choice(self.scheduler, "scheduler", self.SCHEDULERS or SCHEDULERS)
        _check_choice(self.weights, "weights", tuple(WEIGHT_FORMATS))
        _check_choice(self.kv_dtype, "kv_dtype", tuple(KV_DTYPES))
        check_int(self.max_queue, "max_queue", min_value=0)

    @property
    def context_len(self) -> int:
        """The most tokens (prompt + output) one request can hold."""
        raise NotImplementedError

    @property
    def weight_bits(self) -> float:
        """Bits per weight of `weights` (sim.formats)."""
        return WEIGHT_FORMATS[self.weights].bits_per_weight

    @property
    def kv_bytes_per_element(self) -> float:
        """Bytes per K or V element of `kv_dtype` (sim.formats)."""
        return KV_DTYPES[self.kv_dtype].bytes_per_element

    def resolve(self, model: ModelConfig) -> EngineConfig:
        """A copy with model-dependent defaults filled and checked against the model."""
        return self

    def to_dict(self) -> dict:
        """The TOML table (without the name)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}


@dataclass(frozen=True, kw_only=True)
class SequentialEngine(EngineConfig):
    """Ollama / llama.cpp server: num_parallel slots, each with a fixed KV region of num_ctx tokens.

    Defaults are Ollama's: OLLAMA_NUM_PARALLEL=1 (strictly one request at a time; with N > 1
    the busy slots are batched together every step, llama.cpp's continuous batching over
    slots), OLLAMA_MAX_QUEUE=512 (then HTTP 503), num_ctx 4096 per slot (Ollama allocates
    num_ctx x num_parallel at load; capped by the model's context when not given), prompt
    processing in chunks of n_batch=2048 / n_ubatch=512 tokens, Q4_K_M weights.
    Maps onto reference.schedulers.sequential.SequentialScheduler (n_ubatch is a cost detail).
    """

    SCHEDULERS: ClassVar[tuple[str, ...]] = ("sequential",)
    scheduler: str = "sequential"
    num_parallel: int = 1
    num_ctx: int | None = None  # tokens per slot; None = min(4096, model context), resolved by Experiment
    n_batch: int = 2048
    n_ubatch: int = 512
    max_queue: int = 512
    weights: str = "gguf-q4_k_m"

    def __post_init__(self):
        super().__post_init__()
        check_int(self.num_parallel, "num_parallel", min_value=1)
        if self.num_ctx is not None:
            check_int(self.num_ctx, "num_ctx", min_value=1)
        check_int(self.n_batch, "n_batch", min_value=1)
        check_int(self.n_ubatch, "n_ubatch", min_value=1, max_value=self.n_batch)

    @property
    def context_len(self) -> int:
        return self.num_ctx

    def resolve(self, model):
        if self.num_ctx is None:
            return replace(self, num_ctx=min(4096, model.max_position))
        if self.num_ctx > model.max_position:
            raise ConfigError("num_ctx", f"{self.num_ctx} exceeds {model.name}'s context of {model.max_position}",
                              f"integers 1..{model.max_position}")
        return self


def _resolve_max_model_len(engine, model):
    """engine with max_model_len defaulted to the model's context, or ConfigError if it exceeds it."""
    if engine.max_model_len is None:
        return replace(engine, max_model_len=model.max_position)
    if engine.max_model_len > model.max_position:
        raise ConfigError("max_model_len", f"{engine.max_model_len} exceeds {model.name}'s context of "
                          f"{model.max_position}", f"integers 1..{model.max_position}")
    return engine


@dataclass(frozen=True, kw_only=True)
class StaticEngine(EngineConfig):
    """Static batching (FasterTransformer-style): a batch of up to max_batch_size runs until its longest ends.

    Each request reserves KV for max_model_len tokens (reserve_max_len = true, as
    FasterTransformer allocates) or for its own prompt + max_tokens (false). kv_capacity_tokens
    > 0 sets the KV token slots explicitly; 0 = max_batch_size x max_model_len in the reference
    engine, sized from gpu_memory_utilization in the simulator. Maps onto
    reference.schedulers.static.StaticScheduler.
    """

    SCHEDULERS: ClassVar[tuple[str, ...]] = ("static",)
    scheduler: str = "static"
    max_batch_size: int = 8
    max_model_len: int | None = None  # None = the model's context length
    reserve_max_len: bool = True
    kv_capacity_tokens: int = 0
    gpu_memory_utilization: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        check_int(self.max_batch_size, "max_batch_size", min_value=1)
        _check_bool(self.reserve_max_len, "reserve_max_len")
        check_int(self.kv_capacity_tokens, "kv_capacity_tokens", min_value=0)
        if self.max_model_len is not None:
            check_int(self.max_model_len, "max_model_len", min_value=1)
            if 0 < self.kv_capacity_tokens < self.max_model_len:
                raise ConfigError("kv_capacity_tokens", f"{self.kv_capacity_tokens} cannot hold one request of "
                                  f"max_model_len={self.max_model_len}",
                                  f"0 (size from memory) or integers >= {self.max_model_len}")
        object.__setattr__(self, "gpu_memory_utilization",
                           check_real(self.gpu_memory_utilization, "gpu_memory_utilization", min_value=0.0,
                                      min_open=True, max_value=1.0))

    @property
    def context_len(self) -> int:
        return self.max_model_len

    def resolve(self, model):
        return _resolve_max_model_len(self, model)


@dataclass(frozen=True, kw_only=True)
class ContinuousEngine(EngineConfig):
    """vLLM (V1) continuous batching over a paged KV pool; scheduler = "orca" for the Orca baseline.

    continuous: vLLM's defaults for online serving: block_size 16, max_num_seqs 256,
    max_num_batched_tokens 2048 (vLLM's OPENAI_API_SERVER default on GPUs under 70 GiB and on
    A100; on H100/H200-class GPUs it defaults to 8192 tokens and 1024 seqs, so set those for
    H100 experiments), chunked prefill and prefix caching on, gpu_memory_utilization 0.9,
    max_model_len = the model's context, no queue limit.
    orca: iteration-level batching (Yu et al., OSDI 2022) as the PagedAttention paper ran it:
    each admitted request reserves KV up front, reservation = "max_model_len" (Orca (Max), the
    default) or "request" (prompt + max_tokens: Orca (Oracle), since outputs run to max_tokens);
    chunked prefill and prefix caching default off, and then max_num_batched_tokens defaults to
    max(2048, max_model_len) (vLLM's rule without chunked prefill).
    num_blocks > 0 sets the KV pool size explicitly (reference engine); 0 sizes it from memory.
    Field names and values are those of reference.schedulers.continuous.ContinuousScheduler.
    """

    SCHEDULERS: ClassVar[tuple[str, ...]] = ("continuous", "orca")
    RESERVATIONS: ClassVar[dict[str, tuple[str, ...]]] = {"continuous": ("none",),
                                                          "orca": ("max_model_len", "request")}
    scheduler: str = "continuous"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None = 2048 with chunked prefill, else max(2048, max_model_len)
    enable_chunked_prefill: bool | None = None  # None = on for continuous, off for orca
    enable_prefix_caching: bool | None = None  # None = on for continuous, off for orca
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None = the model's context length
    num_blocks: int = 0
    reservation: str | None = None  # None = "none" for continuous, "max_model_len" for orca

    def __post_init__(self):
        super().__post_init__()
        orca = self.scheduler == "orca"
        for name, default in (("enable_chunked_prefill", not orca), ("enable_prefix_caching", not orca),
                              ("reservation", "max_model_len" if orca else "none")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        _check_bool(self.enable_chunked_prefill, "enable_chunked_prefill")
        _check_bool(self.enable_prefix_caching, "enable_prefix_caching")
        _check_choice(self.reservation, "reservation", self.RESERVATIONS[self.scheduler])
        check_int(self.block_size, "block_size", min_value=1, max_value=256)
        if self.block_size & (self.block_size - 1):
            raise ConfigError("block_size", f"must be a power of two, got {self.block_size}",
                              "1, 2, 4, 8, 16, 32, 64, 128, 256")
        check_int(self.max_num_seqs, "max_num_seqs", min_value=1)
        check_int(self.num_blocks, "num_blocks", min_value=0)
        object.__setattr__(self, "gpu_memory_utilization",
                           check_real(self.gpu_memory_utilization, "gpu_memory_utilization", min_value=0.0,
                                      min_open=True, max_value=1.0))
        if self.max_model_len is not None:
            check_int(self.max_model_len, "max_model_len", min_value=1)
            if self.block_size > self.max_model_len:
                raise ConfigError("block_size", f"{self.block_size} is larger than max_model_len="
                                  f"{self.max_model_len}", f"powers of two <= {self.max_model_len}")
            if self.max_num_batched_tokens is None:
                default = 2048 if self.enable_chunked_prefill else max(2048, self.max_model_len)
                object.__setattr__(self, "max_num_batched_tokens", default)
        if self.max_num_batched_tokens is not None:
            check_int(self.max_num_batched_tokens, "max_num_batched_tokens", min_value=1)
            if self.max_num_batched_tokens < self.max_num_seqs:
                raise ConfigError("max_num_batched_tokens", f"{self.max_num_batched_tokens} is smaller than "
                                  f"max_num_seqs={self.max_num_seqs} (vLLM refuses this too)",
                                  f"integers >= {self.max_num_seqs}")
            if self.max_model_len is not None and not self.enable_chunked_prefill \
                    and self.max_num_batched_tokens < self.max_model_len:
                raise ConfigError("max_num_batched_tokens",
                                  f"{self.max_num_batched_tokens} is smaller than max_model_len={self.max_model_len}"
                                  " with chunked prefill off, so long prompts could never be scheduled",
                                  f"integers >= {self.max_model_len}, or enable_chunked_prefill = true")
        if self.num_blocks and self.max_model_len is not None \
                and self.num_blocks * self.block_size < self.max_model_len:
            raise ConfigError("num_blocks", f"{self.num_blocks} blocks of {self.block_size} tokens cannot hold one "
                              f"request of max_model_len={self.max_model_len}",
                              f"0 (size from memory) or >= {-(-self.max_model_len // self.block_size)}")

    @property
    def context_len(self) -> int:
        return self.max_model_len

    def resolve(self, model):
        return _resolve_max_model_len(self, model)


ENGINE_CLASSES: dict[str, type[EngineConfig]] = {
    "sequential": SequentialEngine, "static": StaticEngine, "continuous": ContinuousEngine, "orca": ContinuousEngine,
}


# ---------------------------------------------------------------------------------------
# Workload, hardware

_WORKLOAD_KEYS: dict[str, tuple[str, ...]] = {
    "closed_loop": ("clients", "requests_per_client", "num_requests", "think_time_s", "think_time_dist"),
    "poisson": ("rates", "num_requests", "duration_s", "max_concurrency"),
    "gamma": ("rates", "burstiness", "num_requests", "duration_s", "max_concurrency"),
    "trace": ("path", "speedup", "num_requests", "duration_s", "max_concurrency"),
}
_WORKLOAD_COMMON = ("kind", "timeout_s", "shared_prefix")
_LENGTH_KEYS = ("prompt_tokens", "output_tokens")


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """What the clients send. Which fields apply depends on kind (see the module docstring).

    Cells: closed_loop -> one per entry of clients; poisson/gamma -> one per rate (req/s,
    inf = all at once); trace -> a single cell.
    """

    kind: str
    prompt_tokens: LengthDist | None = None  # not for trace (lengths come from the file)
    output_tokens: LengthDist | None = None
    clients: tuple[int, ...] = ()
    requests_per_client: int | None = None
    num_requests: int | None = None
    think_time_s: float = 0.0
    think_time_dist: str = "fixed"
    rates: tuple[float, ...] = ()
    burstiness: float = 1.0
    duration_s: float | None = None
    max_concurrency: int = 0
    path: str | None = None
    speedup: float = 1.0
    timeout_s: float = 0.0
    shared_prefix: SharedPrefix | None = None

    def __post_init__(self):
        k = _check_choice(self.kind, "kind", WORKLOAD_KINDS)
        set_ = object.__setattr__
        set_(self, "timeout_s", check_real(self.timeout_s, "timeout_s", min_value=0.0))
        if self.shared_prefix is not None and not isinstance(self.shared_prefix, SharedPrefix):
            raise ConfigError("shared_prefix", "must be a table", "fraction, tokens, num_prefixes")
        if self.num_requests is not None:
            check_int(self.num_requests, "num_requests", min_value=1)
        if k == "trace":
            if self.path is None:
                raise ConfigError("path", "required for kind = 'trace'", "a CSV file with columns "
                                  "arrival_s, prompt_tokens, output_tokens")
            _check_str(self.path, "path")
            set_(self, "speedup", check_real(self.speedup, "speedup", min_value=0.0, min_open=True))
            for name in _LENGTH_KEYS:
                if getattr(self, name) is not None:
                    raise ConfigError(name, "not used with kind = 'trace' (lengths come from the trace)",
                                      ", ".join(_WORKLOAD_COMMON + _WORKLOAD_KEYS[k]))
        else:
            for name in _LENGTH_KEYS:
                if not isinstance(getattr(self, name), LengthDist):
                    raise ConfigError(name, "required: a table with dist = fixed | uniform | lognormal | empirical",
                                      "[workload.prompt_tokens] and [workload.output_tokens] tables")
        if k == "closed_loop":
            set_(self, "clients", _int_list(self.clients, "clients", min_value=1))
            if (self.requests_per_client is None) == (self.num_requests is None):
                raise ConfigError("requests_per_client", "give exactly one of requests_per_client and num_requests",
                                  "requests_per_client = <per client> or num_requests = <total per cell>")
            if self.requests_per_client is not None:
                check_int(self.requests_per_client, "requests_per_client", min_value=1)
            elif self.num_requests < max(self.clients):
                raise ConfigError("num_requests", f"{self.num_requests} is fewer than clients = {max(self.clients)}, "
                                  "so some clients would send nothing", f"integers >= {max(self.clients)}")
            ThinkTime(self.think_time_s, self.think_time_dist)  # validates both
            set_(self, "think_time_s", float(self.think_time_s))
        if k in ("poisson", "gamma"):
            set_(self, "rates", _rate_list(self.rates, "rates"))
            set_(self, "burstiness", check_real(self.burstiness, "burstiness", min_value=0.0, min_open=True))
            if k == "poisson" and self.burstiness != 1.0:
                raise ConfigError("burstiness", "is 1 for poisson", "kind = 'gamma' for other values")
            if self.num_requests is None and self.duration_s is None:
                raise ConfigError("num_requests", f"kind = {k!r} needs num_requests or duration_s (or both)",
                                  "num_requests = <requests per cell>, duration_s = <seconds>")
            if self.num_requests is None and any(math.isinf(r) for r in self.rates):
                raise ConfigError("num_requests", "rate = inf sends everything at once, so it needs num_requests",
                                  "integers >= 1")
        if k in ("poisson", "gamma", "trace"):
            if self.duration_s is not None:
                set_(self, "duration_s", check_real(self.duration_s, "duration_s", min_value=0.0, min_open=True))
            check_int(self.max_concurrency, "max_concurrency", min_value=0)

    @property
    def think_time(self) -> ThinkTime:
        """The closed-loop think-time sampler."""
        return ThinkTime(self.think_time_s, self.think_time_dist)

    @property
    def is_closed_loop(self) -> bool:
        return self.kind == "closed_loop"

    @property
    def loads(self) -> tuple:
        """One entry per cell: client counts, rates, or (None,) for a trace."""
        if self.kind == "closed_loop":
            return self.clients
        if self.kind == "trace":
            return (None,)
        return self.rates

    def to_dict(self) -> dict:
        """The TOML table: only the keys that apply to kind, None omitted."""
        d: dict = {"kind": self.kind}
        for name in _WORKLOAD_KEYS[self.kind] + ("timeout_s",):
            v = getattr(self, name)
            if v is not None:
                d[name] = list(v) if isinstance(v, tuple) else v
        for name in _LENGTH_KEYS:
            v = getattr(self, name)
            if v is not None:
                d[name] = v.to_dict()
        if self.shared_prefix is not None:
            d["shared_prefix"] = dataclasses.asdict(self.shared_prefix)
        return d


@dataclass(frozen=True, kw_only=True)
class HardwareConfig:
    """Simulator only: a sim.hardware preset per replica, how many replicas, the router, tensor parallelism."""

    preset: str | None = None
    replicas: int = 1
    router: str = "round_robin"
    tp: int = 1

    def __post_init__(self):
        if self.preset is not None:
            _check_str(self.preset, "preset")
        check_int(self.replicas, "replicas", min_value=1)
        _check_choice(self.router, "router", ROUTERS)
        check_int(self.tp, "tp", min_value=1)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _check_hardware_preset(name: str) -> None:
    """hardware.preset must name a sim.hardware preset."""
    from sim.hardware import get_hardware

    with _prefixed("hardware.preset"):
        try:
            get_hardware(name)
        except ConfigError as e:
            raise ConfigError("", _split_error(e), e.allowed) from None


# ---------------------------------------------------------------------------------------
# Experiment

@dataclass(frozen=True)
class Cell:
    """One measured point: an engine at one concurrency (closed loop) or request rate (open loop)."""

    engine: str
    concurrency: int | None = None
    request_rate: float | None = None  # req/s; inf = all at once; both None for a trace

    @property
    def load(self) -> int | float | None:
        """The swept value: concurrency or rate (None for a trace)."""
        return self.concurrency if self.concurrency is not None else self.request_rate

    @property
    def label(self) -> str:
        """'vllm@c=16', 'vllm@rate=4', 'vllm@trace'."""
        return cell_label(self.engine, self.concurrency, self.request_rate)

    def as_dict(self) -> dict:
        """engine, concurrency, request_rate (the cell columns of requests.csv and summary.json)."""
        return {"engine": self.engine, "concurrency": self.concurrency, "request_rate": self.request_rate}


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """A validated experiment. Engines keep their TOML order; model-dependent defaults are resolved."""

    name: str
    model: str
    workload: WorkloadConfig
    engines: tuple[EngineConfig, ...]
    description: str = ""
    seed: int = 0
    dtype: str = "float32"
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    cost_model: dict = field(default_factory=dict)  # checked by sim.costmodel
    slo: SLO = field(default_factory=SLO)
    published: dict = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the TOML file, when loaded from one

    def __post_init__(self):
        _check_str(self.name, "name")
        if not self.name.strip():
            raise ConfigError("name", "must not be empty", "a non-empty string")
        _check_str(self.description, "description")
        check_int(self.seed, "seed", min_value=0)
        model = get_preset(self.model)
        _check_choice(self.dtype, "dtype", DTYPES)
        if not isinstance(self.workload, WorkloadConfig):
            raise ConfigError("workload", "required: a [workload] table", "a [workload] table")
        engines = tuple(self.engines.values()) if isinstance(self.engines, dict) else tuple(self.engines)
        if not engines:
            raise ConfigError("engines", "at least one engine is required", "[engines.<name>] tables")
        seen = set()
        resolved = []
        for e in engines:
            if e.name in seen:
                raise ConfigError(f"engines.{e.name}", "duplicate engine name", "distinct names")
            seen.add(e.name)
            with _prefixed(f"engines.{e.name}"):
                resolved.append(e.resolve(model))
        object.__setattr__(self, "engines", tuple(resolved))
        if not isinstance(self.cost_model, dict):
            raise ConfigError("cost_model", "must be a table", "a [cost_model] table")
        if "kind" in self.cost_model:
            _check_choice(self.cost_model["kind"], "cost_model.kind", COST_MODEL_KINDS)
        if not isinstance(self.published, dict):
            raise ConfigError("published", "must be a table", "a [published] table")
        if model.num_heads % self.hardware.tp:
            divisors = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
            raise ConfigError("hardware.tp", f"{self.hardware.tp} does not divide {model.name}'s "
                              f"num_heads={model.num_heads}", ", ".join(map(str, divisors)))
        if self.hardware.preset is not None:
            _check_hardware_preset(self.hardware.preset)
        self._check_fit(model)

    def _check_fit(self, model: ModelConfig) -> None:
        """Refuse a workload whose every request is longer than some engine's context."""
        w = self.workload
        if w.kind == "trace":
            _, prompt, output = read_trace(w.path)
            total = prompt + output
            shortest = int(total.min())
            if w.shared_prefix is not None and w.shared_prefix.fraction == 1.0:
                shortest += w.shared_prefix.tokens
            where = "workload.path"
        else:
            shortest = w.prompt_tokens.min_value + w.output_tokens.min_value
            if w.shared_prefix is not None and w.shared_prefix.fraction == 1.0:
                shortest += w.shared_prefix.tokens
            where = "workload.prompt_tokens"
        for e in self.engines:
            if shortest > e.context_len:
                key = "num_ctx" if isinstance(e, SequentialEngine) else "max_model_len"
                raise ConfigError(where, f"every request needs at least {shortest} tokens (prompt + output), more "
                                  f"than engines.{e.name}.{key} = {e.context_len}, so all would be refused",
                                  f"requests of at most {e.context_len} tokens, or a larger {key}")

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the file (trace, cost-model profile) are resolved against."""
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    @property
    def model_config(self) -> ModelConfig:
        """The model preset's shapes."""
        return get_preset(self.model)

    def engine(self, name: str) -> EngineConfig:
        """The engine called name."""
        for e in self.engines:
            if e.name == name:
                return e
        raise ConfigError("engines", f"no engine {name!r}", ", ".join(e.name for e in self.engines))

    @property
    def engine_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.engines)

    def cells(self) -> list[Cell]:
        """Every (engine, load) cell, engine-major, in TOML order."""
        w = self.workload
        out = []
        for e in self.engines:
            for load in w.loads:
                if w.kind == "closed_loop":
                    out.append(Cell(e.name, concurrency=load))
                elif w.kind == "trace":
                    out.append(Cell(e.name))
                else:
                    out.append(Cell(e.name, request_rate=load))
        return out

    def to_dict(self) -> dict:
        """The TOML document (resolved defaults included); load_experiment(to_toml()) gives an equal Experiment."""
        d: dict = {"name": self.name, "description": self.description, "seed": self.seed, "model": self.model,
                   "dtype": self.dtype, "workload": self.workload.to_dict(),
                   "engines": {e.name: e.to_dict() for e in self.engines},
                   "hardware": self.hardware.to_dict()}
        if self.cost_model:
            d["cost_model"] = self.cost_model
        if not self.slo.is_empty:
            d["slo"] = self.slo.to_dict()
        if self.published:
            d["published"] = self.published
        return d

    def to_toml(self) -> str:
        """to_dict() as TOML text."""
        return dumps_toml(self.to_dict())


_TOP_KEYS = ("name", "description", "seed", "model", "dtype", "workload", "engines", "hardware", "cost_model", "slo",
             "published")


def parse_experiment(data: dict, *, base_dir: str | Path | None = None, source: str | None = None,
                     default_name: str = "experiment") -> Experiment:
    """An Experiment from an already-parsed TOML document (relative trace paths resolve against base_dir)."""
    _check_keys(data, "", _TOP_KEYS)
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    # workload
    if "workload" not in data:
        raise ConfigError("workload", "required", "a [workload] table")
    wt = dict(_check_keys(data["workload"], "workload", _WORKLOAD_COMMON + _LENGTH_KEYS + tuple(
        sorted({k for ks in _WORKLOAD_KEYS.values() for k in ks}))))
    with _prefixed("workload"):
        kind = _check_choice(wt.get("kind"), "kind", WORKLOAD_KINDS)
    allowed = _WORKLOAD_COMMON + _WORKLOAD_KEYS[kind] + (() if kind == "trace" else _LENGTH_KEYS)
    for k in wt:
        if k not in allowed:
            raise ConfigError(f"workload.{k}", f"not used with kind = {kind!r}", ", ".join(allowed))
    for name in _LENGTH_KEYS:
        if name in wt:
            with _prefixed(f"workload.{name}"):
                wt[name] = length_dist_from_dict(wt[name])
    if "shared_prefix" in wt:
        sp = _check_keys(wt["shared_prefix"], "workload.shared_prefix", ("fraction", "tokens", "num_prefixes"))
        with _prefixed("workload.shared_prefix"):
            for req in ("fraction", "tokens"):
                if req not in sp:
                    raise ConfigError(req, "required", "fraction (0..1), tokens (>= 1)")
            wt["shared_prefix"] = SharedPrefix(**sp)
    if kind == "trace" and isinstance(wt.get("path"), str):
        p = Path(wt["path"])
        wt["path"] = str(p if p.is_absolute() else (base / p).resolve())
    with _prefixed("workload"):
        workload = WorkloadConfig(**wt)

    # engines
    et = data.get("engines")
    if et is None:
        raise ConfigError("engines", "at least one engine is required", "[engines.<name>] tables")
    if not isinstance(et, dict):
        raise ConfigError("engines", "must be a table of engine tables", "[engines.<name>] tables")
    engines = []
    for name, table in et.items():
        path = f"engines.{name}"
        if not isinstance(table, dict):
            raise ConfigError(path, f"must be a table, got {table!r}", f"[{path}] with scheduler = ...")
        with _prefixed(path):
            sched = _check_choice(table.get("scheduler"), "scheduler", SCHEDULERS)
        cls = ENGINE_CLASSES[sched]
        _check_keys(table, path, [f.name for f in fields(cls) if f.name != "name"])
        with _prefixed(path):
            engines.append(cls(name=name, **table))

    hardware = HardwareConfig()
    if "hardware" in data:
        ht = _check_keys(data["hardware"], "hardware", [f.name for f in fields(HardwareConfig)])
        with _prefixed("hardware"):
            hardware = HardwareConfig(**ht)
    slo = SLO()
    if "slo" in data:
        st = _check_keys(data["slo"], "slo", ("ttft_ms", "tpot_ms", "e2el_ms"))
        with _prefixed("slo"):
            slo = SLO(**st)
    for key in ("cost_model", "published"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(key, "must be a table", f"a [{key}] table")

    if "model" not in data:
        raise ConfigError("model", "required", "a preset name from reference.config.PRESETS")
    return Experiment(name=data.get("name", default_name), description=data.get("description", ""),
                      seed=data.get("seed", 0), model=data["model"],
                      dtype=data.get("dtype", "float32"), workload=workload, engines=tuple(engines),
                      hardware=hardware, cost_model=dict(data.get("cost_model", {})), slo=slo,
                      published=dict(data.get("published", {})), source=source)


def load_experiment(source: str | Path) -> Experiment:
    """Parse and validate an experiment from a TOML file path or a TOML string.

    A str containing a newline or '=' is TOML text; any other str or a Path is a file path.
    """
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and "=" not in source):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError("experiment", f"cannot read {str(path)!r}: {e.strerror or e}") from None
        where, base, src, default_name = str(path), path.parent, str(path), path.stem
    elif isinstance(source, str):
        text, where, base, src, default_name = source, "<string>", None, None, "experiment"
    else:
        raise TypeError(f"load_experiment takes a path or TOML text, not {type(source).__name__}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("experiment", f"{where} is not valid TOML: {e}") from None
    return parse_experiment(data, base_dir=base, source=src, default_name=default_name)


# ---------------------------------------------------------------------------------------
# A minimal TOML writer (tomllib only reads): enough for experiment documents

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps_toml(doc: dict) -> str:
    """TOML text for a dict of scalars, lists and nested dicts (None values are left out)."""
    lines: list[str] = []

    def table(d: dict, path: list[str]) -> None:
        scalars = [(k, v) for k, v in d.items() if v is not None and not isinstance(v, dict)]
        subs = [(k, v) for k, v in d.items() if isinstance(v, dict)]
        if path and (scalars or not subs):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subs:
            table(v, path + [k])

    table(doc, [])
    return "\n".join(lines) + "\n"
