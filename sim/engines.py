"""From an engine table of an experiment to a scheduler: memory plan first, then the policy object.

Plain Python (no JAX): the reference engine (`servesim bench`) and the simulator (`servesim run`)
build their schedulers here, so both run the same policy with the same KV capacity.

Memory on an accelerator (hardware given):
    paged (vLLM):       KV pool = capacity x gpu_memory_utilization - weights - activation peak
    slots (llama.cpp):  KV = num_parallel x num_ctx tokens, allocated at load; must fit beside weights
    static:             KV for the batch from the same budget as paged (or kv_capacity_tokens)
Without hardware (the reference engine on this machine) the pool holds max_num_seqs full-length
sequences, capped at REFERENCE_KV_BUDGET bytes; an explicit num_blocks wins in both cases.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from reference.buckets import Padding
from reference.config import ModelConfig
from reference.errors import ConfigError
from reference.schedulers import ContinuousScheduler, Scheduler, SequentialScheduler, StaticScheduler
from sim.experiment import ContinuousEngine, EngineConfig, SequentialEngine, StaticEngine
from sim.formats import get_kv_dtype, get_weight_format, weight_bytes
from sim.hardware import Hardware

REFERENCE_KV_BUDGET = 1 << 30  # bytes of KV the reference engine allocates by default
RUNTIME_RESERVE = 1 << 30  # bytes: CUDA context, cuBLAS workspaces, graphs (vLLM's "non-torch" memory)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the reference engine keeps K/V in its compute dtype


@dataclass(frozen=True)
class MemoryPlan:
    """Where an engine's memory goes, per device (bytes), and how many tokens of KV that leaves."""

    capacity_bytes: int  # device memory (0 = no device model: the reference engine)
    weights_bytes: int
    activation_bytes: int
    kv_bytes: int  # KV pool or slots, as allocated
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    num_blocks: int = 0  # paged pools, null block included
    block_size: int = 0
    slot_tokens: int = 0  # fixed slots (llama.cpp): tokens each slot reserves

    @property
    def total_bytes(self) -> int:
        """Weights + activations + KV (what nvidia-smi would show, roughly)."""
        return self.weights_bytes + self.activation_bytes + self.kv_bytes

    def max_concurrent(self, tokens_per_request: int) -> int:
        """Requests of that many tokens (prompt + output) whose KV fits at once."""
        if self.block_size:
            per = -(-tokens_per_request // self.block_size) * self.block_size
            return (self.num_blocks - 1) * self.block_size // per
        if self.slot_tokens:
            return self.kv_capacity_tokens // self.slot_tokens if tokens_per_request <= self.slot_tokens else 0
        return self.kv_capacity_tokens // max(1, tokens_per_request)

    def to_dict(self) -> dict:
        """Plain fields and the total, for summary.json."""
        return {**asdict(self), "total_bytes": self.total_bytes}


def activation_bytes(engine: EngineConfig, model: ModelConfig, tp: int = 1) -> int:
    """Peak activation memory of the largest step (bytes), as vLLM's profiling run would find it.

    Largest step: the token budget through the MLP (gate, up and their product: 3 x intermediate
    wide) and attention projections, 2-byte activations, plus float32 logits for every sequence.
    """
    if isinstance(engine, ContinuousEngine):
        tokens, seqs = engine.max_num_batched_tokens, engine.max_num_seqs
    elif isinstance(engine, SequentialEngine):
        tokens, seqs = engine.n_ubatch, engine.num_parallel
    else:
        tokens, seqs = engine.max_batch_size * engine.max_model_len, engine.max_batch_size
    width = (3 * model.intermediate_size + 2 * model.hidden_size + model.q_size + 2 * model.kv_size) // tp
    return tokens * width * 2 + seqs * model.vocab_size * 4 + RUNTIME_RESERVE


def plan_memory(engine: EngineConfig, model: ModelConfig, hardware: Hardware | None = None, tp: int = 1,
                dtype: str = "float32") -> MemoryPlan:
    """Size the KV cache of an engine for a model on hardware (None: the reference engine here, in dtype)."""
    if hardware is None:
        return _reference_plan(engine, model, model.kv_bytes_per_token(DTYPE_BYTES[dtype]), DTYPE_BYTES[dtype])
    kv_per_token = int(model.kv_bytes_per_token(get_kv_dtype(engine.kv_dtype, "kv_dtype").bytes_per_element)
                       / min(tp, model.num_kv_heads))
    weights = weight_bytes(model, get_weight_format(engine.weights, "weights")) // tp
    act = activation_bytes(engine, model, tp)
    capacity = hardware.memory_bytes
    if isinstance(engine, SequentialEngine):
        tokens = engine.num_parallel * engine.num_ctx
        plan = MemoryPlan(capacity, weights, act, tokens * kv_per_token, kv_per_token, tokens,
                          slot_tokens=engine.num_ctx)
        if plan.total_bytes > capacity:
            raise ConfigError(f"engines.{engine.name}.num_parallel",
                              f"{engine.num_parallel} slots x num_ctx={engine.num_ctx} need "
                              f"{plan.total_bytes / 1e9:.1f} GB with the weights, the device has {capacity / 1e9:.1f} GB",
                              f"at most {max(0, (capacity - weights - act) // (kv_per_token * engine.num_ctx))} slots")
        return plan
    budget = int(capacity * engine.gpu_memory_utilization) - weights - act
    if budget <= 0:
        raise ConfigError(f"engines.{engine.name}.weights",
                          f"{model.name} in {engine.weights} ({weights / 1e9:.1f} GB) plus activations "
                          f"({act / 1e9:.1f} GB) does not fit in {engine.gpu_memory_utilization} x "
                          f"{capacity / 1e9:.1f} GB of {hardware.name}",
                          "a smaller weight format, more tensor parallelism, or a larger device")
    if isinstance(engine, ContinuousEngine):
        num_blocks = engine.num_blocks or budget // (kv_per_token * engine.block_size) + 1
        tokens = (num_blocks - 1) * engine.block_size
        return MemoryPlan(capacity, weights, act, tokens * kv_per_token, kv_per_token, tokens,
                          num_blocks, engine.block_size)
    tokens = engine.kv_capacity_tokens or budget // kv_per_token
    return MemoryPlan(capacity, weights, act, tokens * kv_per_token, kv_per_token, tokens)


def _reference_plan(engine: EngineConfig, model: ModelConfig, kv_per_token: int, dtype_bytes: int) -> MemoryPlan:
    weights = model.weight_bytes(8 * dtype_bytes)
    if isinstance(engine, SequentialEngine):
        tokens = engine.num_parallel * engine.num_ctx
        return MemoryPlan(0, weights, 0, tokens * kv_per_token, kv_per_token, tokens, slot_tokens=engine.num_ctx)
    if isinstance(engine, ContinuousEngine):
        bs = engine.block_size
        wanted = engine.max_num_seqs * -(-engine.max_model_len // bs)
        num_blocks = engine.num_blocks or min(wanted, REFERENCE_KV_BUDGET // (kv_per_token * bs)) + 1
        tokens = (num_blocks - 1) * bs
        return MemoryPlan(0, weights, 0, tokens * kv_per_token, kv_per_token, tokens, num_blocks, bs)
    tokens = engine.kv_capacity_tokens or engine.max_batch_size * engine.max_model_len
    return MemoryPlan(0, weights, 0, tokens * kv_per_token, kv_per_token, tokens)


def runner_padding(engine: EngineConfig, model: ModelConfig) -> Padding:
    """How the reference runner pads this engine's steps (its KV layout, the runner's default bucket rules)."""
    if isinstance(engine, SequentialEngine):
        return Padding.contiguous(engine.num_ctx)
    if isinstance(engine, StaticEngine):
        return Padding.contiguous(engine.max_model_len)
    if isinstance(engine, ContinuousEngine):
        return Padding.paged(engine.block_size, model.max_position, engine.num_blocks or None)
    raise ConfigError("scheduler", f"no KV layout for {type(engine).__name__}", "sequential, static, continuous, orca")


def build_scheduler(engine: EngineConfig, plan: MemoryPlan) -> Scheduler:
    """The scheduler an engine table describes, over the KV capacity of plan."""
    if isinstance(engine, SequentialEngine):
        return SequentialScheduler(engine.num_parallel, engine.num_ctx, engine.max_queue, engine.n_batch)
    if isinstance(engine, StaticEngine):
        return StaticScheduler(engine.max_batch_size, engine.max_model_len, plan.kv_capacity_tokens,
                               engine.reserve_max_len, max_queue=engine.max_queue)
    if isinstance(engine, ContinuousEngine):
        return ContinuousScheduler(plan.num_blocks, engine.block_size, engine.max_num_seqs,
                                   engine.max_num_batched_tokens, engine.max_model_len,
                                   engine.enable_chunked_prefill, engine.enable_prefix_caching,
                                   engine.reservation, max_queue=engine.max_queue)
    raise ConfigError("scheduler", f"no scheduler for {type(engine).__name__}", "sequential, static, continuous, orca")
