"""Step-time predictors: the interface every cost model implements, and the physics of a step they share.

A cost model says how long one engine step takes (StepCost: total and where the time goes) from
the step's shape (reference.batch.StepShape). Implementations:
- sim.core.roofline.RooflineCostModel: analytical, from datasheet peaks and efficiencies;
- sim.core.calibrated.CalibratedCostModel: fitted to step latencies `servesim profile` measured
  on a device running the reference engine.

The simulator calls step_time about a million times per run, so step_time is plain Python
arithmetic on constants precomputed in __init__ (about a microsecond; no numpy on the hot path).
All bytes and FLOPs in a StepCost are per device (per tensor-parallel rank), so
bytes_moved / total_s compares directly with one device's datasheet bandwidth.

Plain Python, no JAX.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

from reference.batch import StepShape
from reference.errors import ConfigError
from sim.core import formats

BREAKDOWN_KEYS = ("weights", "kv_reads", "compute", "communication", "overhead")


@dataclass(slots=True)
class StepCost:
    """Predicted duration of one step and where the time goes.

    breakdown (s): weights (stream the weights), kv_reads (read the batch's K/V and write the new
    tokens'), compute (matmuls + attention), communication (tensor-parallel all-reduces), overhead
    (fixed per step). Memory (weights + kv_reads) and compute overlap, so for the roofline
    total_s = max(weights + kv_reads, compute) + communication + overhead.
    bytes_moved and flops are per device.
    """

    total_s: float
    breakdown: dict[str, float]
    bytes_moved: float = 0.0
    flops: float = 0.0
    bound: str = ""  # which term dominates: memory, compute, communication, overhead (or calibrated)

    @property
    def achieved_bandwidth(self) -> float:
        """B/s per device over the whole step."""
        return self.bytes_moved / self.total_s if self.total_s > 0 else 0.0

    @property
    def achieved_flops(self) -> float:
        """FLOP/s per device over the whole step."""
        return self.flops / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict:
        """JSON-friendly view (seconds, bytes, FLOPs)."""
        return {"total_s": self.total_s, "breakdown": dict(self.breakdown), "bytes_moved": self.bytes_moved,
                "flops": self.flops, "bound": self.bound, "achieved_bandwidth": self.achieved_bandwidth,
                "achieved_flops": self.achieved_flops}


def _zero_cost() -> StepCost:
    return StepCost(0.0, dict.fromkeys(BREAKDOWN_KEYS, 0.0), 0.0, 0.0, "idle")


class CostModel(ABC):
    """Predicts the duration of one engine step."""

    @abstractmethod
    def step_time(self, batch: StepShape) -> StepCost:
        """Predicted cost of one step computing batch."""

    def step_seconds(self, batch: StepShape) -> float:
        """Just the total (s): the callable a simulated replica prices its steps with."""
        return self.step_time(batch).total_s

    @abstractmethod
    def describe(self) -> dict:
        """Parameters that identify this model (for experiment records)."""


# Per-device traffic and FLOPs of a step (shared by every cost model)


class StepPhysics:
    """Bytes and FLOPs per device of a step of model_cfg stored in weight_format, KV in kv_dtype, over tp devices.

    - Weights: all of them once per step, split over tp.
    - KV: kv_read_tokens read + new tokens written; K/V heads split over min(tp, num_kv_heads)
      (beyond that each rank holds a replica of one head).
    - FLOPs: 2 x (matmul params without the LM head) per new token; the LM head only for the
      last token of each sequence (engines compute logits only where they sample); attention
      4 x layers x q_size per (query, key) pair. All split over tp.
    - All-reduce: 2 per layer (after attention and after the MLP) of new_tokens x hidden fp16
      activations.
    Activation traffic and the embedding gather are ignored (small next to the weights).
    """

    ACTIVATION_BYTES = 2  # fp16/bf16 activations

    def __init__(self, model_cfg, weight_format: str = "fp16", kv_dtype: str = "fp16", tp: int = 1,
                 field_prefix: str = ""):
        _require_int(tp, field_prefix + "tp", 1)
        if model_cfg.num_heads % tp:
            divisors = [d for d in range(1, model_cfg.num_heads + 1) if model_cfg.num_heads % d == 0]
            raise ConfigError(field_prefix + "tp", f"{tp} does not divide num_heads={model_cfg.num_heads} "
                              f"of {model_cfg.name}", ", ".join(map(str, divisors)))
        self.model_cfg = model_cfg
        self.tp = tp
        self.weight_format = formats.get_weight_format(weight_format, field_prefix + "weight_format")
        self.kv_dtype = formats.get_kv_dtype(kv_dtype, field_prefix + "kv_dtype")
        self.weight_bytes_total = formats.weight_bytes(model_cfg, self.weight_format)
        self.weight_bytes = self.weight_bytes_total / tp
        kv_shards = min(tp, model_cfg.num_kv_heads)
        self.kv_bytes_per_token = model_cfg.kv_bytes_per_token(self.kv_dtype.bytes_per_element) / kv_shards
        head = model_cfg.embedding_params  # LM head (vocab x hidden), tied or not
        self.linear_flops_per_token = 2.0 * (model_cfg.matmul_params - head) / tp
        self.head_flops_per_seq = 2.0 * head / tp
        self.attn_flops_per_pair = 4.0 * model_cfg.num_layers * model_cfg.q_size / tp
        self.allreduces_per_step = 2 * model_cfg.num_layers
        self.allreduce_bytes_per_token = model_cfg.hidden_size * self.ACTIVATION_BYTES

    def bytes_moved(self, s: StepShape) -> float:
        """Bytes read and written per device."""
        if s.prefill_tokens + s.decode_seqs == 0:
            return 0.0
        return self.weight_bytes + (s.kv_read_tokens + s.prefill_tokens + s.decode_seqs) * self.kv_bytes_per_token

    def flops(self, s: StepShape) -> float:
        """FLOPs per device (linear layers + LM head + attention)."""
        return ((s.prefill_tokens + s.decode_seqs) * self.linear_flops_per_token
                + (s.prefill_seqs + s.decode_seqs) * self.head_flops_per_seq
                + s.attn_q_ctx * self.attn_flops_per_pair)


def _fraction(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(field, f"must be a number in (0, 1], got {value!r}")
    return float(value)


def _nonneg(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0 or math.isinf(value):
        raise ConfigError(field, f"must be a finite number >= 0, got {value!r}")
    return float(value)


def _require_int(value, field: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ConfigError(field, f"must be an integer >= {lo}, got {value!r}")
