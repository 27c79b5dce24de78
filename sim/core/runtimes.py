"""Runtime profiles: calibrated laws for how long llama.cpp's and vLLM's kernels take to run one step on a card.

The roofline (sim.core.roofline.RooflineCostModel) prices every engine on every card with one
efficiency. Published measurements say that is far off: llama.cpp at batch 1 streams its weights at
~95% of the datasheet bandwidth on GDDR cards but ~55-70% on HBM cards, and pays a fixed cost per
layer per token that dominates on fast cards. A runtime profile is a law for a step on a card, with
a few parameters fitted on measured rows (experiments/measured/, see its README):

llama.cpp (CUDA backend as of May 2024; every term is summed, nothing overlaps):

    t = tau_layer_s * layers                                   host/launch time per layer (no CUDA graphs)
      + weight_bytes / B                                       stream the weights once per step
      + [tokens > 32 and weights quantised] * 4 * params / B   dequantise to an F16 copy, GEMM reads it back
      + kv_read_factor * kv_bytes * (context + new) / B        read and write the K/V
      + score_passes * 4 B * q_heads * layers * pairs / B      attention scores (fp32, no flash-attention)
      + FLOPs / (P * compute_efficiency)                       matmuls + attention on tensor cores

  B (achieved bandwidth) = (BW^-p + (k * SMs * f_boost)^-p)^(-1/p): a smooth minimum of the datasheet
  bandwidth BW and a cap proportional to SM count x boost clock (bytes in flight per SM per cycle:
  Little's law), fitted k = bw_bytes_per_sm_clock and p = bw_sharpness. HBM cards have 2-4x more
  bandwidth per SM-cycle than GDDR cards, so llama.cpp's single-row kernels reach the cap there.
  P = the card's dense FP16 tensor rate with FP16 accumulate (llama.cpp calls cuBLAS with
  CUBLAS_COMPUTE_16F), halved on Hopper/Blackwell, whose datasheet rate needs wgmma/tcgen05
  instructions that mma.sync-era kernels do not issue (fixed, not fitted; see LEGACY_TENSOR_FRACTION).
  Quantised weights take llama.cpp's dequantise + cuBLAS path above MMQ_MAX_BATCH_SIZE = 32 tokens.

vLLM 0.5.x (CUDA graphs, cuBLAS, FlashAttention/PagedAttention; memory and compute overlap):

    t = host_step_s + host_seq_s * seqs                        Python scheduler, input prep, sampler, API server
      + max((weight_bytes + kv_bytes * (context + new)) / (bw_efficiency * BW),
            FLOPs / (P_dtype * compute_efficiency))            roofline with calibrated efficiencies

Both add the roofline's tensor-parallel all-reduce time (StepPhysics bytes, interconnect one way at
DEFAULT_COMM_EFFICIENCY, a fixed latency per all-reduce). All bytes and FLOPs are per device.

`servesim measured --refit` refits both laws on the rows (sim.lab.measured) and writes
experiments/measured/runtime_fit.json; `servesim measured` prints every row with its prediction,
and the leave-one-GPU-out table.

Plain Python on the hot path (StepLaw.seconds); numpy for fitting only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reference.errors import ConfigError
from reference.batch import StepShape
from sim.core import formats
from sim.core.costmodel import StepPhysics
from sim.core.hardware import HARDWARE, Hardware
from sim.core.roofline import DEFAULT_COMM_EFFICIENCY

RUNTIMES = ("llama.cpp", "vllm")
MEASURED_DIR = Path(__file__).resolve().parents[2] / "experiments" / "measured"
FIT_PATH = MEASURED_DIR / "runtime_fit.json"
FIT_COMMAND = "servesim measured --refit"

# ---------------------------------------------------------------------------------------------
# Fixed physics (not fitted)
# ---------------------------------------------------------------------------------------------

#: Bytes per parameter llama.cpp moves to dequantise a quantised matrix for cuBLAS: it writes an F16
#: copy (2 B) that the GEMM reads back (2 B); reading the quantised weights is the weight term.
DEQUANT_BYTES_PER_PARAM = 4.0
#: llama.cpp (ggml-cuda, early-mid 2024): "max batch size to use MMQ kernels when tensor cores are
#: available: MMQ_MAX_BATCH_SIZE 32"; larger steps dequantise and call cuBLAS.
MMQ_MAX_BATCH = 32
#: Fraction of the datasheet dense tensor rate that mma.sync-based GEMMs reach, by architecture.
#: Hopper's quoted rate is twice Ampere's per SM per clock and needs the asynchronous wgmma
#: instructions; mma.sync issues at the Ampere rate (half). Blackwell: assumed the same (tcgen05);
#: no measurement in our data.
LEGACY_TENSOR_FRACTION = {"hopper": 0.5, "blackwell": 0.5}
#: Bytes of one attention score (llama.cpp without flash-attention keeps KQ in fp32).
SCORE_BYTES = 4.0

# ---------------------------------------------------------------------------------------------
# Parameters: name, unit, meaning
# ---------------------------------------------------------------------------------------------

LLAMACPP_PARAMS = (
    ("tau_layer_s", "s", "host and launch time per layer per step (kernel launches; build without CUDA graphs)"),
    ("bw_bytes_per_sm_clock", "B/(SM*cycle)",
     "k: bandwidth cap per SM per boost-clock cycle (bytes in flight per SM / latency)"),
    ("bw_sharpness", "1", "p: how sharply the achieved bandwidth switches between BW and the SM cap"),
    ("kv_read_factor", "1", "K/V bytes read per K/V byte stored, at batch 1 (GQA heads re-read K/V)"),
    ("score_passes", "1", "passes over the fp32 attention-score matrix (KQ write, mask/softmax, KQV read)"),
    ("compute_efficiency", "1", "fraction of the tensor rate P the matmuls reach"),
)
VLLM_PARAMS = (
    ("host_step_s", "s", "CPU time per step on the critical path (scheduler, input prep, sampler, API server)"),
    ("host_seq_s", "s", "CPU time per sequence per step (grows with the batch; vLLM 0.6.0 release notes)"),
    ("bw_efficiency", "1", "fraction of the datasheet bandwidth vLLM's decode reaches (ASSUMED 1.0, not fitted)"),
    ("compute_efficiency", "1", "fraction of the dense bf16/fp16 tensor rate vLLM's prefill reaches"),
)
PARAM_SPECS = {"llama.cpp": LLAMACPP_PARAMS, "vllm": VLLM_PARAMS}


def check_runtime(runtime, field: str = "runtime") -> str:
    """The runtime name if known; ConfigError naming field and listing RUNTIMES otherwise."""
    if runtime not in RUNTIMES:
        raise ConfigError(field, f"unknown runtime {runtime!r}", ", ".join(RUNTIMES))
    return runtime


# ---------------------------------------------------------------------------------------------
# Card physics the laws use
# ---------------------------------------------------------------------------------------------


def sm_bandwidth_cap(hw: Hardware, bytes_per_sm_clock: float) -> float:
    """B/s: k x SMs x boost clock, the bandwidth a kernel with k bytes in flight per SM-cycle can sustain."""
    return bytes_per_sm_clock * hw.sm_count * hw.boost_clock_ghz * 1e9


def achieved_bandwidth(hw: Hardware, bytes_per_sm_clock: float, sharpness: float) -> float:
    """B/s llama.cpp's kernels stream at on hw: smooth minimum of datasheet bandwidth and the SM cap."""
    if hw.sm_count <= 0 or hw.boost_clock_ghz <= 0:
        have = ", ".join(h for h in _presets_with_sm_details())
        raise ConfigError("hardware", f"{hw.name} has no sm_count / boost_clock_ghz, which the llama.cpp law "
                                      "needs", have)
    cap = sm_bandwidth_cap(hw, bytes_per_sm_clock)
    p = sharpness
    return (hw.memory_bw ** -p + cap ** -p) ** (-1.0 / p)


def llamacpp_tensor_flops(hw: Hardware) -> float:
    """FLOP/s the llama.cpp cuBLAS path can reach at most: FP16-accumulate dense rate x legacy fraction (arch)."""
    return hw.fp16_flops_acc16 * LEGACY_TENSOR_FRACTION.get(hw.arch, 1.0)


def _presets_with_sm_details() -> list[str]:
    return [n for n, h in HARDWARE.items() if h.sm_count > 0 and h.boost_clock_ghz > 0]


# ---------------------------------------------------------------------------------------------
# The law of one step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepLaw:
    """Seconds of a step as a function of its aggregates; constants per (runtime, card, model, format, tp).

    Per micro-batch (llama.cpp splits a step of more than `ubatch` tokens into micro-batches, each
    re-reading the weights; ubatch = 0: no split):
    fixed   = o_step + m_step + [tokens > dequant_above] * m_dequant + comm_step
    memory  = m_kv * kv_tokens + m_pair * pairs                 (plus the m_step / m_dequant above)
    compute = k_tok * new_tokens + k_seq * seqs + k_pair * pairs
    overlap = False (llama.cpp): total = fixed + memory + compute + o_seq * seqs + comm_tok * new_tokens
    overlap = True (vLLM):       total = o_step + o_seq * seqs + max(m_step + memory, compute)
                                         + comm_tok * new_tokens + comm_step
    kv_tokens = kv_read_tokens + new tokens (K/V read and written); pairs = causal (query, key) pairs.
    Coefficients in seconds per unit (s per step, per token, per sequence, per pair).
    """

    runtime: str
    m_step: float
    m_dequant: float
    dequant_above: int
    m_kv: float
    m_pair: float
    k_tok: float
    k_seq: float
    k_pair: float
    o_step: float
    o_seq: float
    comm_tok: float
    comm_step: float
    overlap: bool
    ubatch: int = 0

    def micro_batches(self, new: float) -> tuple[int, int]:
        """(micro-batches, how many of them dequantise) for a step of new tokens."""
        ub = self.ubatch
        if ub and new > ub:
            m = -(-int(new) // ub)
            last = new - (m - 1) * ub
            return m, (m - 1) * (ub > self.dequant_above) + (last > self.dequant_above)
        return 1, int(new > self.dequant_above)

    def _fixed(self, new: float) -> tuple[float, float, float]:
        """(overhead, weights incl. dequantisation, communication) fixed costs of a step of new tokens (s)."""
        m, n_deq = self.micro_batches(new)
        return m * self.o_step, m * self.m_step + n_deq * self.m_dequant, m * self.comm_step

    def terms(self, new: float, seqs: float, kv_tokens: float, pairs: float) -> tuple[float, float, float, float,
                                                                                       float, float]:
        """(weights, kv_reads, compute, communication, overhead, total) in seconds."""
        if new <= 0:
            return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        over, weights, comm = self._fixed(new)
        over += self.o_seq * seqs
        comm += self.comm_tok * new
        kv = self.m_kv * kv_tokens + self.m_pair * pairs
        comp = self.k_tok * new + self.k_seq * seqs + self.k_pair * pairs
        mem = weights + kv
        total = over + (max(mem, comp) if self.overlap else mem + comp) + comm
        return weights, kv, comp, comm, over, total

    def seconds(self, new: float, seqs: float, kv_tokens: float, pairs: float) -> float:
        """Total seconds of a step with new tokens, seqs sequences, kv_tokens K/V tokens touched, pairs (q, k) pairs."""
        if new <= 0:
            return 0.0
        if self.ubatch and new > self.ubatch:
            over, weights, comm = self._fixed(new)
        else:
            over, comm = self.o_step, self.comm_step
            weights = self.m_step + (self.m_dequant if new > self.dequant_above else 0.0)
        mem = weights + self.m_kv * kv_tokens + self.m_pair * pairs
        comp = self.k_tok * new + self.k_seq * seqs + self.k_pair * pairs
        body = (mem if mem >= comp else comp) if self.overlap else mem + comp
        return over + self.o_seq * seqs + body + self.comm_tok * new + comm

    def step_seconds(self, s: StepShape) -> float:
        """Seconds of one StepShape."""
        new = s.prefill_tokens + s.decode_seqs
        return self.seconds(new, s.prefill_seqs + s.decode_seqs, s.kv_read_tokens + new, s.attn_q_ctx)


def build_law(runtime: str, params: dict, hw: Hardware, model_cfg, weight_format: str = "fp16",
              kv_dtype: str = "fp16", tp: int = 1, ubatch: int = 512, field_prefix: str = "") -> StepLaw:
    """The StepLaw of runtime (with its fitted params) for model_cfg in weight_format on hw over tp devices.

    ubatch: llama.cpp's n_ubatch (tokens per micro-batch; a larger step runs as several, each
    re-reading the weights); ignored for vLLM, whose steps run whole.

    Raises ConfigError naming the field for an unknown runtime, a weight format the runtime cannot
    run (llama.cpp runs fp16/bf16 and gguf-*), hardware without the details the law needs, or bad tp.
    """
    check_runtime(runtime, field_prefix + "runtime")
    ph = StepPhysics(model_cfg, weight_format, kv_dtype, tp, field_prefix=field_prefix)
    fmt = ph.weight_format
    comm_tok = comm_step = 0.0
    if tp > 1:
        if hw.interconnect_bw <= 0:
            raise ConfigError(field_prefix + "tp", f"{hw.name} has no interconnect for tensor parallelism", "1")
        ring = 2.0 * (tp - 1) / tp  # as RooflineCostModel: ring all-reduce, one direction of the link
        link = hw.interconnect_bw_per_direction * DEFAULT_COMM_EFFICIENCY
        comm_tok = ph.allreduces_per_step * ring * ph.allreduce_bytes_per_token / link
        comm_step = ph.allreduces_per_step * hw.allreduce_latency_s
    if runtime == "llama.cpp":
        allowed = [n for n in formats.WEIGHT_FORMATS if n in ("fp16", "bf16") or n.startswith("gguf-")]
        if fmt.name not in allowed:
            raise ConfigError(field_prefix + "weight_format", f"llama.cpp does not run {fmt.name!r} weights",
                              ", ".join(allowed))
        bw = achieved_bandwidth(hw, params["bw_bytes_per_sm_clock"], params["bw_sharpness"])
        flops = llamacpp_tensor_flops(hw) * params["compute_efficiency"]
        quantised = fmt.name.startswith("gguf-")
        score_bytes = SCORE_BYTES * (model_cfg.num_heads / tp) * model_cfg.num_layers
        return StepLaw(
            runtime, m_step=ph.weight_bytes / bw,
            m_dequant=DEQUANT_BYTES_PER_PARAM * model_cfg.num_params / tp / bw if quantised else 0.0,
            dequant_above=MMQ_MAX_BATCH, m_kv=params["kv_read_factor"] * ph.kv_bytes_per_token / bw,
            m_pair=params["score_passes"] * score_bytes / bw,
            k_tok=ph.linear_flops_per_token / flops, k_seq=ph.head_flops_per_seq / flops,
            k_pair=ph.attn_flops_per_pair / flops, o_step=params["tau_layer_s"] * model_cfg.num_layers, o_seq=0.0,
            comm_tok=comm_tok, comm_step=comm_step, overlap=False,
            ubatch=_positive_int(ubatch, field_prefix + "ubatch"))
    bw = hw.memory_bw * params["bw_efficiency"]
    dtype = formats.compute_dtype(fmt, hw)
    lin = hw.peak_flops(dtype) * params["compute_efficiency"]
    attn = hw.peak_flops("bf16" if dtype == "bf16" else "fp16") * params["compute_efficiency"]
    return StepLaw(
        runtime, m_step=ph.weight_bytes / bw, m_dequant=0.0, dequant_above=1 << 62,
        m_kv=ph.kv_bytes_per_token / bw, m_pair=0.0, k_tok=ph.linear_flops_per_token / lin,
        k_seq=ph.head_flops_per_seq / lin, k_pair=ph.attn_flops_per_pair / attn,
        o_step=params["host_step_s"], o_seq=params["host_seq_s"], comm_tok=comm_tok, comm_step=comm_step,
        overlap=True)


# ---------------------------------------------------------------------------------------------
# Stored fit
# ---------------------------------------------------------------------------------------------


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be an integer >= 1, got {value!r}")
    return value


def load_fit(path: str | Path | None = None) -> dict:
    """The fitted parameters {runtime: {name: value}} from runtime_fit.json (FIT_PATH by default)."""
    p = Path(path) if path is not None else FIT_PATH
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError("runtime_fit", f"{p} not found; regenerate it with `{FIT_COMMAND}`") from None
    try:
        return {rt: {name: float(data[rt]["params"][name]) for name, _, _ in PARAM_SPECS[rt]} for rt in RUNTIMES}
    except (KeyError, TypeError, ValueError):
        raise ConfigError("runtime_fit", f"{p} lacks parameters for {', '.join(RUNTIMES)}; regenerate it with "
                                         f"`{FIT_COMMAND}`") from None
