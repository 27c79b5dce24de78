"""The analytical cost model: a roofline from datasheet peaks, with fixed efficiencies.

A step streams the weights and the batch's K/V from memory and does 2 * params * tokens +
attention FLOPs; it takes max(memory time, compute time), plus the tensor-parallel all-reduces,
plus a fixed per-step overhead.

Plain Python, no JAX.
"""
from __future__ import annotations

from reference.batch import StepShape
from reference.errors import ConfigError
from sim.core import formats
from sim.core.costmodel import CostModel, StepCost, StepPhysics, _fraction, _nonneg, _zero_cost
from sim.core.hardware import Hardware, get_hardware

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
    quantised checkpoints keep at 16 bits (see sim.core.formats). Attention runs in fp16/bf16 at the
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

    def step_seconds(self, batch: StepShape) -> float:
        """step_time(batch).total_s, the same arithmetic without building the StepCost (priced for every simulated step)."""
        if type(self).step_time is not RooflineCostModel.step_time:  # a subclass prices steps its own way
            return self.step_time(batch).total_s
        new = batch.prefill_tokens + batch.decode_seqs
        if new == 0:
            return _zero_cost().total_s
        seqs = batch.prefill_seqs + batch.decode_seqs
        t_mem = self._t_weights + (batch.kv_read_tokens + new) * self._t_kv_per_token
        t_c = new * self._t_per_new_token + seqs * self._t_per_seq + batch.attn_q_ctx * self._t_per_pair
        t_comm = new * self._t_comm_per_token + self._t_comm_fixed
        return (t_mem if t_mem >= t_c else t_c) + t_comm + self.step_overhead_s

    def describe(self) -> dict:
        return {"kind": "roofline", "model": self.model_cfg.name, "hardware": self.hardware.name,
                "weight_format": self.physics.weight_format.name, "kv_dtype": self.physics.kv_dtype.name,
                "tp": self.tp, "compute_dtype": self.compute_dtype, "mem_efficiency": self.mem_efficiency,
                "compute_efficiency": self.compute_efficiency, "comm_efficiency": self.comm_efficiency,
                "step_overhead_s": self.step_overhead_s, "allreduce_latency_s": self.allreduce_latency_s,
                "weight_bytes_per_device": self.physics.weight_bytes,
                "kv_bytes_per_token_per_device": self.physics.kv_bytes_per_token}
