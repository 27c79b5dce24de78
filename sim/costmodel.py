"""Step-time predictors: how long one engine step takes, and why.

One interface, two implementations:

- RooflineCostModel: analytical. A step streams the weights and the batch's K/V from memory and
  does 2 * params * tokens + attention FLOPs; it takes max(memory time, compute time), plus the
  tensor-parallel all-reduces, plus a fixed per-step overhead.
- CalibratedCostModel: a model of the reference engine on a measured device: a non-negative
  least-squares fit of a linear law to a step-latency table that `servesim profile` measured.
  Its features are the sizes of the padded arrays the reference runner builds for the step
  (reference.buckets: decode rows x padded context, query tiles x padded context, flat tokens,
  output rows), because the runner computes its padded shapes, not the batch's real tokens.

The simulator calls step_time about a million times per run, so StepShape is a handful of ints
and step_time is plain Python arithmetic on constants precomputed in __init__ (about a
microsecond; no numpy on the hot path).

All bytes and FLOPs in a StepCost are per device (per tensor-parallel rank), so
bytes_moved / total_s compares directly with one device's datasheet bandwidth.

Plain Python + numpy (fitting only), no JAX.
"""
from __future__ import annotations

import io
import math
import numbers
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reference.buckets import Padding
from reference.errors import ConfigError
from sim import formats
from sim.hardware import Hardware, get_hardware

BREAKDOWN_KEYS = ("weights", "kv_reads", "compute", "communication", "overhead")


# --------------------------------------------------------------------------------------------
# What a step computes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepShape:
    """One engine step reduced to the aggregates its cost depends on.

    A sequence computing n new tokens whose context is c tokens after the step contributes
    n new tokens, c K/V tokens read by attention, and n * (c - n) + n * (n + 1) / 2 causal
    (query, key) pairs. A one-token chunk on top of a cached prompt is a decode.
    """

    prefill_tokens: int = 0  # new tokens in chunks that are not single-token decodes
    decode_seqs: int = 0  # sequences decoding one token
    prefill_seqs: int = 0  # chunks that are not decodes (prefills, recomputes)
    kv_read_tokens: int = 0  # sum over sequences of the context length after the step
    attn_q_ctx: int = 0  # sum over sequences of causal (query, key) pairs
    decode_max_context: int = 0  # longest context (tokens after the step) among the decodes
    prefill_max_context: int = 0  # longest context (tokens after the step) among the other chunks

    def __post_init__(self):
        if min(self.prefill_tokens, self.decode_seqs, self.prefill_seqs, self.kv_read_tokens, self.attn_q_ctx,
               self.decode_max_context, self.prefill_max_context) < 0:
            raise ConfigError("step_shape", f"all fields must be >= 0, got {self}")

    @property
    def new_tokens(self) -> int:
        """Tokens computed this step (prefill + decode)."""
        return self.prefill_tokens + self.decode_seqs

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return self.prefill_seqs + self.decode_seqs

    @property
    def is_empty(self) -> bool:
        """No tokens to compute."""
        return self.prefill_tokens + self.decode_seqs == 0

    @staticmethod
    def chunk_q_ctx(num_new: int, context_after: int) -> int:
        """Causal (query, key) pairs of num_new queries ending at position context_after."""
        return num_new * (context_after - num_new) + num_new * (num_new + 1) // 2

    @classmethod
    def decode(cls, batch: int, context: int) -> StepShape:
        """batch sequences each decoding one token with context tokens after the step."""
        _require_int(batch, "decode_seqs", 0)
        _require_int(context, "context_len", 1 if batch else 0)
        return cls(0, batch, 0, batch * context, batch * context, context if batch else 0)

    @classmethod
    def prefill(cls, tokens: int, cached: int = 0, seqs: int = 1) -> StepShape:
        """seqs chunks of tokens new tokens each, on top of cached tokens already in the KV cache."""
        _require_int(tokens, "prefill_tokens", 0)
        _require_int(cached, "cached_context", 0)
        _require_int(seqs, "prefill_seqs", 0)
        if tokens == 0 or seqs == 0:
            return cls()
        ctx = cached + tokens
        return cls(seqs * tokens, 0, seqs, seqs * ctx, seqs * cls.chunk_q_ctx(tokens, ctx), 0, ctx)

    @classmethod
    def from_chunks(cls, chunks: Iterable[tuple[int, int]]) -> StepShape:
        """From (num_new_tokens, context_len_after_step) per sequence; one new token counts as a decode."""
        p_tok = d_seq = p_seq = kv = qc = d_max = p_max = 0
        for n, ctx in chunks:
            if n <= 0 or ctx < n:
                raise ConfigError("chunk", f"need 0 < num_new_tokens <= context_len_after_step, got ({n}, {ctx})")
            kv += ctx
            if n == 1:
                d_seq += 1
                qc += ctx
                d_max = max(d_max, ctx)
            else:
                p_tok += n
                p_seq += 1
                qc += n * (ctx - n) + n * (n + 1) // 2
                p_max = max(p_max, ctx)
        return cls(p_tok, d_seq, p_seq, kv, qc, d_max, p_max)

    @classmethod
    def from_scheduler_output(cls, out) -> StepShape:
        """From a reference.batch.SchedulerOutput; as from_chunks, a one-token chunk is a decode (as the runner does)."""
        p_tok = d_seq = p_seq = kv = qc = d_max = p_max = 0
        for c in out.chunks:  # hot path (once per simulated step): properties inlined, ~2x faster
            n = c.num_tokens
            end = c.start + n
            kv += end
            if n == 1:
                d_seq += 1
                qc += end
                if end > d_max:
                    d_max = end
            else:
                p_tok += n
                p_seq += 1
                qc += n * c.start + n * (n + 1) // 2
                if end > p_max:
                    p_max = end
        return cls(p_tok, d_seq, p_seq, kv, qc, d_max, p_max)

    def __add__(self, other: StepShape) -> StepShape:
        """Both batches in one step."""
        return StepShape(self.prefill_tokens + other.prefill_tokens, self.decode_seqs + other.decode_seqs,
                         self.prefill_seqs + other.prefill_seqs, self.kv_read_tokens + other.kv_read_tokens,
                         self.attn_q_ctx + other.attn_q_ctx, max(self.decode_max_context, other.decode_max_context),
                         max(self.prefill_max_context, other.prefill_max_context))


def _require_int(value, field: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ConfigError(field, f"must be an integer >= {lo}, got {value!r}")


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
        """Just the total (s)."""
        return self.step_time(batch).total_s

    def predict_scheduler_output(self, out) -> StepCost:
        """Cost of one reference.batch.SchedulerOutput."""
        return self.step_time(StepShape.from_scheduler_output(out))

    def scheduler_step_seconds(self, out) -> float:
        """Seconds one reference.batch.SchedulerOutput takes: the step_time callable sim.replica expects."""
        return self.step_time(StepShape.from_scheduler_output(out)).total_s

    __call__ = scheduler_step_seconds

    @abstractmethod
    def describe(self) -> dict:
        """Parameters that identify this model (for experiment records)."""


# --------------------------------------------------------------------------------------------
# Per-device traffic and FLOPs of a step (shared by both models)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Roofline
# --------------------------------------------------------------------------------------------

# Default efficiencies (fractions of datasheet peaks that serving engines reach in practice):
# - Memory: batch-1 decode GEMV kernels stream weights at roughly 75-90% of peak HBM bandwidth
#   (vLLM / TensorRT-LLM / gpt-fast report ~2.5-3 TB/s of an H100 SXM's 3.35 and ~1.3-1.7 TB/s of
#   an A100 80GB's 2.04 at batch 1); 0.8 sits in the middle.
# - Compute: large BF16 GEMMs reach ~70-80% of the dense peak in cuBLAS/CUTLASS, but a whole
#   prefill step (attention, norms, activations, kernel boundaries, ragged shapes) lands at
#   ~40-60% MFU; 0.6.
# - Communication: NCCL/custom all-reduce bus bandwidth reaches ~70-85% of one direction of the
#   link for the MB-sized messages of prefill; 0.8.
DEFAULT_MEM_EFFICIENCY = 0.8
DEFAULT_COMPUTE_EFFICIENCY = 0.6
DEFAULT_COMM_EFFICIENCY = 0.8


class RooflineCostModel(CostModel):
    """max(memory time, compute time) + tensor-parallel communication + fixed overhead.

    Weight bytes: every parameter at the format's bits, except the embedding and LM head, which
    quantised checkpoints keep at 16 bits (see sim.formats). Attention runs in fp16/bf16 at the
    hardware's fp16 peak whatever the KV dtype. Communication is not overlapped with compute
    (vLLM's all-reduces sit on the critical path between layers).
    """

    def __init__(self, model_cfg, hardware: Hardware | str, weight_format: str = "fp16", kv_dtype: str = "fp16",
                 tp: int = 1, mem_efficiency: float = DEFAULT_MEM_EFFICIENCY,
                 compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY,
                 comm_efficiency: float = DEFAULT_COMM_EFFICIENCY,
                 step_overhead_s: float | None = None, allreduce_latency_s: float | None = None,
                 field_prefix: str = ""):
        p = field_prefix
        self.hardware = get_hardware(hardware) if isinstance(hardware, str) else hardware
        hw = self.hardware
        self.physics = StepPhysics(model_cfg, weight_format, kv_dtype, tp, field_prefix=p)
        self.model_cfg = model_cfg
        self.tp = tp
        self.mem_efficiency = _fraction(mem_efficiency, p + "mem_efficiency")
        self.compute_efficiency = _fraction(compute_efficiency, p + "compute_efficiency")
        self.comm_efficiency = _fraction(comm_efficiency, p + "comm_efficiency")
        self.step_overhead_s = _nonneg(hw.default_step_overhead_s if step_overhead_s is None else step_overhead_s,
                                       p + "step_overhead_s")
        self.allreduce_latency_s = _nonneg(hw.allreduce_latency_s if allreduce_latency_s is None
                                           else allreduce_latency_s, p + "allreduce_latency_s")
        if tp > 1 and hw.interconnect_bw <= 0:
            raise ConfigError(p + "tp", f"{hw.name} has no interconnect for tensor parallelism", "1")
        self.compute_dtype = formats.compute_dtype(self.physics.weight_format, hw)
        self.attention_dtype = "bf16" if self.compute_dtype == "bf16" else "fp16"

        # Hot-path constants.
        ph = self.physics
        bw = hw.memory_bw * self.mem_efficiency
        self._t_weights = ph.weight_bytes / bw
        self._t_kv_per_token = ph.kv_bytes_per_token / bw
        lin_peak = hw.peak_flops(self.compute_dtype) * self.compute_efficiency
        attn_peak = hw.peak_flops(self.attention_dtype) * self.compute_efficiency
        self._t_per_new_token = ph.linear_flops_per_token / lin_peak
        self._t_per_seq = ph.head_flops_per_seq / lin_peak
        self._t_per_pair = ph.attn_flops_per_pair / attn_peak
        if tp > 1:
            ring = 2.0 * (tp - 1) / tp
            link = hw.interconnect_bw_per_direction * self.comm_efficiency
            self._t_comm_per_token = ph.allreduces_per_step * ring * ph.allreduce_bytes_per_token / link
            self._t_comm_fixed = ph.allreduces_per_step * self.allreduce_latency_s
        else:
            self._t_comm_per_token = self._t_comm_fixed = 0.0
        self._weight_bytes = ph.weight_bytes
        self._kv_bytes_per_token = ph.kv_bytes_per_token
        self._flops_per_token = ph.linear_flops_per_token
        self._flops_per_seq = ph.head_flops_per_seq
        self._flops_per_pair = ph.attn_flops_per_pair

    def step_time(self, batch: StepShape) -> StepCost:
        new = batch.prefill_tokens + batch.decode_seqs
        if new == 0:
            return _zero_cost()
        seqs = batch.prefill_seqs + batch.decode_seqs
        kv_tokens = batch.kv_read_tokens + new
        t_w = self._t_weights
        t_kv = kv_tokens * self._t_kv_per_token
        t_c = new * self._t_per_new_token + seqs * self._t_per_seq + batch.attn_q_ctx * self._t_per_pair
        t_comm = new * self._t_comm_per_token + self._t_comm_fixed
        t_o = self.step_overhead_s
        t_mem = t_w + t_kv
        if t_mem >= t_c:
            total = t_mem + t_comm + t_o
            bound, top = "memory", t_mem
        else:
            total = t_c + t_comm + t_o
            bound, top = "compute", t_c
        if t_comm > top:
            bound, top = "communication", t_comm
        if t_o > top:
            bound = "overhead"
        return StepCost(
            total,
            {"weights": t_w, "kv_reads": t_kv, "compute": t_c, "communication": t_comm, "overhead": t_o},
            self._weight_bytes + kv_tokens * self._kv_bytes_per_token,
            new * self._flops_per_token + seqs * self._flops_per_seq + batch.attn_q_ctx * self._flops_per_pair,
            bound,
        )

    def describe(self) -> dict:
        return {"kind": "roofline", "model": self.model_cfg.name, "hardware": self.hardware.name,
                "weight_format": self.physics.weight_format.name, "kv_dtype": self.physics.kv_dtype.name,
                "tp": self.tp, "compute_dtype": self.compute_dtype, "mem_efficiency": self.mem_efficiency,
                "compute_efficiency": self.compute_efficiency, "comm_efficiency": self.comm_efficiency,
                "step_overhead_s": self.step_overhead_s, "allreduce_latency_s": self.allreduce_latency_s,
                "weight_bytes_per_device": self.physics.weight_bytes,
                "kv_bytes_per_token_per_device": self.physics.kv_bytes_per_token}


def _fraction(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(field, f"must be a number in (0, 1], got {value!r}")
    return float(value)


def _nonneg(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0 or math.isinf(value):
        raise ConfigError(field, f"must be a finite number >= 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Calibrated
# --------------------------------------------------------------------------------------------

#: Features of the calibrated law t = sum(c_i * feature_i), in this order. They are the sizes of the
#: padded arrays the reference runner builds for the step (reference.buckets), because that is what
#: it computes. A decode-only step and a step with a prefill part run two different compiled
#: programs, so each has its own terms: decode-only steps cost decode_step + decode_rows per padded
#: row + decode_kv per K/V token gathered (rows x padded context); steps with a prefill part cost
#: step + tokens per flat token (every layer's matmuls) + rows per output row (LM head, sampling)
#: + mixed_decode_kv for their decode part's gather + prefill_kv per K/V token the query tiles gather.
FEATURES = ("decode_step", "decode_rows", "decode_kv", "step", "tokens", "rows", "mixed_decode_kv", "prefill_kv")
PROFILE_COLUMNS = ("kind", "batch_size", "context_len", "prefill_tokens", "cached_context", "median_ms")
PROFILE_KINDS = ("decode", "prefill", "mixed")
PROFILE_LAYOUTS = ("paged", "contiguous")  # the optional `layout` column (default paged)
#: Profile rows of this kind time the engine's host work per step (schedule + update): batch_size
#: decoding requests, or (prefill_tokens > 0) the admission of batch_size prompts. They calibrate
#: HOST_FEATURES (per step, per sequence, per prefill token: admission and prefix hashing), added
#: to every step, not the device law.
HOST_KIND = "host"
HOST_FEATURES = ("step", "seq", "prefill_token")


def features(s: StepShape, padding: Padding) -> tuple[float, ...]:
    """The calibrated law's features of a step, in FEATURES order, for a runner that pads with `padding`."""
    p = padding.step(s.decode_seqs, s.decode_max_context, s.prefill_seqs, s.prefill_tokens, s.prefill_max_context)
    decode_kv = p.decode_rows * p.decode_context
    if not p.prefill_rows:
        return (1.0, p.decode_rows, decode_kv, 0.0, 0.0, 0.0, 0.0, 0.0)
    return (0.0, 0.0, 0.0, 1.0, p.tokens, p.rows, decode_kv, p.prefill_tiles * p.prefill_context)


def profile_padding(metadata: Mapping[str, str], model_cfg=None, layout: str = "paged") -> Padding:
    """The padding of the runner a profile's rows of this layout were measured with, from its metadata.

    Its '# padding:' line (min_tokens=16 min_seqs=4 ...), block_size and kv_pool_blocks (paged) or
    contiguous_slots ('N x L tokens'); the runner's defaults for what a profile does not say
    (profiles written before padding was recorded).
    """
    rules = {}
    for item in metadata.get("padding", "").split():
        key, _, value = item.partition("=")
        if key in ("min_tokens", "min_seqs", "min_blocks", "query_tile", "min_context") and value.isdigit():
            rules[key] = int(value)
    if layout == "contiguous":
        words = metadata.get("contiguous_slots", "").split()
        return Padding.contiguous(int(words[2]) if len(words) > 2 and words[2].isdigit() else 1 << 20, **rules)
    bs = metadata.get("block_size", "16")
    pool = metadata.get("kv_pool_blocks", "")
    max_position = model_cfg.max_position if model_cfg is not None else 1 << 20
    return Padding.paged(int(bs) if bs.isdigit() else 16, max_position, int(pool) if pool.isdigit() else None,
                         **rules)


def shape_from_profile_row(kind: str, batch_size: int, context_len: int, prefill_tokens: int,
                           cached_context: int) -> StepShape:
    """The step a profile row timed.

    decode:  batch_size sequences decoding one token, each with context_len tokens after the step.
    prefill: one chunk of prefill_tokens new tokens on top of cached_context cached ones (batch_size ignored).
    mixed:   both in one step.
    """
    if kind == "decode":
        return StepShape.decode(batch_size, context_len)
    if kind == "prefill":
        return StepShape.prefill(prefill_tokens, cached_context)
    if kind == "mixed":
        return StepShape.decode(batch_size, context_len) + StepShape.prefill(prefill_tokens, cached_context)
    raise ConfigError("profile.kind", f"unknown row kind {kind!r}", ", ".join(PROFILE_KINDS))


def nnls(a, b, tol: float = 1e-12, max_iter: int | None = None):
    """Non-negative least squares min ||a x - b|| s.t. x >= 0 (Lawson-Hanson active set)."""
    import numpy as np

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(max_iter or 10 * n):
        if passive.all() or np.max(np.where(passive, -np.inf, w)) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > 0):
                break
            bad = passive & (z <= 0)
            denom = x[bad] - z[bad]
            alpha = float(np.min(np.where(denom > 0, x[bad] / np.where(denom > 0, denom, 1.0), 0.0)))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
        w = a.T @ (b - a @ x)
    return x


@dataclass(frozen=True)
class FitReport:
    """How well the calibrated law reproduces the table it was fitted to (relative errors)."""

    rows: int
    mean_rel_error: float
    median_rel_error: float
    p90_rel_error: float
    max_rel_error: float
    unconstrained: tuple[str, ...] = ()  # features the table never exercised (coefficient left at 0)
    layout: str = "paged"  # the KV layout of the rows fitted

    def summary(self) -> str:
        text = (f"fit over {self.rows} {self.layout} rows: relative error mean {self.mean_rel_error:.2%}, "
                f"median {self.median_rel_error:.2%}, p90 {self.p90_rel_error:.2%}, max {self.max_rel_error:.2%}")
        if self.unconstrained:
            text += f"; not exercised by the table: {', '.join(self.unconstrained)}"
        return text


class CalibratedCostModel(CostModel):
    """t = sum of c_f * f over FEATURES: one linear law for decode-only steps, one for steps with a prefill part.

    The features (FEATURES) are the padded sizes of the step on the reference runner, computed
    with `padding`: the rules of the runner that was profiled, applied to the KV layout of the
    engine being simulated. Coefficients (s per unit) are non-negative, so predictions never
    decrease with more work. The fixed terms are reported as overhead, the token and row terms as
    compute, the K/V gather terms as kv_reads. host_coefficients (s, s per sequence, s per prefill
    token; from the profile's 'host' rows) price the engine's host work per step
    (scheduler.schedule + update): h_step + h_seq * num_seqs + h_prefill_token * prefill_tokens,
    added to overhead. With model_cfg given, bytes_moved and flops are filled in from StepPhysics
    for reporting.
    """

    def __init__(self, coefficients: Mapping[str, float], *, padding: Padding | None = None,
                 fit_report: FitReport | None = None, metadata: Mapping[str, str] | None = None, model_cfg=None,
                 weight_format: str = "fp16", kv_dtype: str = "fp16", tp: int = 1,
                 hardware: Hardware | str | None = None, host_coefficients: Mapping[str, float] | None = None):
        """padding: the runner's bucket rules for the simulated engine's layout (default: the profile's)."""
        unknown = set(coefficients) - set(FEATURES)
        if unknown:
            raise ConfigError("coefficients", f"unknown features {sorted(unknown)}", ", ".join(FEATURES))
        self.coefficients = {f: _nonneg(float(coefficients.get(f, 0.0)), f"coefficients.{f}") for f in FEATURES}
        self.fit_report = fit_report
        self.metadata = dict(metadata or {})
        self.padding = padding or profile_padding(self.metadata, model_cfg)
        self.model_cfg = model_cfg
        self.hardware = get_hardware(hardware) if isinstance(hardware, str) else hardware
        self.physics = StepPhysics(model_cfg, weight_format, kv_dtype, tp) if model_cfg is not None else None
        self._c = tuple(self.coefficients[f] for f in FEATURES)
        host = dict(host_coefficients or {})
        if set(host) - set(HOST_FEATURES):
            raise ConfigError("host_coefficients", f"unknown features {sorted(set(host) - set(HOST_FEATURES))}",
                              ", ".join(HOST_FEATURES))
        self.host_coefficients = {f: _nonneg(float(host.get(f, 0.0)), f"host_coefficients.{f}")
                                  for f in HOST_FEATURES}
        self._h = tuple(self.host_coefficients[f] for f in HOST_FEATURES)

    @classmethod
    def from_profile(cls, profile, *, model_cfg=None, padding: Padding | None = None, weight_format: str = "fp16",
                     kv_dtype: str = "fp16", tp: int = 1, hardware: Hardware | str | None = None,
                     field: str = "profile", check_model: bool = True) -> CalibratedCostModel:
        """Fit the law to a profile CSV (path) or DataFrame written by `servesim profile`.

        The rows are priced with the profiled runner's padding (profile_padding); predictions use
        `padding` (the simulated engine's layout), default the same. Rows are weighted by
        1 / median_ms so the fit minimises relative error (step times span milliseconds to
        seconds). With check_model, a profile whose metadata names a different preset than
        model_cfg is refused.
        """
        import numpy as np

        df, metadata = read_profile(profile, field)
        host_rows = df[df["kind"] == HOST_KIND]
        df = df[df["kind"] != HOST_KIND]
        # Contiguous slots and paged blocks gather K/V differently: fit the rows of the simulated layout.
        layout = "contiguous" if padding is not None and padding.block_size is None else "paged"
        if not (df["layout"] == layout).any():  # an older profile, or contiguous rows that did not fit
            layout = str(df["layout"].iloc[0]) if len(df) else layout
        df = df[df["layout"] == layout]
        if (host_rows["layout"] == layout).any():  # host rows of the same layout's scheduler
            host_rows = host_rows[host_rows["layout"] == layout]
        if check_model and model_cfg is not None:
            measured = metadata.get("preset") or metadata.get("model")
            if measured and measured != model_cfg.name:
                raise ConfigError(field, f"profile was measured on preset {measured!r}, not {model_cfg.name!r}",
                                  f"a profile of {model_cfg.name}")
        shapes = [shape_from_profile_row(str(k), int(b), int(c), int(p), int(cc))
                  for k, b, c, p, cc in zip(df["kind"], df["batch_size"], df["context_len"],
                                            df["prefill_tokens"], df["cached_context"])]
        for name in ("prefill_tokens", "decode_seqs"):
            if not any(getattr(s, name) for s in shapes):
                raise ConfigError(field, f"no row has {name} > 0, so its cost cannot be calibrated",
                                  "a profile with decode and prefill rows")
        profiled = profile_padding(metadata, model_cfg, layout)
        t = df["median_ms"].to_numpy(dtype=float) / 1e3
        a = np.array([features(s, profiled) for s in shapes], dtype=float)
        aw = a / t[:, None]  # relative-error weighting
        norms = np.linalg.norm(aw, axis=0)
        used = norms > 0
        coef = np.zeros(len(FEATURES))
        coef[used] = nnls(aw[:, used] / norms[used], np.ones(len(t))) / norms[used]
        pred = a @ coef
        rel = np.abs(pred - t) / t
        report = FitReport(rows=len(t), mean_rel_error=float(rel.mean()), median_rel_error=float(np.median(rel)),
                           p90_rel_error=float(np.quantile(rel, 0.9)), max_rel_error=float(rel.max()),
                           unconstrained=tuple(f for f, u in zip(FEATURES, used) if not u), layout=layout)
        host = {}
        if len(host_rows):  # t_host = h_step + h_seq * batch_size + h_tok * prefill_tokens, relative error, >= 0
            th = host_rows["median_ms"].to_numpy(dtype=float) / 1e3
            ah = np.stack([np.ones(len(th)), host_rows["batch_size"].to_numpy(dtype=float),
                           host_rows["prefill_tokens"].to_numpy(dtype=float)], axis=1) / th[:, None]
            nh = np.linalg.norm(ah, axis=0)
            fit = np.zeros(len(HOST_FEATURES))
            fit[nh > 0] = nnls(ah[:, nh > 0] / nh[nh > 0], np.ones(len(th))) / nh[nh > 0]
            host = dict(zip(HOST_FEATURES, map(float, fit)))
        return cls(dict(zip(FEATURES, map(float, coef))), padding=padding or profiled, fit_report=report,
                   metadata=metadata, model_cfg=model_cfg, weight_format=weight_format, kv_dtype=kv_dtype, tp=tp,
                   hardware=hardware, host_coefficients=host)

    def device_seconds(self, batch: StepShape) -> float:
        """The runner's part of the step (prepare + forward + sampling), without host scheduling work (s)."""
        return sum(c * x for c, x in zip(self._c, features(batch, self.padding)))

    def host_seconds(self, batch: StepShape) -> float:
        """The engine's scheduling work around the step (schedule + update) (s)."""
        return self._h[0] + self._h[1] * (batch.prefill_seqs + batch.decode_seqs) + self._h[2] * batch.prefill_tokens

    def step_time(self, batch: StepShape) -> StepCost:
        if batch.prefill_tokens + batch.decode_seqs == 0:
            return _zero_cost()
        f = features(batch, self.padding)
        c = self._c
        t_fixed = c[0] * f[0] + c[3] * f[3] + self.host_seconds(batch)
        t_kv = c[2] * f[2] + c[6] * f[6] + c[7] * f[7]
        t_c = c[1] * f[1] + c[4] * f[4] + c[5] * f[5]
        total = t_fixed + t_kv + t_c
        ph = self.physics
        return StepCost(
            total,
            {"weights": 0.0, "kv_reads": t_kv, "compute": t_c, "communication": 0.0, "overhead": t_fixed},
            ph.bytes_moved(batch) if ph is not None else 0.0,
            ph.flops(batch) if ph is not None else 0.0,
            "calibrated",
        )

    def describe(self) -> dict:
        out = {"kind": "calibrated", "coefficients": dict(self.coefficients),
               "host_coefficients": dict(self.host_coefficients), "padding": {
                   "block_size": self.padding.block_size, "context_cap": self.padding.context_cap,
                   "rules": self.padding.metadata()}, "metadata": dict(self.metadata)}
        if self.fit_report is not None:
            out["fit"] = self.fit_report.summary()
        return out


def read_profile(profile, field: str = "profile"):
    """(DataFrame, metadata) from a profile CSV path or a DataFrame (metadata from df.attrs).

    Leading '#' lines are metadata: '# key: value' or '# key=value'.
    """
    import pandas as pd

    metadata: dict[str, str] = {}
    if isinstance(profile, pd.DataFrame):
        df = profile.copy()
        metadata.update({str(k): str(v) for k, v in profile.attrs.items()})
    else:
        path = os.fspath(profile)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as e:
            raise ConfigError(field, f"cannot read {path!r}: {e.strerror or e}") from None
        body_start = 0
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("#"):
                text = stripped.lstrip("#").strip()
                sep = min((p for p in (text.find(":"), text.find("=")) if p > 0), default=-1)
                if sep > 0:
                    metadata[text[:sep].strip().lower()] = text[sep + 1:].strip()
                body_start = i + 1
            elif stripped:
                break
            else:
                body_start = i + 1
        try:
            df = pd.read_csv(io.StringIO("".join(lines[body_start:])))
        except Exception as e:  # pandas raises several types for malformed CSV
            raise ConfigError(field, f"cannot parse {path!r} as CSV: {e}") from None
    missing = [c for c in PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(field, f"profile lacks columns {missing}", ", ".join(PROFILE_COLUMNS))
    df = df.copy()
    df["kind"] = df["kind"].astype(str).str.strip()
    df["layout"] = df["layout"].astype(str).str.strip() if "layout" in df.columns else "paged"
    bad = sorted(set(df["layout"]) - set(PROFILE_LAYOUTS))
    if bad:
        raise ConfigError(f"{field}.layout", f"unknown layouts {bad}", ", ".join(PROFILE_LAYOUTS))
    bad = sorted(set(df["kind"]) - set(PROFILE_KINDS) - {HOST_KIND})
    if bad:
        raise ConfigError(f"{field}.kind", f"unknown row kinds {bad}", ", ".join(PROFILE_KINDS + (HOST_KIND,)))
    for col in ("batch_size", "context_len", "prefill_tokens", "cached_context"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype(int)
        if (df[col] < 0).any():
            raise ConfigError(f"{field}.{col}", "negative values")
    df["median_ms"] = pd.to_numeric(df["median_ms"], errors="coerce")
    df = df[df["median_ms"].notna() & (df["median_ms"] > 0)]
    if (df["kind"] != HOST_KIND).sum() < len(FEATURES):
        raise ConfigError(field, f"need at least {len(FEATURES)} step rows with a positive median_ms, "
                                 f"got {(df['kind'] != HOST_KIND).sum()}")
    return df.reset_index(drop=True), metadata


# --------------------------------------------------------------------------------------------
# From a TOML [cost_model] section
# --------------------------------------------------------------------------------------------

COST_MODEL_KINDS = ("roofline", "calibrated")
ROOFLINE_KEYS = ("kind", "hardware", "weight_format", "kv_dtype", "tp", "mem_efficiency", "compute_efficiency",
                 "comm_efficiency", "step_overhead_s", "allreduce_latency_s")
CALIBRATED_KEYS = ("kind", "profile", "weight_format", "kv_dtype", "tp", "hardware", "allow_model_mismatch")


def make_cost_model(section: Mapping, model_cfg, *, weight_format: str | None = None, kv_dtype: str | None = None,
                    tp: int | None = None, base_dir: str | os.PathLike | None = None,
                    prefix: str = "cost_model", padding: Padding | None = None) -> CostModel:
    """Build a cost model from a [cost_model] table.

    {kind="roofline", hardware="h100-sxm", weight_format="fp16", kv_dtype="fp16", tp=1, ...} or
    {kind="calibrated", profile="path.csv"}. weight_format / kv_dtype / tp given here are
    defaults the section may override. A relative profile path is resolved against base_dir
    (the experiment file's folder). padding: the reference runner's padding for the simulated
    engine's KV layout (calibrated only; default the profiled runner's). Unknown kinds and keys
    raise ConfigError naming them.
    """
    if not isinstance(section, Mapping):
        raise ConfigError(prefix, f"must be a table, got {type(section).__name__}")
    kind = section.get("kind", "roofline")
    if kind not in COST_MODEL_KINDS:
        raise ConfigError(f"{prefix}.kind", f"unknown cost model kind {kind!r}", ", ".join(COST_MODEL_KINDS))
    allowed = ROOFLINE_KEYS if kind == "roofline" else CALIBRATED_KEYS
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{prefix}.{key}", f"unknown key for a {kind} cost model", ", ".join(allowed))
    wf = section.get("weight_format", weight_format or "fp16")
    kvd = section.get("kv_dtype", kv_dtype or "fp16")
    tpv = section.get("tp", tp if tp is not None else 1)
    p = prefix + "."
    if kind == "roofline":
        if "hardware" not in section:
            raise ConfigError(f"{prefix}.hardware", "required for a roofline cost model",
                              ", ".join(_hardware_names()))
        hw = _with_prefix(get_hardware, p, section["hardware"])
        kwargs = {k: section[k] for k in ("mem_efficiency", "compute_efficiency", "comm_efficiency",
                                          "step_overhead_s", "allreduce_latency_s") if k in section}
        return RooflineCostModel(model_cfg, hw, wf, kvd, tpv, field_prefix=p, **kwargs)
    if "profile" not in section:
        raise ConfigError(f"{prefix}.profile", "required for a calibrated cost model", "path to a profile CSV")
    path = section["profile"]
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{prefix}.profile", f"must be a path, got {path!r}")
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    allow = section.get("allow_model_mismatch", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"{prefix}.allow_model_mismatch", f"must be true or false, got {allow!r}")
    hw = section.get("hardware")
    if hw is not None:
        hw = _with_prefix(get_hardware, p, hw)
    StepPhysics(model_cfg, wf, kvd, tpv, field_prefix=p)  # validate with prefixed field names
    return CalibratedCostModel.from_profile(path, model_cfg=model_cfg, padding=padding, weight_format=wf,
                                            kv_dtype=kvd, tp=tpv, hardware=hw, field=f"{prefix}.profile",
                                            check_model=not allow)


def _hardware_names():
    from sim.hardware import HARDWARE

    return list(HARDWARE)


def _with_prefix(fn, prefix: str, *args):
    """Call fn, re-raising its ConfigError with the field under prefix."""
    try:
        return fn(*args)
    except ConfigError as e:
        raise with_field(e, prefix + e.field) from None


def with_field(e: ConfigError, field: str) -> ConfigError:
    """The same ConfigError reported under another field name (a CLI option, a TOML key path)."""
    message = str(e)[len(e.field) + 2:]
    if e.allowed:
        message = message[: -len(f" (allowed: {e.allowed})")]
    return ConfigError(field, message, e.allowed)
