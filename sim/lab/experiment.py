"""Experiment configs: one TOML file drives the reference engine (`servesim bench`) and the simulator (`servesim run`).

The file is declared as pydantic models (sim.lab.schema): unknown keys, wrong types and
impossible values raise ConfigError naming the full key path (e.g. `engines.vllm.max_num_seqs`)
and what is allowed, before anything runs. `servesim schema` prints the JSON Schema, so editors
complete and check experiment files. Example (abridged; most keys have defaults):

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
    [cost_model]                     # simulator only: roofline (default) | calibrated
    kind = "roofline"
    [slo]                            # optional goodput objectives (ms)
    ttft_ms = 500.0
    [published]                      # optional, free-form: the figures this config targets
    [sweep]                          # optional: one run per point of a grid over any config keys
    grid = {"engines.vllm.max_num_seqs" = [64, 256], "hardware.preset" = ["h100-sxm", "a100-sxm-80gb"]}

Engine defaults are the real engines' defaults (see the engine classes). Model-dependent
defaults (vLLM's max_model_len = the model's context length, Ollama's num_ctx capped by it)
are resolved against the model when the Experiment is built, so consumers always see ints.
Each engine kind owns its behaviour: its memory plan, its KV layout, its scheduler.
"""
from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, PrivateAttr, Tag, TypeAdapter, model_validator

from reference.config import PRESETS, ModelConfig, get_preset
from reference.errors import ConfigError, DoesNotFit
from reference.layout import Layout, PagedLayout, SlotLayout
from reference.schedulers import (ContinuousScheduler, OrcaScheduler, Scheduler, SequentialScheduler,
                                  StaticScheduler)
from reference.schedulers.llamacpp import LlamaServerScheduler
from reference.schedulers.vllm_v1 import VllmV1Scheduler
from sim.core.calibrated import CalibratedCostModel
from sim.core.costmodel import CostModel, StepPhysics
from sim.core.formats import KV_DTYPES, WEIGHT_FORMATS
from sim.core.formats import weight_bytes as format_weight_bytes
from sim.core.hardware import HARDWARE, Hardware, get_hardware
from sim.core.memory import (REFERENCE_KV_BUDGET, MemoryPlan, device_budget, largest_paged_context, least_utilization,
                             reference_budget)
from sim.core.roofline import RooflineCostModel
from sim.core.runtime_costmodel import RuntimeCostModel
from sim.core.runtimes import FIT_PATH, RUNTIMES, load_fit
from sim.lab.metrics import SLO, cell_label
from sim.lab.schema import Bool, ConfigModel, Int, Number, Str, validate
from sim.lab.workload import Workload

DTYPES = ("float32", "bfloat16", "float16")
PositiveInt = Annotated[Int, Field(ge=1)]
Fraction = Annotated[Number, Field(gt=0, le=1)]
WeightFormat = Literal[tuple(WEIGHT_FORMATS)]
Runtime = Literal[RUNTIMES]
KVDtype = Literal[tuple(KV_DTYPES)]
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _power_of_two_block(block_size: int, max_model_len: int | None) -> None:
    if block_size & (block_size - 1):
        raise ConfigError("block_size", f"must be a power of two, got {block_size}", "1, 2, 4, 8, 16, 32, 64, 128, 256")
    if max_model_len is not None and block_size > max_model_len:
        raise ConfigError("block_size", f"{block_size} is larger than max_model_len={max_model_len}",
                          f"powers of two <= {max_model_len}")


def _within_model(engine, key: str, model: ModelConfig, default: int) -> dict:
    """{key: value} with the engine's context defaulted to `default`, or ConfigError if past the model's context."""
    value = getattr(engine, key)
    if value is None:
        return {key: default}
    if value > model.max_position:
        raise ConfigError(key, f"{value} exceeds {model.name}'s context of {model.max_position}",
                          f"integers 1..{model.max_position}")
    return {}


# ---------------------------------------------------------------------------------------
# Engines: each kind owns its memory plan, its KV layout and its scheduler


class EngineConfig(ConfigModel):
    """Fields every engine variant has. Kinds: SequentialEngine, StaticEngine, ContinuousEngine, OrcaEngine."""

    name: Str = Field(exclude=True)  # the [engines.<name>] key
    scheduler: str
    weights: WeightFormat = "fp16"  # sim.core.formats name, sim only; the reference engine ignores it
    kv_dtype: KVDtype = "fp16"  # sim.core.formats name, sim only; the reference engine keeps K/V in its dtype
    max_queue: Annotated[Int, Field(ge=0)] = 0  # waiting requests beyond which new ones are refused (0 = unbounded)
    runtime: Runtime = "vllm"  # whose kernels execute a step on a GPU (cost_model.kind = "runtime")

    CONTEXT_KEY: ClassVar[str] = "max_model_len"
    ACTIVATION_KEY: ClassVar[str] = "max_num_batched_tokens"  # the key that sizes the largest step (activation peak)

    @model_validator(mode="after")
    def _named(self):
        if not _NAME_RE.match(self.name):
            raise ConfigError("name", f"engine name {self.name!r} must be letters, digits, '_' or '-'",
                              "[A-Za-z0-9_-]+")
        return self

    @property
    def context_len(self) -> int:
        """The most tokens (prompt + output) one request can hold."""
        return getattr(self, self.CONTEXT_KEY)

    @property
    def weight_bits(self) -> float:
        """Bits per weight of `weights` (sim.core.formats)."""
        return WEIGHT_FORMATS[self.weights].bits_per_weight

    @property
    def kv_bytes_per_element(self) -> float:
        """Bytes per K or V element of `kv_dtype` (sim.core.formats)."""
        return KV_DTYPES[self.kv_dtype].bytes_per_element

    @property
    def max_batch(self) -> int:
        """The most requests computed together in one step."""
        raise NotImplementedError

    @property
    def ubatch(self) -> int:
        """Tokens one forward pass computes at most (llama.cpp splits a bigger step into micro-batches)."""
        raise NotImplementedError

    def resolve(self, model: ModelConfig) -> EngineConfig:
        """A copy with model-dependent defaults filled and checked against the model."""
        return self

    def _with(self, **changes) -> EngineConfig:
        """A re-validated copy with some fields changed (defaults that depend on them are re-derived)."""
        data = {**self.model_dump(exclude_unset=True), "name": self.name, **changes}
        return validate(type(self), data)

    def activation_step(self) -> tuple[int, int]:
        """(tokens, sequences) of the largest step, for the activation peak."""
        raise NotImplementedError

    def plan_memory(self, model: ModelConfig, hardware: Hardware | None = None, tp: int = 1,
                    dtype: str = "float32") -> MemoryPlan:
        """Size the KV cache for model on hardware (None: the reference engine on this machine, in dtype)."""
        raise NotImplementedError

    def layout(self, plan: MemoryPlan) -> Layout:
        """The KV layout the scheduler fills and the runner allocates."""
        raise NotImplementedError

    def build_scheduler(self, plan: MemoryPlan) -> Scheduler:
        """This engine's scheduler over the KV capacity of plan."""
        raise NotImplementedError

    def _budget(self, model: ModelConfig, hardware: Hardware, tp: int):
        tokens, seqs = self.activation_step()
        return device_budget(model, hardware, self.weights, self.kv_dtype, tp, tokens, seqs,
                             field_prefix=f"engines.{self.name}.")

    def _refuse_weights(self, model: ModelConfig, budget, hardware: Hardware, tp: int, kv_tokens: int) -> None:
        """ConfigError when weights and activations leave no room for kv_tokens of KV on the device.

        Names engines.<name>.weights with the formats and the tensor parallelism that would fit, or
        the key that sizes the largest step (ACTIVATION_KEY) when the weights alone would fit.
        """
        room, kv = budget.capacity_bytes, kv_tokens * budget.kv_bytes_per_token
        if budget.weights_bytes + budget.activation_bytes + kv <= room:
            return
        if budget.weights_bytes + kv <= room:  # the largest step's activations are what does not fit
            tokens, seqs = self.activation_step()
            key = self.ACTIVATION_KEY
            raise DoesNotFit(f"engines.{self.name}.{key}",
                              f"the activations of the largest step ({tokens} tokens over {seqs} sequences: "
                              f"{budget.activation_bytes / 1e9:.1f} GB with the runtime's reserve) do not fit beside "
                              f"the weights ({budget.weights_bytes / 1e9:.1f} GB) in {budget.capacity_bytes / 1e9:.1f} "
                              f"GB of {hardware.name}", f"a smaller {key} = {getattr(self, key)}")
        formats = [f for f in WEIGHT_FORMATS
                   if format_weight_bytes(model, f) // tp + budget.activation_bytes + kv <= room]
        tps = [d for d in (2, 4, 8, 16) if d > tp and model.num_heads % d == 0
               and self._fits(self._budget(model, hardware, d), kv, room)]
        options = ([f"weights = {' | '.join(formats)}"] if formats else []) + \
                  ([f"[hardware] tp = {tps[0]}"] if tps else []) + ["a device with more memory"]
        raise DoesNotFit(f"engines.{self.name}.weights",
                          f"{model.name} in {self.weights} ({budget.weights_bytes / 1e9:.1f} GB per device) plus "
                          f"activations ({budget.activation_bytes / 1e9:.1f} GB) do not fit in "
                          f"{budget.capacity_bytes / 1e9:.1f} GB of {hardware.name}", ", or ".join(options))

    @staticmethod
    def _fits(budget, kv_bytes: int, room: int) -> bool:
        return budget.weights_bytes + budget.activation_bytes + kv_bytes <= room

    def _kv_budget_bytes(self, model: ModelConfig, budget, hardware: Hardware, tp: int, utilization: float,
                         request_tokens: int) -> int:
        """Bytes left for KV after weights and activations in utilization x memory; ConfigError when nothing is left.

        request_tokens: the longest request the engine must hold (for the suggestions in the error).
        vLLM refuses this at start-up: "No available memory for the cache blocks. Try increasing
        `gpu_memory_utilization`" (V0 raise_if_cache_size_invalid, V1 check_enough_kv_cache_memory).
        """
        self._refuse_weights(model, budget, hardware, tp, 1)
        left = int(budget.capacity_bytes * utilization) - budget.weights_bytes - budget.activation_bytes
        if left < self._min_kv_bytes(budget):
            raise self._no_kv_memory(model, budget, hardware, utilization, request_tokens)
        return left

    def _min_kv_bytes(self, budget) -> int:
        """The least KV allocation that holds anything: one block (paged) or one token."""
        return budget.kv_bytes_per_token * getattr(self, "block_size", 1)

    def _no_kv_memory(self, model: ModelConfig, budget, hardware: Hardware, utilization: float,
                      request_tokens: int) -> ConfigError:
        """vLLM's "No available memory for the cache blocks", naming gpu_memory_utilization and what would fit."""
        least = least_utilization(budget, request_tokens)
        some = least_utilization(budget, self._min_kv_bytes(budget) // budget.kv_bytes_per_token)
        allowed = (f"gpu_memory_utilization >= {math.ceil(least * 1000) / 1000:g} for one request of "
                   f"{request_tokens} tokens" if least <= 1 else
                   f"gpu_memory_utilization >= {math.ceil(some * 1000) / 1000:g} and a shorter context")
        return ConfigError(f"engines.{self.name}.gpu_memory_utilization",
                           f"{utilization:g} x {budget.capacity_bytes / 1e9:.1f} GB of {hardware.name} leaves no "
                           f"memory for the KV cache after {model.name}'s weights ({budget.weights_bytes / 1e9:.1f} "
                           f"GB) and activations ({budget.activation_bytes / 1e9:.1f} GB); vLLM refuses to start "
                           "(\"No available memory for the cache blocks\")", allowed)

    def max_concurrent(self, mem: dict, tokens_per_request: int) -> int:
        """Requests of tokens_per_request whose KV fits at once in a memory plan (MemoryPlan.to_dict())."""
        raise NotImplementedError

    def describe(self) -> str:
        """How this engine is modelled, in a sentence (for the paper and reports)."""
        raise NotImplementedError

    def _formats(self) -> str:
        return f"{self.weights} weights, {self.kv_dtype} KV"

    def to_dict(self) -> dict:
        """The TOML table (without the name)."""
        return self.model_dump(exclude_none=True)


class SequentialEngine(EngineConfig):
    """Ollama / llama.cpp server: num_parallel slots, each with a fixed KV region of num_ctx tokens.

    Defaults are Ollama's: OLLAMA_NUM_PARALLEL=1 (strictly one request at a time; with N > 1
    the busy slots are batched together every step, llama.cpp's continuous batching over
    slots), OLLAMA_MAX_QUEUE=512 (then HTTP 503), num_ctx 4096 per slot (Ollama allocates
    num_ctx x num_parallel at load; capped by the model's context when not given), prompt
    processing in chunks of n_batch=2048 / n_ubatch=512 tokens, Q4_K_M weights.

    prompt_cache = true models llama-server itself (reference.schedulers.llamacpp: slot choice by
    prompt similarity, per-slot and RAM prompt caches of cache_ram_mib, batches in slot order);
    the default false keeps SequentialScheduler.
    """

    scheduler: Literal["sequential"] = "sequential"
    weights: WeightFormat = "gguf-q4_k_m"
    max_queue: Annotated[Int, Field(ge=0)] = 512
    runtime: Runtime = "llama.cpp"
    num_parallel: PositiveInt = 1
    num_ctx: PositiveInt | None = None  # tokens per slot; None = min(4096, model context), resolved by Experiment
    n_batch: PositiveInt = 2048
    n_ubatch: PositiveInt = 512
    prompt_cache: Bool = False
    cache_ram_mib: Annotated[Int, Field(ge=0)] = 8192  # llama-server --cache-ram (with prompt_cache; 0 = none)

    CONTEXT_KEY: ClassVar[str] = "num_ctx"
    ACTIVATION_KEY: ClassVar[str] = "n_ubatch"

    @model_validator(mode="after")
    def _ubatch(self):
        if self.n_ubatch > self.n_batch:
            raise ConfigError("n_ubatch", f"{self.n_ubatch} is larger than n_batch = {self.n_batch}",
                              f"integers 1..{self.n_batch}")
        return self

    @property
    def max_batch(self) -> int:
        return self.num_parallel

    @property
    def ubatch(self) -> int:
        return self.n_ubatch

    def resolve(self, model):
        changes = _within_model(self, "num_ctx", model, min(4096, model.max_position))
        return self._with(**changes) if changes else self

    def activation_step(self):
        return self.n_ubatch, self.num_parallel

    def plan_memory(self, model, hardware=None, tp=1, dtype="float32"):
        """num_parallel x num_ctx tokens of KV allocated at load beside the weights.

        llama.cpp allocates the whole KV buffer when the context is created and refuses to start
        when it does not fit ("llama_kv_cache_init: failed to allocate buffer for kv cache",
        llama_new_context_with_model); Ollama would then offload layers to the CPU, which is not
        modelled, so such a config is refused, naming the largest num_parallel and num_ctx that fit.
        """
        tokens = self.num_parallel * self.num_ctx
        if hardware is None:
            return reference_budget(model, dtype).plan(tokens, slot_tokens=self.num_ctx)
        budget = self._budget(model, hardware, tp)
        self._refuse_weights(model, budget, hardware, tp, 1)
        plan = budget.plan(tokens, slot_tokens=self.num_ctx)
        if plan.total_bytes > budget.capacity_bytes:
            free = budget.capacity_bytes - budget.weights_bytes - budget.activation_bytes
            slots = free // (budget.kv_bytes_per_token * self.num_ctx)
            ctx = free // (budget.kv_bytes_per_token * self.num_parallel)
            options = ([f"num_parallel <= {slots} at num_ctx = {self.num_ctx}"] if slots else []) + \
                      ([f"num_ctx <= {ctx} at num_parallel = {self.num_parallel}"] if ctx else []) + \
                      ([f"num_parallel = 1 and num_ctx <= {free // budget.kv_bytes_per_token}"] if not (slots or ctx)
                       else [])
            raise DoesNotFit(f"engines.{self.name}.{'num_parallel' if slots else 'num_ctx'}",
                              f"{self.num_parallel} slots x num_ctx {self.num_ctx} = {tokens} tokens of KV "
                              f"({tokens * budget.kv_bytes_per_token / 1e9:.1f} GB) do not fit beside the weights "
                              f"({budget.weights_bytes / 1e9:.1f} GB) and activations "
                              f"({budget.activation_bytes / 1e9:.1f} GB) in {budget.capacity_bytes / 1e9:.1f} GB of "
                              f"{hardware.name}: llama.cpp fails to allocate its KV buffer at load",
                              ", or ".join(options))
        return plan

    def layout(self, plan):
        return SlotLayout(self.num_parallel, self.num_ctx)

    def describe(self):
        caches = ", llama-server's slot choice and prompt caches" if self.prompt_cache else ""
        return (f"llama.cpp slots behind Ollama's queue, num_parallel = {self.num_parallel}, num_ctx = {self.num_ctx} "
                f"tokens per slot, queue of {self.max_queue}{caches}, {self._formats()}")

    def max_concurrent(self, mem, tokens_per_request):
        """How many slots of num_ctx fit beside the weights and activations (the num_parallel that would OOM)."""
        free = mem["capacity_bytes"] - mem["weights_bytes"] - mem["activation_bytes"]
        return int(free // (self.num_ctx * mem["kv_bytes_per_token"]))

    def build_scheduler(self, plan):
        if self.prompt_cache:
            ram_tokens = (self.cache_ram_mib << 20) // max(1, plan.kv_bytes_per_token)
            return LlamaServerScheduler(self.num_parallel, self.num_ctx, self.max_queue, self.n_batch,
                                        ram_cache_tokens=ram_tokens)
        return SequentialScheduler(self.num_parallel, self.num_ctx, self.max_queue, self.n_batch)


class StaticEngine(EngineConfig):
    """Static batching (FasterTransformer-style): a batch of up to max_batch_size runs until its longest ends.

    Each request reserves KV for max_model_len tokens (reserve_max_len = true, as
    FasterTransformer allocates) or for its own prompt + max_tokens (false). kv_capacity_tokens
    > 0 sets the KV token slots explicitly; 0 = max_batch_size x max_model_len in the reference
    engine, sized from gpu_memory_utilization in the simulator.
    """

    scheduler: Literal["static"] = "static"
    max_batch_size: PositiveInt = 8
    max_model_len: PositiveInt | None = None  # None = the model's context length
    reserve_max_len: Bool = True
    kv_capacity_tokens: Annotated[Int, Field(ge=0)] = 0
    gpu_memory_utilization: Fraction = 0.9

    ACTIVATION_KEY: ClassVar[str] = "max_batch_size"

    @model_validator(mode="after")
    def _capacity(self):
        if self.max_model_len is not None and 0 < self.kv_capacity_tokens < self.max_model_len:
            raise ConfigError("kv_capacity_tokens", f"{self.kv_capacity_tokens} cannot hold one request of "
                              f"max_model_len={self.max_model_len}",
                              f"0 (size from memory) or integers >= {self.max_model_len}")
        return self

    @property
    def max_batch(self) -> int:
        return self.max_batch_size

    @property
    def ubatch(self) -> int:
        return self.max_batch_size * self.max_model_len

    def resolve(self, model):
        changes = _within_model(self, "max_model_len", model, model.max_position)
        return self._with(**changes) if changes else self

    def activation_step(self):
        return self.max_batch_size * self.max_model_len, self.max_batch_size

    def plan_memory(self, model, hardware=None, tp=1, dtype="float32"):
        if hardware is None:
            budget = reference_budget(model, dtype)
            return budget.plan(self.kv_capacity_tokens or self.max_batch_size * self.max_model_len)
        budget = self._budget(model, hardware, tp)
        left = self._kv_budget_bytes(model, budget, hardware, tp, self.gpu_memory_utilization, self.max_model_len)
        most = left // budget.kv_bytes_per_token
        if self.kv_capacity_tokens > most:
            raise DoesNotFit(f"engines.{self.name}.kv_capacity_tokens",
                              f"{self.kv_capacity_tokens} tokens of KV do not fit in the {left / 1e9:.2f} GB that "
                              f"gpu_memory_utilization {self.gpu_memory_utilization:g} leaves on {hardware.name}",
                              f"kv_capacity_tokens <= {most}, or 0 (size from memory)")
        capacity = self.kv_capacity_tokens or most
        if capacity < self.max_model_len:  # one request of max_model_len must fit, as in vLLM
            need = least_utilization(budget, self.max_model_len)
            alt = f", or gpu_memory_utilization >= {math.ceil(need * 1000) / 1000:g}" if need <= 1 else ""
            raise DoesNotFit(f"engines.{self.name}.max_model_len",
                              f"one request of max_model_len = {self.max_model_len} tokens does not fit the "
                              f"{capacity}-token KV cache on {hardware.name}",
                              f"max_model_len <= {capacity}{alt}")
        return budget.plan(capacity)

    def layout(self, plan):
        return SlotLayout(self.max_batch_size, self.max_model_len)

    def describe(self):
        return (f"static batches of up to {self.max_batch_size}, each request reserving "
                f"{self.max_model_len if self.reserve_max_len else 'prompt + output'} tokens, {self._formats()}")

    def max_concurrent(self, mem, tokens_per_request):
        """The KV capacity over each request's reservation."""
        reserve = self.max_model_len if self.reserve_max_len else tokens_per_request
        return int(mem["kv_capacity_tokens"] // reserve)

    def build_scheduler(self, plan):
        return StaticScheduler(self.max_batch_size, self.max_model_len, plan.kv_capacity_tokens,
                               self.reserve_max_len, max_queue=self.max_queue)


class _PagedEngine(EngineConfig):
    """Iteration-level batching over a paged KV pool: the fields vLLM and Orca share."""

    block_size: Annotated[Int, Field(ge=1, le=256)] = 16
    max_num_seqs: PositiveInt = 256
    max_num_batched_tokens: PositiveInt | None = None  # None = 2048 with chunked prefill, else max(2048, max_model_len)
    enable_chunked_prefill: Bool | None = None
    gpu_memory_utilization: Fraction = 0.9
    max_model_len: PositiveInt | None = None  # None = the model's context length
    num_blocks: Annotated[Int, Field(ge=0)] = 0

    CHUNKED_PREFILL: ClassVar[bool] = True  # the default of enable_chunked_prefill

    @model_validator(mode="after")
    def _budget_rules(self):
        if self.enable_chunked_prefill is None:
            object.__setattr__(self, "enable_chunked_prefill", self.CHUNKED_PREFILL)
        _power_of_two_block(self.block_size, self.max_model_len)
        if self.max_model_len is not None and self.max_num_batched_tokens is None:
            default = 2048 if self.enable_chunked_prefill else max(2048, self.max_model_len)
            object.__setattr__(self, "max_num_batched_tokens", default)
        if self.max_num_batched_tokens is not None:
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
        return self

    @property
    def max_batch(self) -> int:
        return self.max_num_seqs

    @property
    def ubatch(self) -> int:
        return self.max_num_batched_tokens

    def resolve(self, model):
        changes = _within_model(self, "max_model_len", model, model.max_position)
        return self._with(**changes) if changes else self

    def activation_step(self):
        return self.max_num_batched_tokens, self.max_num_seqs

    def plan_memory(self, model, hardware=None, tp=1, dtype="float32"):
        """A pool of num_blocks blocks (block 0 is the null block): from memory, or num_blocks when set.

        Refused, as vLLM refuses at start-up, when the pool cannot hold one request of
        max_model_len: vLLM V0 `raise_if_cache_size_invalid` ("The model's max seq len (X) is
        larger than the maximum number of tokens that can be stored in KV cache (Y). Try increasing
        `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine"), V1
        `check_enough_kv_cache_memory` in vllm/v1/core/kv_cache_utils.py (vllm-project/vllm@001cabc:
        cdiv(max_model_len, block_size) pages must fit the available KV memory; its
        `estimate_max_model_len` names the largest length that would). The error names
        engines.<name>.max_model_len and that largest length (sim.core.memory.largest_paged_context).
        """
        bs, mml = self.block_size, self.max_model_len
        field = f"engines.{self.name}."
        need_blocks = -(-mml // bs)
        if hardware is None:
            budget = reference_budget(model, dtype)
            wanted = self.max_num_seqs * need_blocks
            num_blocks = self.num_blocks or min(wanted, REFERENCE_KV_BUDGET // (budget.kv_bytes_per_token * bs)) + 1
            fit = (num_blocks - 1) * bs
            if mml > fit:
                raise ConfigError(field + "max_model_len",
                                  f"The model's max seq len ({mml}) is larger than the maximum number of tokens that "
                                  f"can be stored in KV cache ({fit}: {num_blocks - 1} usable blocks of {bs}); vLLM "
                                  "refuses to start", f"max_model_len <= {fit}, or num_blocks >= {need_blocks + 1}")
            return budget.plan(fit, num_blocks=num_blocks, block_size=bs)
        budget = self._budget(model, hardware, tp)
        left = self._kv_budget_bytes(model, budget, hardware, tp, self.gpu_memory_utilization, mml)
        most = largest_paged_context(left, budget.kv_bytes_per_token, bs)
        if self.num_blocks and (self.num_blocks - 1) * bs > most:
            raise DoesNotFit(field + "num_blocks", f"{self.num_blocks} blocks ({self.num_blocks - 1} usable) of "
                              f"{bs} tokens do not fit in the {left / 1e9:.2f} GB that gpu_memory_utilization "
                              f"{self.gpu_memory_utilization:g} leaves for KV on {hardware.name}",
                              f"num_blocks <= {most // bs + 1}, or 0 (size from memory)")
        fit = (self.num_blocks - 1) * bs if self.num_blocks else most
        if mml > fit:
            need = least_utilization(budget, need_blocks * bs)
            alt = f", or gpu_memory_utilization >= {math.ceil(need * 1000) / 1000:g}" if need <= 1 else ""
            raise DoesNotFit(field + "max_model_len",
                              f"The model's max seq len ({mml}) is larger than the maximum number of tokens that can "
                              f"be stored in KV cache ({fit}): one request needs "
                              f"{need_blocks * bs * budget.kv_bytes_per_token / 1e9:.2f} GB of KV, the pool on "
                              f"{hardware.name} at gpu_memory_utilization {self.gpu_memory_utilization:g} has "
                              f"{fit * budget.kv_bytes_per_token / 1e9:.2f} GB; vLLM refuses to start",
                              f"max_model_len <= {fit}{alt}")
        return budget.plan(fit, num_blocks=fit // bs + 1, block_size=bs)

    def layout(self, plan):
        return PagedLayout(plan.num_blocks, self.block_size)

    def _reserved_tokens(self, tokens_per_request: int) -> int:
        return tokens_per_request

    def max_concurrent(self, mem, tokens_per_request):
        """The pool's blocks over the blocks each request holds."""
        bs = mem["block_size"]
        per = -(-self._reserved_tokens(tokens_per_request) // bs) * bs
        return int((mem["num_blocks"] - 1) * bs // per)


class ContinuousEngine(_PagedEngine):
    """vLLM (V1): continuous batching over a paged KV pool.

    vLLM's defaults for online serving: block_size 16, max_num_seqs 256, max_num_batched_tokens
    2048 (vLLM's OPENAI_API_SERVER default on GPUs under 70 GiB and on A100; on H100/H200-class
    GPUs it defaults to 8192 tokens and 1024 seqs, so set those for H100 experiments), chunked
    prefill and prefix caching on, gpu_memory_utilization 0.9, max_model_len = the model's
    context, no queue limit. num_blocks > 0 sets the KV pool size explicitly (reference
    engine); 0 sizes it from memory. reserve_full_prompt = true admits a request only when the
    free blocks hold its whole sequence (vLLM 0.32's scheduler_reserve_full_isl, its default:
    reference.schedulers.vllm_v1); the default false keeps ContinuousScheduler.
    """

    scheduler: Literal["continuous"] = "continuous"
    enable_prefix_caching: Bool = True
    reserve_full_prompt: Bool = False

    def describe(self):
        on = {True: "on", False: "off"}
        return (f"continuous batching over a paged pool (block {self.block_size}, max_num_seqs {self.max_num_seqs}, "
                f"{self.max_num_batched_tokens}-token step budget, chunked prefill {on[self.enable_chunked_prefill]}, "
                f"prefix caching {on[self.enable_prefix_caching]}, gpu_memory_utilization "
                f"{self.gpu_memory_utilization}{', whole-prompt admission' if self.reserve_full_prompt else ''}), "
                f"{self._formats()}")

    def build_scheduler(self, plan):
        cls = VllmV1Scheduler if self.reserve_full_prompt else ContinuousScheduler
        return cls(plan.num_blocks, self.block_size, self.max_num_seqs, self.max_num_batched_tokens,
                   self.max_model_len, self.enable_chunked_prefill, self.enable_prefix_caching, max_queue=self.max_queue)


class OrcaEngine(_PagedEngine):
    """Orca-style iteration batching with KV reserved at admission (reference.schedulers.orca).

    reservation = "max_model_len" (Orca (Max), the default) or "request" (prompt + max_tokens:
    Orca (Oracle), since outputs run to max_tokens). Chunked prefill defaults off, and then
    max_num_batched_tokens defaults to max(2048, max_model_len) (vLLM's rule without it).
    """

    scheduler: Literal["orca"] = "orca"
    reservation: Literal["max_model_len", "request"] = "max_model_len"

    CHUNKED_PREFILL: ClassVar[bool] = False

    def _reserved_tokens(self, tokens_per_request: int) -> int:
        return self.max_model_len if self.reservation == "max_model_len" else tokens_per_request

    def describe(self):
        what = {"max_model_len": f"reserves max_model_len = {self.max_model_len} tokens per request (Orca (Max))",
                "request": "reserves prompt + output tokens per request (Orca (Oracle))"}[self.reservation]
        return f"iteration-level batching that {what}, {self._formats()}"

    def build_scheduler(self, plan):
        return OrcaScheduler(plan.num_blocks, self.block_size, self.max_num_seqs, self.max_num_batched_tokens,
                             self.max_model_len, self.enable_chunked_prefill, self.reservation, max_queue=self.max_queue)


AnyEngine = Annotated[Union[SequentialEngine, StaticEngine, ContinuousEngine, OrcaEngine],
                      Field(discriminator="scheduler")]
SCHEDULERS = ("sequential", "static", "continuous", "orca")


# ---------------------------------------------------------------------------------------
# Hardware and cost model (simulator only)


class HardwareConfig(ConfigModel):
    """Simulator only: a sim.core.hardware preset per replica, how many replicas, the router, tensor parallelism."""

    preset: Literal[tuple(HARDWARE)] | None = None
    replicas: PositiveInt = 1
    router: Literal["round_robin", "least_outstanding"] = "round_robin"
    tp: PositiveInt = 1

    def to_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class RooflineConfig(ConfigModel):
    """cost_model.kind = "roofline": datasheet peaks (sim.core.roofline) at fixed efficiencies."""

    kind: Literal["roofline"] = "roofline"
    hardware: Literal[tuple(HARDWARE)] | None = None  # default: [hardware] preset
    weight_format: WeightFormat | None = None  # default: the engine's weights
    kv_dtype: KVDtype | None = None  # default: the engine's kv_dtype
    tp: PositiveInt | None = None  # default: [hardware] tp
    mem_efficiency: Fraction | None = None
    compute_efficiency: Fraction | None = None
    comm_efficiency: Fraction | None = None
    step_overhead_s: Annotated[Number, Field(ge=0)] | None = None
    allreduce_latency_s: Annotated[Number, Field(ge=0)] | None = None

    def build(self, model: ModelConfig, engine: EngineConfig, exp: Experiment, layout: Layout) -> CostModel:
        """The roofline for this engine on the experiment's device."""
        hw = self.hardware or exp.hardware.preset
        if hw is None:
            raise ConfigError("hardware.preset", "a roofline cost model needs a device",
                              "a name from `servesim hardware`, or cost_model.kind = 'calibrated'")
        knobs = {k: getattr(self, k) for k in ("mem_efficiency", "compute_efficiency", "comm_efficiency",
                                               "step_overhead_s", "allreduce_latency_s") if getattr(self, k) is not None}
        return RooflineCostModel(model, hw, self.weight_format or engine.weights, self.kv_dtype or engine.kv_dtype,
                                 self.tp or exp.hardware.tp, field_prefix="cost_model.", **knobs)


class CalibratedConfig(ConfigModel):
    """cost_model.kind = "calibrated": a law fitted to a `servesim profile` table (sim.core.calibrated)."""

    kind: Literal["calibrated"]
    profile: Str  # path to a profile CSV, relative to the experiment file
    weight_format: WeightFormat | None = None
    kv_dtype: KVDtype | None = None
    tp: PositiveInt | None = None
    hardware: Literal[tuple(HARDWARE)] | None = None
    allow_model_mismatch: Bool = False

    def build(self, model: ModelConfig, engine: EngineConfig, exp: Experiment, layout: Layout) -> CostModel:
        """The law fitted to the profile, priced on the padded shapes of this engine's layout."""
        from reference.buckets import Padding

        path = Path(self.profile)
        if not path.is_absolute():
            path = exp.base_dir / path
        wf, kvd, tp = self.weight_format or engine.weights, self.kv_dtype or engine.kv_dtype, self.tp or exp.hardware.tp
        StepPhysics(model, wf, kvd, tp, field_prefix="cost_model.")  # validate with prefixed field names
        return CalibratedCostModel.from_profile(path, model_cfg=model, padding=Padding.for_layout(layout, model.max_position),
                                                weight_format=wf, kv_dtype=kvd, tp=tp, hardware=self.hardware,
                                                field="cost_model.profile", check_model=not self.allow_model_mismatch)


class RuntimeConfig(ConfigModel):
    """cost_model.kind = "runtime": each engine's runtime (llama.cpp or vLLM) at its calibrated law on the device.

    The laws and their fitted parameters: sim.core.runtimes, `servesim measured`.
    """

    kind: Literal["runtime"]
    hardware: Literal[tuple(HARDWARE)] | None = None  # default: [hardware] preset
    weight_format: WeightFormat | None = None  # default: the engine's weights
    kv_dtype: KVDtype | None = None  # default: the engine's kv_dtype
    tp: PositiveInt | None = None  # default: [hardware] tp
    fit: Str | None = None  # the fitted parameters (default: experiments/measured/runtime_fit.json)

    def build(self, model: ModelConfig, engine: EngineConfig, exp: Experiment, layout: Layout) -> CostModel:
        """The engine's runtime law on the experiment's device."""
        hw = self.hardware or exp.hardware.preset
        if hw is None:
            raise ConfigError("hardware.preset", "a runtime cost model needs a device", "a name from `servesim hardware`")
        fit = load_fit(exp.base_dir / self.fit if self.fit else FIT_PATH)
        return RuntimeCostModel(model, hw, engine.runtime, self.weight_format or engine.weights,
                                self.kv_dtype or engine.kv_dtype, self.tp or exp.hardware.tp, engine.ubatch, fit,
                                field_prefix="cost_model.")


def _cost_model_kind(value) -> str:
    """The [cost_model] table's kind; roofline when the table does not say."""
    return value.get("kind", "roofline") if isinstance(value, dict) else getattr(value, "kind", None)


CostModelConfig = Annotated[Union[Annotated[RooflineConfig, Tag("roofline")], Annotated[CalibratedConfig, Tag("calibrated")],
                                  Annotated[RuntimeConfig, Tag("runtime")]], Discriminator(_cost_model_kind)]


# ---------------------------------------------------------------------------------------
# Sweep: a grid over config keys (expanded into one experiment per point by sim.lab.sweep)

_GRID_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def _grid_key_error(key: str, message: str, allowed: str) -> ConfigError:
    return ConfigError(f"grid[{json.dumps(key)}]", message, allowed)


class SweepConfig(ConfigModel):
    """[sweep]: `grid` maps dotted config keys to the values each takes; every combination is a point.

    A point is the experiment with those keys set (engine flags `engines.<name>.<key>`, `hardware.preset`,
    `hardware.tp`, `hardware.replicas`, `workload.clients`, `workload.prompt_tokens.value`, `seed`, ...),
    validated like any experiment file. Points run in grid order, the first key slowest.
    """

    grid: dict[Str, list[Any]]

    @model_validator(mode="after")
    def _keys(self):
        if not self.grid:
            raise ConfigError("grid", "must name at least one key", 'a table such as {"hardware.preset" = [...]}')
        for key, values in self.grid.items():
            if not _GRID_KEY_RE.match(key):
                raise _grid_key_error(key, "not a dotted key path", 'keys such as "engines.vllm.max_num_seqs"')
            if key.split(".")[0] in ("sweep", "name"):
                raise _grid_key_error(key, "cannot be swept", "keys of the experiment's other tables")
            if not values:
                raise _grid_key_error(key, "lists no values", "a non-empty list of values")
            seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
            if len(set(seen)) != len(seen):
                raise _grid_key_error(key, f"has duplicates: {values}", "distinct values (one point each)")
        return self

    @property
    def num_points(self) -> int:
        """How many points the grid has (the product of its value counts)."""
        return math.prod(len(v) for v in self.grid.values())

    def to_dict(self) -> dict:
        """The [sweep] table."""
        return {"grid": {k: list(v) for k, v in self.grid.items()}}


# ---------------------------------------------------------------------------------------
# Experiment


class Cell(ConfigModel):
    """One measured point: an engine at one concurrency (closed loop) or request rate (open loop)."""

    engine: Str
    concurrency: Int | None = None
    request_rate: Number | None = None  # req/s; inf = all at once; both None for a trace

    def __init__(self, engine: str, concurrency: int | None = None, request_rate: float | None = None, **kw):
        super().__init__(engine=engine, concurrency=concurrency, request_rate=request_rate, **kw)

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


def _engine_tables(value: Any) -> Any:
    """[engines.<name>] tables as engine objects, each validated under its own key (errors relative to engines)."""
    if not isinstance(value, dict):
        return value
    engines = []
    for name, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(name, f"must be a table, got {table!r}", f"[engines.{name}] with scheduler = ...")
        if "name" in table:
            raise ConfigError(f"{name}.name", "unknown key (the table's name is the engine's name)",
                              "the keys of its scheduler")
        engines.append(validate(AnyEngine, {**table, "name": name}, name))
    return tuple(engines)


class Experiment(ConfigModel):
    """A validated experiment. Engines keep their TOML order; model-dependent defaults are resolved."""

    name: Annotated[Str, Field(min_length=1)] = "experiment"
    description: Str = ""
    seed: Annotated[Int, Field(ge=0)] = 0
    model: Literal[tuple(PRESETS)]
    dtype: Literal[DTYPES] = "float32"
    workload: Workload
    engines: Annotated[tuple[AnyEngine, ...], BeforeValidator(_engine_tables)] = ()
    hardware: HardwareConfig = HardwareConfig()
    cost_model: CostModelConfig | None = None
    slo: SLO = SLO()
    published: dict = {}
    sweep: SweepConfig | None = None  # a grid of points (sim.lab.sweep); None: the experiment alone

    _source: str | None = PrivateAttr(default=None)  # the TOML file, when loaded from one
    _document: dict | None = PrivateAttr(default=None)  # the tables as written (defaults unresolved)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_document(cls, data, handler):
        """Keep the tables as given: a sweep point sets keys there, so defaults derived from them re-derive."""
        exp = handler(data)
        if isinstance(data, dict) and exp._document is None:
            exp._document = copy.deepcopy(data)
        return exp

    @model_validator(mode="after")
    def _resolve(self):
        if not self.name.strip():
            raise ConfigError("name", "must not be empty", "a non-empty string")
        if not self.engines:
            raise ConfigError("engines", "at least one engine is required", "[engines.<name>] tables")
        model = get_preset(self.model)
        seen, resolved = set(), []
        for e in self.engines:
            if e.name in seen:
                raise ConfigError(f"engines.{e.name}", "duplicate engine name", "distinct names")
            seen.add(e.name)
            try:
                resolved.append(e.resolve(model))
            except ConfigError as err:
                raise err.under(f"engines.{e.name}") from None
        object.__setattr__(self, "engines", tuple(resolved))
        if model.num_heads % self.hardware.tp:
            divisors = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
            raise ConfigError("hardware.tp", f"{self.hardware.tp} does not divide {model.name}'s "
                              f"num_heads={model.num_heads}", ", ".join(map(str, divisors)))
        self._check_fit(model)
        for e in self.engines:  # refuse now what the real engine refuses at start-up (its memory plan)
            self.plan(e)
        self._check_sweep_keys()
        return self

    def _check_sweep_keys(self) -> None:
        """Each grid key starts with a table of the file; engine keys name an engine of the file."""
        if self.sweep is None:
            return
        tables = [k for k in type(self).model_fields if k not in ("sweep", "name")]
        for key in self.sweep.grid:
            parts = key.split(".")
            if parts[0] not in tables:
                raise _grid_key_error(key, f"{parts[0]!r} is not a key of an experiment", ", ".join(tables)).under(
                    "sweep")
            if parts[0] == "engines" and (len(parts) < 3 or parts[1] not in self.engine_names):
                raise _grid_key_error(key, "must be engines.<name>.<key> with an engine of this file",
                                      ", ".join(f"engines.{n}.<key>" for n in self.engine_names)).under("sweep")

    @property
    def document(self) -> dict:
        """The experiment's tables as written (defaults not filled in); to_dict() when it was built otherwise."""
        return copy.deepcopy(self._document) if self._document is not None else self.to_dict()

    def _check_fit(self, model: ModelConfig) -> None:
        """Refuse a workload whose every request is longer than some engine's context."""
        w = self.workload
        shortest = w.min_request_tokens()
        where = f"workload.{'path' if w.LOAD_KEY is None else 'prompt_tokens'}"
        for e in self.engines:
            if shortest > e.context_len:
                key = e.CONTEXT_KEY
                raise ConfigError(where, f"every request needs at least {shortest} tokens (prompt + output), more "
                                  f"than engines.{e.name}.{key} = {e.context_len}, so all would be refused",
                                  f"requests of at most {e.context_len} tokens, or a larger {key}")

    def __eq__(self, other) -> bool:
        """Equal documents (where they were loaded from does not count)."""
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    __hash__ = None

    @property
    def source(self) -> str | None:
        """The TOML file the experiment was loaded from, if any."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the file (trace, cost-model profile) are resolved against."""
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def engine(self, name: str) -> EngineConfig:
        """The engine called name."""
        for e in self.engines:
            if e.name == name:
                return e
        raise ConfigError("engines", f"no engine {name!r}", ", ".join(e.name for e in self.engines))

    @property
    def engine_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.engines)

    @property
    def hardware_model(self) -> Hardware | None:
        """The device the experiment simulates ([hardware] preset, else the cost model's), or None."""
        name = self.hardware.preset or (self.cost_model.hardware if self.cost_model is not None else None)
        return get_hardware(name) if name else None

    def plan(self, engine: EngineConfig) -> MemoryPlan:
        """The engine's memory plan on the experiment's device (or the reference engine here)."""
        return engine.plan_memory(self.model_spec, self.hardware_model, self.hardware.tp, self.dtype)

    def cost_model_for(self, engine: EngineConfig, plan: MemoryPlan | None = None) -> CostModel:
        """The engine's cost model: [cost_model] (default roofline) with the engine's weights and layout."""
        plan = plan or self.plan(engine)
        return (self.cost_model or RooflineConfig()).build(self.model_spec, engine, self, engine.layout(plan))

    @property
    def model_spec(self) -> ModelConfig:
        """The model preset's shapes."""
        return get_preset(self.model)

    def cells(self) -> list[Cell]:
        """Every (engine, load) cell, engine-major, in TOML order."""
        w = self.workload
        return [Cell(e.name, **w.cell_fields(load)) for e in self.engines for load in w.loads]

    def to_dict(self) -> dict:
        """The TOML document (resolved defaults included); load_experiment(to_toml()) gives an equal Experiment."""
        d: dict = {"name": self.name, "description": self.description, "seed": self.seed, "model": self.model,
                   "dtype": self.dtype, "workload": self.workload.to_dict(),
                   "engines": {e.name: e.to_dict() for e in self.engines},
                   "hardware": self.hardware.to_dict()}
        if self.cost_model is not None:
            d["cost_model"] = self.cost_model.model_dump(exclude_unset=True)
        if not self.slo.is_empty:
            d["slo"] = self.slo.to_dict()
        if self.published:
            d["published"] = self.published
        if self.sweep is not None:
            d["sweep"] = self.sweep.to_dict()
        return d

    def to_toml(self) -> str:
        """to_dict() as TOML text."""
        return dumps_toml(self.to_dict())


def parse_experiment(data: dict, *, base_dir: str | Path | None = None, source: str | None = None,
                     default_name: str = "experiment") -> Experiment:
    """An Experiment from an already-parsed TOML document (relative trace paths resolve against base_dir)."""
    if not isinstance(data, dict):
        raise ConfigError("experiment", "must be a table")
    data = dict(data)
    data.setdefault("name", default_name)
    w = data.get("workload")
    if isinstance(w, dict) and w.get("kind") == "trace" and isinstance(w.get("path"), str):
        p = Path(w["path"])
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        data["workload"] = {**w, "path": str(p if p.is_absolute() else (base / p).resolve())}
    exp = validate(Experiment, data)
    exp._source = source
    return exp


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


def json_schema() -> dict:
    """The JSON Schema of an experiment file (as TOML editors read it: engines keyed by name)."""
    schema = TypeAdapter(Experiment).json_schema(mode="validation")
    engine_refs = schema["properties"]["engines"]["items"]
    schema["properties"]["engines"] = {"type": "object", "additionalProperties": engine_refs,
                                       "description": "One table per engine variant, any name: [engines.<name>]."}
    for name in ("SequentialEngine", "StaticEngine", "ContinuousEngine", "OrcaEngine"):
        defn = schema["$defs"][name]
        defn["properties"].pop("name", None)
        defn["required"] = [r for r in defn.get("required", []) if r != "name"]
    schema["title"] = "servesim experiment"
    return schema


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
