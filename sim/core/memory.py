"""Where an engine's device memory goes, and how many tokens of KV that leaves.

Per device (bytes):
    paged (vLLM):       KV pool = capacity x gpu_memory_utilization - weights - activation peak
    slots (llama.cpp):  KV = num_parallel x num_ctx tokens, allocated at load; must fit beside weights
    static:             KV for the batch from the same budget as paged (or an explicit capacity)
Each engine kind (sim.lab.experiment) chooses its plan from these pieces; this module holds the
arithmetic they share. Without a hardware model (the reference engine on this machine) a pool is
sized by the engine itself, capped at REFERENCE_KV_BUDGET bytes.

What the real engines refuse at start-up, the plans refuse too (ConfigError naming the key and the
largest value that fits): a paged pool that cannot hold one request of max_model_len (vLLM:
`largest_paged_context`), slots whose num_parallel x num_ctx tokens do not fit beside the weights
(llama.cpp fails to allocate its KV buffer), weights that do not fit the device.

Plain Python, no JAX.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from reference.config import ModelConfig
from sim.core.formats import get_kv_dtype, get_weight_format, weight_bytes

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


@dataclass(frozen=True)
class DeviceBudget:
    """What one device holds before any KV: capacity, weights and activation peak (bytes), and KV bytes per token."""

    capacity_bytes: int  # 0: no device model (the reference engine on this machine)
    weights_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int

    def plan(self, kv_tokens: int, **layout) -> MemoryPlan:
        """The plan with kv_tokens of KV allocated (layout: num_blocks and block_size, or slot_tokens)."""
        return MemoryPlan(self.capacity_bytes, self.weights_bytes, self.activation_bytes,
                          kv_tokens * self.kv_bytes_per_token, self.kv_bytes_per_token, kv_tokens, **layout)


def activation_bytes(model: ModelConfig, tokens: int, seqs: int, tp: int = 1) -> int:
    """Peak activation memory of a step of `tokens` tokens over `seqs` sequences (bytes), as vLLM's profiling run finds it.

    The step's tokens through the MLP (gate, up and their product: 3 x intermediate wide) and the
    attention projections, 2-byte activations, plus float32 logits for every sequence, plus the
    runtime's fixed reserve.
    """
    width = (3 * model.intermediate_size + 2 * model.hidden_size + model.q_size + 2 * model.kv_size) // tp
    return tokens * width * 2 + seqs * model.vocab_size * 4 + RUNTIME_RESERVE


def device_budget(model: ModelConfig, hardware, weights: str, kv_dtype: str, tp: int, tokens: int, seqs: int,
                  field_prefix: str = "") -> DeviceBudget:
    """The budget on an accelerator: its memory, the weights in their format, the largest step's activations."""
    kv_per_token = int(model.kv_bytes_per_token(get_kv_dtype(kv_dtype, field_prefix + "kv_dtype").bytes_per_element)
                       / min(tp, model.num_kv_heads))
    w = weight_bytes(model, get_weight_format(weights, field_prefix + "weights")) // tp
    return DeviceBudget(hardware.memory_bytes, w, activation_bytes(model, tokens, seqs, tp), kv_per_token)


def largest_paged_context(kv_bytes: int, kv_bytes_per_token: int, block_size: int) -> int:
    """The longest request (tokens) a paged pool of kv_bytes can hold: whole blocks x block_size.

    vLLM's start-up rule: one request of max_model_len must fit in the pool, block by block
    (V0 `raise_if_cache_size_invalid`: max_model_len > block_size x num_gpu_blocks is refused; V1
    `check_enough_kv_cache_memory`: cdiv(max_model_len, block_size) x page bytes > available memory
    is refused, and `estimate_max_model_len` reports the largest length that fits). The null block
    the simulator (like V1's BlockPool) keeps back is not part of kv_bytes here.
    """
    if kv_bytes <= 0:
        return 0
    return int(kv_bytes // (kv_bytes_per_token * block_size)) * block_size


def least_utilization(budget: DeviceBudget, kv_tokens: int) -> float:
    """The gpu_memory_utilization whose share of the device holds the weights, activations and kv_tokens of KV."""
    return (budget.weights_bytes + budget.activation_bytes + kv_tokens * budget.kv_bytes_per_token) \
        / budget.capacity_bytes


def reference_budget(model: ModelConfig, dtype: str) -> DeviceBudget:
    """The reference engine on this machine: weights and K/V in its compute dtype, no device model."""
    b = DTYPE_BYTES[dtype]
    return DeviceBudget(0, model.weight_bytes(8 * b), 0, model.kv_bytes_per_token(b))
