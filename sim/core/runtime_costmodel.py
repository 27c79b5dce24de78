"""RuntimeCostModel: a step priced by a runtime's calibrated law (sim.core.runtimes) on a card.

The roofline prices every engine with one efficiency; this model asks which runtime executes the
step ("llama.cpp" CUDA kernels, or "vllm") and uses that runtime's law, whose parameters were fitted
on published measurements (experiments/measured/runtime_fit.json, `servesim measured --refit`).

Tensor parallelism keeps the roofline's treatment: StepPhysics splits weights, K/V and FLOPs over
tp devices, and each step adds 2 ring all-reduces per layer over one direction of the interconnect
at DEFAULT_COMM_EFFICIENCY plus a fixed latency each (hardware.allreduce_latency_s). llama.cpp's own
multi-GPU mode is a layer split, not tensor parallelism; it is not modelled.

Each engine kind says which runtime executes it (its `runtime` key; Ollama-style sequential
defaults to llama.cpp, the others to vllm: sim.lab.experiment).

Plain Python on the hot path (one StepLaw.seconds per step).
"""
from __future__ import annotations

from reference.batch import StepShape
from sim.core.costmodel import BREAKDOWN_KEYS, CostModel, StepCost, StepPhysics
from sim.core.hardware import Hardware, get_hardware
from sim.core.runtimes import DEQUANT_BYTES_PER_PARAM, build_law, check_runtime, load_fit


class RuntimeCostModel(CostModel):
    """A step's time under a runtime's calibrated law on a card (see sim.core.runtimes for the laws).

    breakdown (s): weights (stream the weights, and for llama.cpp above 32 tokens the dequantised
    copy), kv_reads (K/V traffic and llama.cpp's attention-score traffic), compute (matmuls and
    attention at the runtime's calibrated tensor efficiency), communication (tensor-parallel
    all-reduces), overhead (per-step host and launch time; vLLM's per-sequence host time).
    llama.cpp sums its terms; vLLM overlaps memory and compute (max). bytes_moved and flops are per
    device: StepPhysics' bytes (plus the dequantised copy) and FLOPs.
    """

    def __init__(self, model_cfg, hardware: Hardware | str, runtime: str, weight_format: str = "fp16",
                 kv_dtype: str = "fp16", tp: int = 1, ubatch: int = 512, fit: dict | None = None,
                 field_prefix: str = ""):
        p = field_prefix
        self.runtime = check_runtime(runtime, p + "runtime")
        self.hardware = get_hardware(hardware) if isinstance(hardware, str) else hardware
        self.model_cfg = model_cfg
        self.tp = tp
        self.fit = load_fit() if fit is None else fit
        self.params = dict(self.fit[self.runtime])
        self.physics = StepPhysics(model_cfg, weight_format, kv_dtype, tp, field_prefix=p)
        self.law = build_law(self.runtime, self.params, self.hardware, model_cfg, weight_format, kv_dtype, tp,
                             ubatch, field_prefix=p)
        self.ubatch = ubatch
        self._dequant_bytes = (DEQUANT_BYTES_PER_PARAM * model_cfg.num_params / tp if self.law.m_dequant else 0.0)

    def step_time(self, batch: StepShape) -> StepCost:
        new = batch.prefill_tokens + batch.decode_seqs
        if new == 0:
            return StepCost(0.0, dict.fromkeys(BREAKDOWN_KEYS, 0.0), 0.0, 0.0, "idle")
        seqs = batch.prefill_seqs + batch.decode_seqs
        w, kv, comp, comm, over, total = self.law.terms(new, seqs, batch.kv_read_tokens + new, batch.attn_q_ctx)
        parts = {"weights": w, "kv_reads": kv, "compute": comp, "communication": comm, "overhead": over}
        mem = w + kv
        bound, top = ("memory", mem) if mem >= comp else ("compute", comp)
        if comm > top:
            bound, top = "communication", comm
        if over > top:
            bound = "overhead"
        n_deq = self.law.micro_batches(new)[1] if self._dequant_bytes else 0
        return StepCost(total, parts, self.physics.bytes_moved(batch) + n_deq * self._dequant_bytes,
                        self.physics.flops(batch), bound)

    def step_seconds(self, batch: StepShape) -> float:
        """Just the total (s), without building a StepCost (the simulator's hot path)."""
        return self.law.step_seconds(batch)

    def describe(self) -> dict:
        return {"kind": "runtime", "runtime": self.runtime, "model": self.model_cfg.name,
                "hardware": self.hardware.name, "weight_format": self.physics.weight_format.name,
                "kv_dtype": self.physics.kv_dtype.name, "tp": self.tp, "ubatch": self.ubatch,
                "params": dict(self.params), "weight_bytes_per_device": self.physics.weight_bytes,
                "kv_bytes_per_token_per_device": self.physics.kv_bytes_per_token}


def make_runtime_cost_model(model_cfg, hardware: Hardware | str, runtime: str, weight_format: str = "fp16",
                            kv_dtype: str = "fp16", tp: int = 1, ubatch: int = 512,
                            fit: dict | None = None) -> RuntimeCostModel:
    """RuntimeCostModel for model_cfg on hardware under runtime ('llama.cpp' or 'vllm').

    fit: {runtime: {param: value}}; default: experiments/measured/runtime_fit.json. ubatch: llama.cpp's
    n_ubatch (tokens per micro-batch). Step times in seconds.

    ConfigError names the field: runtime (allowed: llama.cpp, vllm), hardware, weight_format, kv_dtype, tp, ubatch.
    """
    return RuntimeCostModel(model_cfg, hardware, runtime, weight_format, kv_dtype, tp, ubatch, fit)
