"""The calibration rows (experiments/measured/) and the fit of the runtime laws (sim.core.runtimes) to them.

Each published measurement becomes a MeasuredRow: the step(s) it timed, on which card, model and
weight format, and whether it is used to fit a law (role "fit"), held out ("holdout"), or a serving
run only the whole simulator can predict ("sim"). fit_all() fits both laws (llama.cpp: a damped
least-squares fit on relative error; vLLM: three rows pin three parameters), leave_one_gpu_out()
refits without each card and predicts it, evaluate() lists measured against predicted.

numpy for fitting only.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reference.batch import StepShape
from reference.config import get_preset
from reference.errors import ConfigError
from sim.core.hardware import Hardware, get_hardware
from sim.core.runtimes import (DEQUANT_BYTES_PER_PARAM, FIT_COMMAND, FIT_PATH, LEGACY_TENSOR_FRACTION, LLAMACPP_PARAMS,
                               MEASURED_DIR, MMQ_MAX_BATCH, PARAM_SPECS, RUNTIMES, SCORE_BYTES, StepLaw, build_law)

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
                                        note="a check of the whole simulator (scheduler, arrivals); the LL-A100 runs are claims group E",
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
