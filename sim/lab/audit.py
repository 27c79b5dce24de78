"""Hold published throughput, latency and memory figures against the physics of their hardware.

Whatever an engine does, a decode step reads every weight once and the K/V of every sequence in
the batch once, and a token costs about 2 x params FLOPs. So for a model stored in a given weight
format on a given device (datasheet peaks, efficiency 1.0, nothing else charged):

    output tok/s of B streams  <= B x BW / (W + B x ctx x kv)           (memory)
                               <= peak x out / flops(prompt + out)      (compute)
    TTFT                       >= max(W / BW, prefill FLOPs / peak)     (one prompt, alone)
    TPOT, ITL                  >= W / BW                                (one decode step)
    E2EL                       >= TTFT bound + (out - 1) x TPOT bound
    mean E2EL of N clients     >= N x out / R_N - Z                     (queueing: Little's law, below)
    VRAM                       >= W                                     (the weights must be resident)
    max concurrent             <= min((memory - W) / (tokens per request x kv), max_num_seqs)

W = weight bytes (sim.core.formats: the format's bits, embeddings as checkpoints store them), BW =
memory bandwidth, kv = K/V bytes per token, ctx = the mean context a decode step reads over a
request's life (prompt + (out + 1) / 2), B = concurrent streams (closed-loop clients; for an
open-loop cell, the engine's largest batch). Lengths are the workload's means for throughputs and
mean latencies, and its shortest request's for medians and percentiles (which the shortest
requests can set when lengths vary). A published figure on the wrong side of its bound
is physically implausible: it cannot be reproduced by any engine on that hardware, and a
simulation that "reproduces" it is wrong. (max_num_seqs in the concurrency bound is the engine's
own flag, not physics: a figure past it contradicts the article's stated configuration.)

Queueing bounds (closed loop: N clients, each sending its next request Z seconds of think time
after the last one ends; requests of out output tokens):

- Lower (physics). Little's law for the closed system, X = N / (E2E + Z) with X in requests/s,
  and X <= R_N / out where R_N is the output-throughput bound above at N streams, give
  mean E2E >= N x out / R_N - Z. It bounds the mean only (percentiles can lie on either side).
- Upper (the article's own single-user figure). A server that answers one request alone in S_1
  seconds (a published single-client E2E, or out / X_1 - Z from a published single-client
  throughput X_1), that is work-conserving, serves requests first-come-first-served or in shared
  steps, and whose total output rate does not drop when it holds more requests (batching never
  slows it down), holds at most N requests of equal length, so every request ends within
  N x S_1 of being sent: any E2E (and so any TTFT) <= N x S_1, and the throughput of N clients
  X_N = N x out / (E2E + Z) >= N x out / (N x S_1 + Z) (= X_1 when Z = 0). A published figure
  past it contradicts the article's single-user figure unless the server slows down under load
  (CPU offload, swapping, throttling); `queueing_checks` lists such figures.

`servesim audit CONFIG.toml` prints, per published figure, the bound and its arithmetic, e.g.
"a single Llama-3.1-8B FP16 stream cannot exceed 3.35 TB/s / 16.09 GB = 208 tok/s".

Plain Python, no JAX.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reference.config import ModelConfig
from sim.core import formats
from sim.core.costmodel import StepPhysics
from sim.core.hardware import Hardware
from sim.lab.experiment import EngineConfig, Experiment, SequentialEngine
from sim.lab.workload import read_trace

THROUGHPUT_METRICS = {"output_throughput": "output", "total_token_throughput": "total",
                      "request_throughput": "requests"}
LATENCY_PREFIXES = ("mean_", "median_", "p90_", "p95_", "p99_", "max_")


@dataclass(frozen=True)
class Bound:
    """A physical limit on one figure: published must be <= value (upper) or >= value (lower)."""

    kind: str  # "upper" | "lower"
    value: float  # in the figure's unit
    unit: str
    arithmetic: str  # how the limit follows from the datasheet, in words and numbers
    binding: str = ""  # which resource sets it: memory, compute, capacity

    def violated_by(self, published: float) -> bool:
        """True when published lies beyond the limit (more than 0.5% past it, for rounding)."""
        if published is None or not math.isfinite(published):
            return False
        if self.kind == "upper":
            return published > self.value * 1.005
        return published < self.value / 1.005

    def factor(self, published: float) -> float:
        """How far past the bound published is (> 1 when violated), or how close (< 1)."""
        if self.kind == "upper":
            return published / self.value
        return self.value / published if published > 0 else math.inf

    def describe(self, published: float | None, unit: str | None = None) -> str:
        """The arithmetic plus the published figure's place: 'published 510 tok/s is 2.4x above'."""
        if published is None or not math.isfinite(published):
            return self.arithmetic
        u = unit or self.unit
        pub = f"published {fmt_num(published)} {u}"
        f = self.factor(published)
        if self.violated_by(published):
            word = "above" if self.kind == "upper" else "below"
            what = "it contradicts the engine's stated configuration" if self.binding == "config" else \
                "physically implausible"
            return f"{self.arithmetic}; {pub} is {f:.1f}x {word} it: {what}"
        if self.kind == "upper":
            return f"{self.arithmetic}; {pub} is {100 * f:.0f}% of the bound"
        return f"{self.arithmetic}; {pub} is {1 / f:.1f}x the bound"


# ---------------------------------------------------------------------------------------
# Formatting

def fmt_num(x: float) -> str:
    """A number as a person writes it: 1,450 / 209 / 35.2 / 0.031."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}".rstrip("0").rstrip(".")
    if ax >= 1:
        return f"{x:.2f}".rstrip("0").rstrip(".")
    return f"{x:.3g}"


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def _bw(bps: float) -> str:
    return f"{bps / 1e12:.3g} TB/s" if bps >= 1e12 else f"{bps / 1e9:.3g} GB/s"


def _flops(f: float) -> str:
    return f"{f / 1e12:,.0f} TFLOP/s"


def model_label(name: str) -> str:
    """'llama-3.1-8b' -> 'Llama-3.1-8B'."""
    parts = name.split("-")
    out = []
    for p in parts:
        if p[:-1].replace(".", "").isdigit() and p[-1] in "bm":
            out.append(p[:-1] + p[-1].upper())
        else:
            out.append(p[:1].upper() + p[1:])
    return "-".join(out)


def format_label(weights: str) -> str:
    """'gguf-q4_k_m' -> 'Q4_K_M', 'fp16' -> 'FP16'."""
    return weights.removeprefix("gguf-").upper()


# ---------------------------------------------------------------------------------------
# The physics of one (model, weight format, KV dtype, hardware, tp)

@dataclass(frozen=True)
class Physics:
    """Datasheet-peak costs of one model stored one way on one device (tp devices together)."""

    model: ModelConfig
    hardware: Hardware
    weights: str
    kv_dtype: str
    tp: int = 1

    @property
    def _ph(self) -> StepPhysics:
        return StepPhysics(self.model, self.weights, self.kv_dtype, self.tp)

    @property
    def weight_bytes(self) -> float:
        """All weights, all devices (bytes)."""
        return float(formats.weight_bytes(self.model, self.weights))

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token, all layers, all devices (bytes)."""
        return float(self.model.kv_bytes_per_token(formats.get_kv_dtype(self.kv_dtype).bytes_per_element))

    @property
    def bandwidth(self) -> float:
        """Memory bandwidth of the tp devices together (B/s)."""
        return self.hardware.memory_bw * self.tp

    @property
    def compute_dtype(self) -> str:
        return formats.compute_dtype(self.weights, self.hardware)

    @property
    def peak_flops(self) -> float:
        """Dense peak of the matmul dtype, tp devices together (FLOP/s)."""
        return self.hardware.peak_flops(self.compute_dtype) * self.tp

    @property
    def capacity_bytes(self) -> float:
        return float(self.hardware.memory_bytes * self.tp)

    def request_flops(self, prompt: float, output: float) -> float:
        """Matmul FLOPs of one request (all tokens through the layers, LM head where it samples)."""
        ph = self._ph
        per_token = ph.linear_flops_per_token * self.tp
        head = ph.head_flops_per_seq * self.tp
        return (prompt + output) * per_token + output * head

    @property
    def what(self) -> str:
        """'Llama-3.1-8B FP16 on h100-sxm'."""
        tp = f" x{self.tp}" if self.tp > 1 else ""
        return f"{model_label(self.model.name)} {format_label(self.weights)} on {self.hardware.name}{tp}"

    # ---- bounds --------------------------------------------------------------------------
    def output_throughput_bound(self, streams: int, prompt: float, output: float) -> Bound:
        """Most output tok/s that `streams` concurrent requests of these lengths can reach."""
        W, kv, BW = self.weight_bytes, self.kv_bytes_per_token, self.bandwidth
        ctx = prompt + (output + 1) / 2
        step_bytes = W + streams * ctx * kv
        mem = streams * BW / step_bytes
        per_out = self.request_flops(prompt, output) / output
        comp = self.peak_flops / per_out
        name = model_label(self.model.name) + " " + format_label(self.weights)
        if streams == 1:
            mem_text = (f"a single {name} stream cannot exceed {_bw(BW)} / {_gb(step_bytes)} "
                        f"({_gb(W)} weights + {_gb(ctx * kv)} KV at {ctx:.0f} tokens) = {fmt_num(mem)} tok/s")
        else:
            mem_text = (f"{streams} concurrent {name} streams cannot exceed {streams} x {_bw(BW)} / "
                        f"({_gb(W)} weights + {streams} x {_gb(ctx * kv)} KV at {ctx:.0f} tokens) = "
                        f"{fmt_num(mem)} tok/s")
        comp_text = (f"compute: {_flops(self.peak_flops)} {self.compute_dtype} / {per_out / 1e9:.1f} GFLOP "
                     f"per output token = {fmt_num(comp)} tok/s")
        if mem <= comp:
            return Bound("upper", mem, "tok/s", f"{mem_text} (memory; {comp_text})", "memory")
        return Bound("upper", comp, "tok/s", f"{comp_text} (compute; {mem_text})", "compute")

    def ttft_bound_s(self, prompt: float) -> Bound:
        """Least time to the first token of one prompt on an idle device (s)."""
        W, BW = self.weight_bytes, self.bandwidth
        t_mem = W / BW
        fl = self.request_flops(prompt, 1)
        t_comp = fl / self.peak_flops
        text = (f"a first token of {model_label(self.model.name)} {format_label(self.weights)} needs the weights "
                f"read once: {_gb(W)} / {_bw(BW)} = {t_mem * 1e3:.2f} ms, and the prompt's {prompt:.0f} tokens "
                f"computed: {fl / 1e12:.2f} TFLOP / {_flops(self.peak_flops)} = {t_comp * 1e3:.2f} ms")
        return Bound("lower", max(t_mem, t_comp), "s", text, "memory" if t_mem >= t_comp else "compute")

    def step_bound_s(self) -> Bound:
        """Least time of one decode step (s): the weights read once."""
        W, BW = self.weight_bytes, self.bandwidth
        t = W / BW
        return Bound("lower", t, "s", f"a decode step reads the weights once: {_gb(W)} / {_bw(BW)} = "
                                      f"{t * 1e3:.2f} ms", "memory")


# ---------------------------------------------------------------------------------------
# Workload shape as the audit sees it

def _trace_lengths(exp: Experiment) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of the trace rows a trace workload replays (its first num_requests)."""
    w = exp.workload
    _, prompt, output = read_trace(w.path)
    n = w.num_requests or len(prompt)
    return prompt[:n], output[:n]


def _prefix(exp: Experiment, always: bool = False) -> float:
    sp = exp.workload.shared_prefix
    if sp is None:
        return 0.0
    return float(sp.tokens) if sp.fraction == 1.0 else (0.0 if always else sp.fraction * sp.tokens)


def mean_lengths(exp: Experiment, samples: int = 4096) -> tuple[float, float]:
    """Mean prompt and output tokens of the experiment's requests (shared prefix included; a trace's replayed rows)."""
    if exp.workload.kind == "trace":
        prompt, output = _trace_lengths(exp)
        return float(np.mean(prompt)) + _prefix(exp), float(np.mean(output))
    return exp.workload.mean_lengths(samples)


def min_lengths(exp: Experiment) -> tuple[float, float]:
    """The fewest prompt and output tokens any request has (bounds on medians and percentiles use these)."""
    w = exp.workload
    if w.kind == "trace":
        prompt, output = _trace_lengths(exp)
        return float(prompt.min()) + _prefix(exp, always=True), float(output.min())
    return float(w.prompt_tokens.min_value) + _prefix(exp, always=True), float(w.output_tokens.min_value)


def physics_for(exp: Experiment, engine: EngineConfig) -> Physics | None:
    """The physics of the engine's weights on the experiment's hardware, or None without a device."""
    hw = exp.hardware_model
    if hw is None:
        return None
    return Physics(exp.model_spec, hw, engine.weights, engine.kv_dtype, exp.hardware.tp * exp.hardware.replicas)


def _latency_kind(metric: str) -> tuple[str, str] | None:
    """('ttft' | 'tpot' | 'itl' | 'e2el' | 'norm', unit) of a latency metric name, else None."""
    if metric == "mean_normalized_latency_s":
        return "norm", "s"
    for p in LATENCY_PREFIXES:
        if metric.startswith(p) and metric.endswith("_ms"):
            kind = metric[len(p):-3]
            if kind in ("ttft", "tpot", "itl", "e2el"):
                return kind, "ms"
    return None


def bound_for(exp: Experiment, metric: str, engine: str, concurrency: int | None = None,
              request_rate: float | None = None, tokens_per_request: int | None = None) -> Bound | None:
    """The physical limit on a figure of `metric` for `engine` in a cell of exp, or None when none applies.

    Throughputs get an upper bound, latencies a lower bound, VRAM a lower bound (the weights),
    max_concurrent an upper bound (memory over KV per request). Ratios and rates between engines
    have none.
    """
    eng = exp.engine(engine)
    ph = physics_for(exp, eng)
    if ph is None:
        return None
    prompt, output = mean_lengths(exp)
    if metric in THROUGHPUT_METRICS:
        streams = concurrency if concurrency is not None else eng.max_batch
        b = ph.output_throughput_bound(streams, prompt, output)
        kind = THROUGHPUT_METRICS[metric]
        if kind == "output":
            return b
        if kind == "total":
            f = (prompt + output) / output
            return Bound("upper", b.value * f, "tok/s", f"{b.arithmetic}; x (prompt + output) / output = "
                         f"{f:.2f} for all tokens = {fmt_num(b.value * f)} tok/s", b.binding)
        return Bound("upper", b.value / output, "req/s", f"{b.arithmetic}; / {output:.0f} output tokens per "
                     f"request = {fmt_num(b.value / output)} req/s", b.binding)
    lat = _latency_kind(metric)
    if lat is not None:
        kind, unit = lat
        scale = 1e3 if unit == "ms" else 1.0
        if not metric.startswith("mean_") and kind != "norm":
            # A median or percentile can be set by the shortest requests: bound every request, with the fewest
            # tokens any has (means are bounded at the mean lengths: the bounds are linear or convex in them).
            prompt, output = min_lengths(exp)
        ttft, step = ph.ttft_bound_s(prompt), ph.step_bound_s()
        if kind == "ttft":
            return Bound("lower", ttft.value * scale, unit, ttft.arithmetic + f" -> TTFT >= "
                         f"{fmt_num(ttft.value * scale)} {unit}", ttft.binding)
        if kind in ("tpot", "itl"):
            return Bound("lower", step.value * scale, unit, step.arithmetic + f" -> {kind.upper()} >= "
                         f"{fmt_num(step.value * scale)} {unit}", "memory")
        e2e = ttft.value + (output - 1) * step.value
        if kind == "e2el":
            queue = _little_bound(exp, ph, metric, concurrency, prompt, output)
            if queue is not None and queue[0] > e2e:
                return Bound("lower", queue[0] * scale, unit, queue[1] + f" -> mean E2EL >= "
                             f"{fmt_num(queue[0] * scale)} {unit}", "queueing")
            return Bound("lower", e2e * scale, unit, f"TTFT >= {ttft.value * 1e3:.2f} ms plus {output - 1:.0f} "
                         f"decode steps >= {step.value * 1e3:.2f} ms each ({ph.what}) -> E2EL >= "
                         f"{fmt_num(e2e * scale)} {unit}", "memory")
        return Bound("lower", e2e / output, "s", f"E2EL >= {e2e:.3f} s over {output:.0f} output tokens -> "
                     f">= {e2e / output:.4f} s per token ({ph.what})", "memory")
    if metric.startswith("vram_") or metric == "weights_gb":
        return Bound("lower", ph.weight_bytes / 1e9, "GB", f"{ph.what}: the weights alone take "
                     f"{_gb(ph.weight_bytes)}", "capacity")
    if metric == "max_concurrent":
        tokens = tokens_per_request or round(prompt + output)
        free = ph.capacity_bytes - ph.weight_bytes
        n = free / (tokens * ph.kv_bytes_per_token)
        text = (f"({ph.capacity_bytes / 1e9:.1f} GB - {_gb(ph.weight_bytes)} weights) / ({tokens} tokens x "
                f"{ph.kv_bytes_per_token / 1e3:.0f} KB KV per token) = {n:,.0f} requests of {tokens} tokens")
        if not isinstance(eng, SequentialEngine) and eng.max_batch < n:  # the engine's own cap on running requests
            key = "max_num_seqs" if hasattr(eng, "max_num_seqs") else "max_batch_size"
            return Bound("upper", float(eng.max_batch), "requests", f"{text}, but the engine's own {key} = "
                         f"{eng.max_batch} caps the requests it runs at once", "config")
        return Bound("upper", n, "requests", text, "capacity")
    return None


def _little_bound(exp: Experiment, ph: Physics, metric: str, concurrency: int | None, prompt: float,
                  output: float) -> tuple[float, str] | None:
    """(seconds, arithmetic) of Little's-law lower bound on the mean E2E of a closed-loop cell, or None.

    X = N / (E2E + Z) and X <= R_N / out  =>  mean E2E >= N x out / R_N - Z.
    """
    if not metric.startswith("mean_") or concurrency is None or not exp.workload.is_closed_loop:
        return None
    n, z = concurrency, exp.workload.think_time_s
    r = ph.output_throughput_bound(n, prompt, output).value
    q = n * output / r - z
    return q, (f"Little's law for {n} closed-loop clients with {fmt_num(z)} s think time: X = N / (E2E + Z) "
               f"requests/s and X <= R / out with R = {fmt_num(r)} tok/s (the bound at {n} streams), so mean E2E "
               f">= N x out / R - Z = {n} x {output:.0f} / {fmt_num(r)} - {fmt_num(z)} = {q:.3g} s")


# ---------------------------------------------------------------------------------------
# The audit of a whole config

@dataclass(frozen=True)
class AuditRow:
    """One published figure against its limit."""

    id: str
    claim: str
    engine: str
    cell: str
    metric: str
    published: float | None
    unit: str
    bound: Bound | None

    @property
    def implausible(self) -> bool:
        return self.bound is not None and self.published is not None and self.bound.violated_by(self.published)

    @property
    def text(self) -> str:
        if self.bound is None:
            return "no physical bound applies"
        return self.bound.describe(self.published, self.unit)


def figure_bound(exp: Experiment, f) -> Bound | None:
    """The physical bound on a published figure (sim.lab.claims.Figure) in its unit, or None (ratios, no device)."""
    if not f.audit or f.ratio_to is not None:
        return None
    b = bound_for(exp, f.metric, f.engine, f.concurrency, f.rate, f.tokens_per_request)
    return in_unit(b, f.unit) if b is not None else None


def audit_experiment(exp: Experiment, figures, exp_of=None) -> list[AuditRow]:
    """Every published figure (sim.lab.claims.Figure, parsed from exp) held against its physical limit.

    exp_of(figure): the experiment a figure is measured in (a variant of exp); default exp.
    Figures without a bound are included, with none.
    """
    rows = []
    for f in figures:
        b = figure_bound(exp_of(f) if exp_of else exp, f)
        rows.append(AuditRow(f.id, f.claim, f.engine, f.cell_label, f.metric, f.point_value, f.unit, b))
    return rows


# ---------------------------------------------------------------------------------------
# Queueing: a published figure under load against the same article's single-user figure

@dataclass(frozen=True)
class QueueCheck:
    """A published figure at N clients against N x S_1 (S_1 from the reference figure at one client)."""

    id: str
    ref: str  # the single-client published figure S_1 comes from
    kind: str  # "upper" (latency <= value) | "lower" (throughput >= value)
    value: float  # in the figure's unit
    unit: str
    edge: float  # the published figure's value nearest the bound
    text: str

    @property
    def violated(self) -> bool:
        if self.kind == "upper":
            return self.edge > self.value * 1.005
        return self.edge < self.value / 1.005


_LATENCY_SCALE = {"ms": 1e-3, "s": 1.0}


def _single_client_seconds(figures, engine: str, output: float, think: float):
    """(S_1 seconds, figure id) from a published single-client E2E or throughput of engine, or None."""
    for f in figures:
        if f.engine == engine and f.concurrency == 1 and f.ratio_to is None and f.op == "~" and not f.is_range \
                and not f.settings:
            if f.metric == "mean_e2el_ms" and f.unit in _LATENCY_SCALE:
                return f.value * _LATENCY_SCALE[f.unit], f.id
    for f in figures:
        if f.engine == engine and f.concurrency == 1 and f.ratio_to is None and f.op == "~" and not f.is_range \
                and not f.settings and f.metric == "output_throughput" and f.unit == "tok/s" and f.value > 0:
            return output / f.value - think, f.id
    return None


def queueing_checks(exp: Experiment, figures) -> list[QueueCheck]:
    """Published figures at N > 1 closed-loop clients held against the same engine's published single-client figure.

    Latencies (E2E, TTFT, any statistic) <= N x S_1; output throughput >= N x out / (N x S_1 + Z).
    The assumptions (module docstring): work-conserving, FCFS or shared steps, a total output rate
    that does not drop under load, requests of equal length (as the config assumes).
    """
    if not exp.workload.is_closed_loop:
        return []
    _, output = mean_lengths(exp)
    z = exp.workload.think_time_s
    out = []
    for f in figures:
        if f.concurrency is None or f.concurrency < 2 or f.ratio_to is not None or f.settings:
            continue
        ref = _single_client_seconds(figures, f.engine, output, z)
        if ref is None:
            continue
        s1, ref_id = ref
        n = f.concurrency
        lat = _latency_kind(f.metric)
        lo, hi = (f.value if f.is_range else (f.value, f.value))
        why = (f"{n} closed-loop clients on a server that answers one request alone in S_1 = {s1:.3g} s ({ref_id})")
        if lat is not None and lat[0] in ("e2el", "ttft") and f.unit in _LATENCY_SCALE and f.op in ("~", ">", ">="):
            bound = n * s1 / _LATENCY_SCALE[f.unit]
            out.append(QueueCheck(f.id, ref_id, "upper", bound, f.unit, lo,
                                  f"{why}: none waits longer than N x S_1 = {n} x {s1:.3g} s = {fmt_num(bound)} "
                                  f"{f.unit} unless the server slows down under load"))
        elif f.metric == "output_throughput" and f.unit == "tok/s" and f.op in ("~", "<", "<="):
            bound = n * output / (n * s1 + z)
            out.append(QueueCheck(f.id, ref_id, "lower", bound, f.unit, hi,
                                  f"{why}: each ends within N x S_1, so {n} clients get at least N x out / "
                                  f"(N x S_1 + Z) = {n} x {output:.0f} / ({n} x {s1:.3g} + {fmt_num(z)}) = "
                                  f"{fmt_num(bound)} tok/s unless the server slows down under load"))
    return out


_UNIT_SCALE = {("s", "ms"): 1e3, ("ms", "s"): 1e-3, ("GB", "GiB"): 1e9 / 2 ** 30, ("tok/s", "tok/s"): 1.0}


def in_unit(b: Bound, unit: str) -> Bound:
    """The bound expressed in the figure's unit (ms vs s), when they differ and convert."""
    if not unit or unit == b.unit:
        return b
    k = _UNIT_SCALE.get((b.unit, unit))
    if k is None:
        return b
    return Bound(b.kind, b.value * k, unit, b.arithmetic, b.binding)


def format_audit(exp: Experiment, rows: list[AuditRow], queue: list[QueueCheck] | None = None) -> str:
    """The audit as text: one paragraph per figure, implausible ones marked; then the queueing checks."""
    checked = [r for r in rows if r.bound is not None]
    lines = [f"Physical audit of {exp.name}: {len(checked)} of {len(rows)} published figures have a physical "
             f"limit (datasheet peaks, efficiency 1.0)"]
    for r in checked:
        mark = ("BEYOND CONFIG" if r.bound.binding == "config" else "IMPLAUSIBLE") if r.implausible else "ok"
        pub = f"{fmt_num(r.published)} {r.unit}" if r.published is not None else "-"
        lines.append(f"[{mark}] {r.id} {r.claim} ({r.cell}, {r.metric}): published {pub}")
        lines.append(f"    {r.text}")
    rest = [r.id for r in rows if r.bound is None]
    if rest:
        lines.append(f"No physical limit applies to {', '.join(rest)} (ratios, shares, memory accounting).")
    n = sum(r.implausible and r.bound.binding != "config" for r in rows)
    lines.append(f"{n} of {len(rows)} figures exceed their physical limit.")
    beyond = [r.id for r in rows if r.implausible and r.bound.binding == "config"]
    if beyond:
        lines.append(f"{', '.join(beyond)} exceed{'s' if len(beyond) == 1 else ''} a limit the engine's own flags set.")
    if queue:
        lines.append("")
        lines.append(f"Queueing against the article's own single-client figures: {len(queue)} figures checked")
        for q in queue:
            mark = "BREAKS" if q.violated else "ok"
            rel = "<=" if q.kind == "upper" else ">="
            lines.append(f"[{mark}] {q.id}: published {fmt_num(q.edge)} {q.unit}, bound {rel} {fmt_num(q.value)} "
                         f"{q.unit}")
            lines.append(f"    {q.text}")
        lines.append(f"{sum(q.violated for q in queue)} of {len(queue)} break the queueing bound.")
    return "\n".join(lines)
