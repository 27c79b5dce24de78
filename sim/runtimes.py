"""Runtime profiles: calibrated laws for how long llama.cpp's and vLLM's kernels take to run one step on a card.

The roofline (sim.costmodel.RooflineCostModel) prices every engine on every card with one
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

`python -m sim.runtimes fit` refits both laws on the rows and writes experiments/measured/runtime_fit.json;
`servesim measured` prints every row with its prediction, and the leave-one-GPU-out table.

Plain Python on the hot path (StepLaw.seconds); numpy for fitting only.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from reference.config import get_preset
from reference.errors import ConfigError
from sim import formats
from sim.costmodel import DEFAULT_COMM_EFFICIENCY, StepPhysics, StepShape
from sim.hardware import Hardware, get_hardware

RUNTIMES = ("llama.cpp", "vllm")
MEASURED_DIR = Path(__file__).resolve().parent.parent / "experiments" / "measured"
FIT_PATH = MEASURED_DIR / "runtime_fit.json"
FIT_COMMAND = "python -m sim.runtimes fit"

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
    from sim.hardware import HARDWARE
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


# ---------------------------------------------------------------------------------------------
# Measured rows
# ---------------------------------------------------------------------------------------------

#: The CSVs' gpu column (text before the first '(') -> hardware preset.
GPU_PRESETS = {
    "3090 24GB": "rtx-3090", "4090 24GB": "rtx-4090", "RTX A6000 48GB": "rtx-a6000",
    "A100 PCIe 80GB": "a100-pcie-80gb", "H100 PCIe 80GB": "h100-pcie",
    "NVIDIA GeForce RTX 4090": "rtx-4090", "NVIDIA GeForce RTX 3090 Ti": "rtx-3090-ti",
    "NVIDIA A100 80GB SXM": "a100-sxm-80gb",
    "NVIDIA A100 80GB": "a100-sxm-80gb",  # SGLang README: form factor not stated; SXM assumed
}
#: The CSVs' model column (prefix) -> model preset with the same shapes.
MODEL_PRESETS = (
    ("Meta-Llama-3-70B", "llama-3.1-70b"), ("Meta-Llama-3-8B", "llama-3.1-8b"), ("llama 8B", "llama-3.1-8b"),
    ("llama 7B", "llama-2-7b"), ("meta-llama/Meta-Llama-3-8B", "llama-3.1-8b"),
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
)
DTYPE_FORMATS = {"Q4_K_M": "gguf-q4_k_m", "F16": "fp16", "Q8_0": "gguf-q8_0", "Q4_0": "gguf-q4_0"}

#: vLLM serving rows that pin one step each, with the step they stand for (see the README):
#: LL-A100-10 median TPOT ~ a decode step at batch ~5 (10 requests at t=0, finishing one by one) at the
#: mid-generation context (mean input 137 + half the mean output 194); median TTFT ~ one prefill step
#: of all 10 prompts (1369 tokens; all ten TTFTs are within 1 ms of each other).
VLLM_TPOT_BATCH = 5
VLLM_TPOT_CONTEXT = 137 + 97
#: vLLM v0.6.0 release notes (blog.vllm.ai/2024/09/05/perf-update.html), for vLLM 0.5.3, Llama 3 8B on
#: 1 H100: "The HTTP API server takes 33% of the total execution time", "29% ... on scheduling",
#: "only 38% of the time was spent on the actual GPU execution". ASSUMED operating point (not stated
#: in the notes): a saturated server at vLLM's default max_num_seqs = 256, mid-generation context
#: 202 + 179 / 2 (the notes' ShareGPT averages: 202 input, 179 output tokens).
VLLM_BLOG_HOST_OVER_GPU = (33 + 29) / 38
VLLM_BLOG_BATCH = 256
VLLM_BLOG_CONTEXT = 202 + 179 // 2
VLLM_BW_EFFICIENCY = 1.0  # ASSUMED: one A100 TPOT cannot split host time from bandwidth shortfall


@dataclass(frozen=True)
class MeasuredRow:
    """One measured figure and what the law predicts for it.

    kind: tg (batch-1 decode tokens/s over n tokens from an empty context), pp (prompt tokens/s, n
    tokens in micro-batches of ubatch), tpot / ttft (ms, a vLLM serving run), serving (a vLLM serving
    run that needs the whole simulator; not predicted here). role: fit (used to fit), holdout (not
    used to fit; predicted), sim (left to the simulator).
    """

    row_id: str
    runtime: str
    hardware: str
    model: str
    weight_format: str
    kind: str
    n: int
    ubatch: int
    measured: float
    unit: str
    role: str
    precision: str
    source_url: str
    note: str = ""

    @property
    def test(self) -> str:
        """Short label: tg512, pp512@ub64, tpot, ..."""
        if self.kind in ("tg", "pp"):
            return f"{self.kind}{self.n}" + (f"@ub{self.ubatch}" if self.ubatch != 512 else "")
        return self.kind


def _gpu_preset(text: str) -> str:
    key = text.split("(")[0].strip()
    if key not in GPU_PRESETS:
        raise ConfigError("measured.gpu", f"no hardware preset for {text!r}", ", ".join(GPU_PRESETS))
    return GPU_PRESETS[key]


def _model_preset(text: str) -> str:
    for prefix, preset in MODEL_PRESETS:
        if text.startswith(prefix):
            return preset
    raise ConfigError("measured.model", f"no model preset for {text!r}", ", ".join(p for p, _ in MODEL_PRESETS))


def load_rows(measured_dir: str | Path | None = None) -> list[MeasuredRow]:
    """Every row of llamacpp.csv and vllm.csv with its role (see experiments/measured/README.md)."""
    d = Path(measured_dir) if measured_dir is not None else MEASURED_DIR
    rows = []
    with open(d / "llamacpp.csv", newline="") as f:
        for r in csv.DictReader(f):
            test = r["test"]
            kind, n = test[:2], int(test[2:])
            ub = 512
            if r["row_id"].startswith("LC7676"):
                ub = int(r["microbatch_or_B"].split()[0])
            role = "fit" if r["row_id"].startswith("XD-") else "holdout"
            rows.append(MeasuredRow(r["row_id"], "llama.cpp", _gpu_preset(r["gpu"]), _model_preset(r["model"]),
                                    DTYPE_FORMATS[r["weight_dtype"]], kind, n, ub, float(r["tokens_per_s"]),
                                    "tok/s", role, r["precision"], r["source_url"]))
    with open(d / "vllm.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["engine"] != "vllm":
                continue
            hw, model = _gpu_preset(r["gpu"]), _model_preset(r["model"])
            common = dict(runtime="vllm", hardware=hw, model=model, weight_format="bf16", ubatch=0,
                          precision=r["precision"], source_url=r["source_url"])
            if r["row_id"] == "LL-A100-10":
                n_in = int(float(r["total_input_tokens"]))
                rows.append(MeasuredRow(r["row_id"] + ":median_tpot", kind="tpot", n=VLLM_TPOT_BATCH,
                                        measured=float(r["median_tpot_ms"]), unit="ms", role="fit",
                                        note=f"decode step, batch {VLLM_TPOT_BATCH}, context {VLLM_TPOT_CONTEXT}",
                                        **common))
                rows.append(MeasuredRow(r["row_id"] + ":median_ttft", kind="ttft", n=n_in,
                                        measured=float(r["median_ttft_ms"]), unit="ms", role="fit",
                                        note=f"one prefill step, {n_in} tokens in {r['num_prompts']} prompts",
                                        **common))
            else:
                what = ("output tok/s" if r["output_tok_s"] else "median TPOT ms")
                value = float(r["output_tok_s"] or r["median_tpot_ms"])
                rows.append(MeasuredRow(r["row_id"], kind="serving", n=int(r["num_prompts"]), measured=value,
                                        unit=what, role="sim",
                                        note="needs the whole simulator (scheduler, arrivals); left to the lead",
                                        **common))
    return rows


# ---------------------------------------------------------------------------------------------
# Predictions of rows
# ---------------------------------------------------------------------------------------------


def _law(runtime: str, params: dict, row_or_hw, model: str, weight_format: str) -> StepLaw:
    hw = row_or_hw if isinstance(row_or_hw, Hardware) else get_hardware(row_or_hw)
    return build_law(runtime, params, hw, get_preset(model), weight_format)


def predict_tg(law: StepLaw, n_gen: int) -> float:
    """tok/s of llama-bench tgN: n_gen tokens at batch 1 from an empty context (mean of a law linear in context)."""
    c = (n_gen + 1) / 2.0  # mean context after each step, 1..n_gen
    return 1.0 / law.seconds(1, 1, c + 1, c)


def predict_pp(law: StepLaw, n_prompt: int, ubatch: int = 512) -> float:
    """tok/s of llama-bench ppN: n_prompt tokens processed in micro-batches of ubatch (logits for the last only)."""
    total = 0.0
    done = 0
    while done < n_prompt:
        n = min(ubatch, n_prompt - done)
        s = StepShape.prefill(n, done)
        total += law.seconds(n, 1, s.kv_read_tokens + n, s.attn_q_ctx)
        done += n
    return n_prompt / total


def predict_row(row: MeasuredRow, fit: dict) -> float | None:
    """What the runtime law with fit predicts for row (tok/s or ms), or None for rows left to the simulator."""
    if row.kind == "serving":
        return None
    law = _law(row.runtime, fit[row.runtime], row.hardware, row.model, row.weight_format)
    if row.kind == "tg":
        return predict_tg(law, row.n)
    if row.kind == "pp":
        return predict_pp(law, row.n, row.ubatch)
    if row.kind == "tpot":
        s = StepShape.decode(row.n, VLLM_TPOT_CONTEXT)
        return 1e3 * law.step_seconds(s)
    if row.kind == "ttft":
        seqs = 10
        per = row.n / seqs  # mean prompt; attention is <1% of this step
        s = StepShape.prefill(int(round(per)), 0, seqs)
        return 1e3 * law.seconds(row.n, seqs, row.n + row.n, s.attn_q_ctx)
    raise ConfigError("measured.kind", f"unknown row kind {row.kind!r}", "tg, pp, tpot, ttft, serving")


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------

LLAMACPP_INIT = {"tau_layer_s": 8e-5, "bw_bytes_per_sm_clock": 7.0, "bw_sharpness": 3.0, "kv_read_factor": 3.0,
                 "score_passes": 5.0, "compute_efficiency": 0.5}


def _levenberg_marquardt(residuals, x0, max_iter: int = 200):
    """Minimise ||residuals(x)||^2 from x0 (numpy, deterministic; central-difference Jacobian)."""
    import numpy as np

    x = np.asarray(x0, dtype=float)
    r = residuals(x)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        jac = np.empty((r.size, x.size))
        for j in range(x.size):
            h = 1e-6 * max(1.0, abs(x[j]))
            e = np.zeros_like(x)
            e[j] = h
            jac[:, j] = (residuals(x + e) - residuals(x - e)) / (2 * h)
        a = jac.T @ jac
        g = jac.T @ r
        improved = False
        while lam < 1e12:
            step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
            r_new = residuals(x + step)
            c_new = float(r_new @ r_new)
            if c_new < cost:
                improved = True
                done = cost - c_new < 1e-13 * max(cost, 1e-30)
                x, r, cost = x + step, r_new, c_new
                lam = max(lam / 3.0, 1e-12)
                break
            lam *= 4.0
        if not improved or done:
            break
    return x, cost


def fit_llamacpp(rows: list[MeasuredRow]) -> dict:
    """Least squares on log(predicted / measured) over rows (llama.cpp tg/pp rows); parameters in log space."""
    import numpy as np

    names = [n for n, _, _ in LLAMACPP_PARAMS]
    rows = [r for r in rows if r.runtime == "llama.cpp" and r.kind in ("tg", "pp")]
    if not rows:
        raise ConfigError("measured", "no llama.cpp rows to fit")
    measured = np.log([r.measured for r in rows])

    def residuals(v):
        params = dict(zip(names, np.exp(v)))
        return np.log([predict_row(r, {"llama.cpp": params}) for r in rows]) - measured

    v, _ = _levenberg_marquardt(residuals, np.log([LLAMACPP_INIT[n] for n in names]))
    return {n: float(x) for n, x in zip(names, np.exp(v))}


def vllm_blog_gpu_seconds(params: dict) -> float:
    """Seconds of the GPU part of the release notes' step (H100 SXM, Llama-3-8B bf16, batch 256) under params."""
    law = build_law("vllm", {**params, "host_step_s": 0.0, "host_seq_s": 0.0}, get_hardware("h100-sxm"),
                    get_preset("llama-3.1-8b"), "bf16")
    return law.step_seconds(StepShape.decode(VLLM_BLOG_BATCH, VLLM_BLOG_CONTEXT))


def fit_vllm(rows: list[MeasuredRow]) -> dict:
    """Solve host_step_s, host_seq_s, compute_efficiency from the TPOT and TTFT rows and the release notes.

    Three numbers, three unknowns (bw_efficiency fixed at VLLM_BW_EFFICIENCY): exact, no residual.
    Fixed-point iteration: host_step from TPOT, compute_efficiency from TTFT, host_seq from the notes.
    """
    by_kind = {r.kind: r for r in rows if r.runtime == "vllm" and r.role == "fit"}
    if set(by_kind) != {"tpot", "ttft"}:
        raise ConfigError("measured", "vLLM fit needs the LL-A100-10 median TPOT and TTFT rows")
    tpot, ttft = by_kind["tpot"], by_kind["ttft"]
    p = {"host_step_s": 0.0, "host_seq_s": 0.0, "bw_efficiency": VLLM_BW_EFFICIENCY, "compute_efficiency": 0.5}
    for _ in range(200):
        old = dict(p)
        zero_host = {**p, "host_step_s": 0.0, "host_seq_s": 0.0}
        # TPOT: decode step = host_step + host_seq * b + GPU(b)
        gpu_tpot = predict_row(tpot, {"vllm": zero_host}) / 1e3
        p["host_step_s"] = max(0.0, tpot.measured / 1e3 - gpu_tpot - p["host_seq_s"] * tpot.n)
        # TTFT: prefill step = host_step + host_seq * 10 + compute(eff); solve eff by bisection (monotone)
        lo, hi = 1e-3, 1.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            t = predict_row(ttft, {"vllm": {**p, "compute_efficiency": mid}}) / 1e3
            lo, hi = (lo, mid) if t < ttft.measured / 1e3 else (mid, hi)
        p["compute_efficiency"] = 0.5 * (lo + hi)
        # release notes: host = (62/38) x GPU at the assumed operating point
        host = VLLM_BLOG_HOST_OVER_GPU * vllm_blog_gpu_seconds(p)
        p["host_seq_s"] = max(0.0, (host - p["host_step_s"]) / VLLM_BLOG_BATCH)
        if all(abs(p[k] - old[k]) <= 1e-12 * max(1.0, abs(old[k])) for k in p):
            break
    return {k: float(v) for k, v in p.items()}


def fit_all(rows: list[MeasuredRow] | None = None) -> dict:
    """Both runtimes' parameters fitted on the fit rows: {runtime: {name: value}}."""
    rows = load_rows() if rows is None else rows
    fit_rows = [r for r in rows if r.role == "fit"]
    return {"llama.cpp": fit_llamacpp(fit_rows), "vllm": fit_vllm(fit_rows)}


def leave_one_gpu_out(rows: list[MeasuredRow] | None = None) -> list[dict]:
    """llama.cpp: for each card among the fit rows, refit without it and predict its rows.

    Returns one dict per predicted row: row_id, hardware, test, measured, predicted, error (relative).
    vLLM has one card: no leave-one-GPU-out.
    """
    rows = load_rows() if rows is None else rows
    fit_rows = [r for r in rows if r.role == "fit" and r.runtime == "llama.cpp"]
    out = []
    for hw in sorted({r.hardware for r in fit_rows}):
        params = fit_llamacpp([r for r in fit_rows if r.hardware != hw])
        for r in fit_rows:
            if r.hardware == hw:
                pred = predict_row(r, {"llama.cpp": params})
                out.append(dict(row_id=r.row_id, hardware=hw, kind=r.kind, test=r.test, measured=r.measured,
                                predicted=pred, error=pred / r.measured - 1.0))
    return out


def evaluate(fit: dict, rows: list[MeasuredRow] | None = None) -> list[dict]:
    """Every row with its prediction under fit: row_id, runtime, role, hardware, model, format, test, measured,
    predicted (None for simulator rows), error (relative, None if not predicted), unit, precision, note."""
    rows = load_rows() if rows is None else rows
    out = []
    for r in rows:
        pred = predict_row(r, fit)
        out.append(dict(row_id=r.row_id, runtime=r.runtime, role=r.role, hardware=r.hardware, model=r.model,
                        weight_format=r.weight_format, kind=r.kind, test=r.test, measured=r.measured,
                        predicted=pred, error=None if pred is None else pred / r.measured - 1.0, unit=r.unit,
                        precision=r.precision, note=r.note))
    return out


def summarize(results: list[dict], by=("runtime", "role", "kind")) -> list[dict]:
    """Median and max |error| and row count per group (rows with a prediction only)."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        if r.get("error") is None:
            continue
        groups.setdefault(tuple(r[k] for k in by), []).append(abs(r["error"]))
    out = []
    for key in sorted(groups):
        errs = sorted(groups[key])
        mid = len(errs) // 2
        median = errs[mid] if len(errs) % 2 else 0.5 * (errs[mid - 1] + errs[mid])
        out.append({**dict(zip(by, key)), "rows": len(errs), "median_abs_error": median, "max_abs_error": errs[-1]})
    return out


def write_fit(path: str | Path | None = None, rows: list[MeasuredRow] | None = None) -> dict:
    """Fit both runtimes and write runtime_fit.json (parameters with units and meaning, fixed constants, rows)."""
    rows = load_rows() if rows is None else rows
    fit = fit_all(rows)
    fit_rows = [r for r in rows if r.role == "fit"]
    doc = {"generated_by": FIT_COMMAND, "data": "experiments/measured/llamacpp.csv, experiments/measured/vllm.csv"}
    for rt in RUNTIMES:
        doc[rt] = {
            "params": fit[rt],
            "units": {n: u for n, u, _ in PARAM_SPECS[rt]},
            "meaning": {n: m for n, _, m in PARAM_SPECS[rt]},
            "fit_rows": [r.row_id for r in fit_rows if r.runtime == rt],
        }
    doc["llama.cpp"]["fixed"] = {"dequant_bytes_per_param": DEQUANT_BYTES_PER_PARAM, "mmq_max_batch": MMQ_MAX_BATCH,
                                 "legacy_tensor_fraction": LEGACY_TENSOR_FRACTION, "score_bytes": SCORE_BYTES}
    doc["vllm"]["fixed"] = {"bw_efficiency": VLLM_BW_EFFICIENCY, "blog_host_over_gpu": VLLM_BLOG_HOST_OVER_GPU,
                            "blog_batch": VLLM_BLOG_BATCH, "blog_context": VLLM_BLOG_CONTEXT,
                            "tpot_batch": VLLM_TPOT_BATCH, "tpot_context": VLLM_TPOT_CONTEXT}
    p = Path(path) if path is not None else FIT_PATH
    p.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return fit


def main(argv: list[str] | None = None) -> int:
    """`python -m sim.runtimes fit [PATH]`: refit both runtime laws and write runtime_fit.json."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "fit" or len(argv) > 2:
        print(f"usage: {FIT_COMMAND} [PATH]   (default {FIT_PATH})", file=sys.stderr)
        return 2
    fit = write_fit(argv[1] if len(argv) == 2 else None)
    for rt in RUNTIMES:
        print(rt + ": " + ", ".join(f"{k}={v:.6g}" for k, v in fit[rt].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
