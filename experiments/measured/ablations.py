"""Why the llama.cpp law has the terms it has: refit variants on the same rows, compare errors.

    python experiments/measured/ablations.py

Variants (each refit on the XD fit rows; in-sample and leave-one-GPU-out median |error|):
  chosen          the law in sim.core.runtimes (SM-cycle bandwidth cap, Hopper tensor rate halved)
  no-hopper-half  Hopper at its full datasheet FP16 rate
  memory-type     achieved bandwidth = eta_GDDR x BW or eta_HBM x BW (two fitted efficiencies) instead of the
                  SM-cycle cap; Hopper halved
  hopper-scan     the in-sample error for Hopper fractions 0.3 .. 1.0 (is 0.5 what the data prefer?)
  dequant-scan    the in-sample error for 2 .. 6 bytes per parameter of dequantisation traffic (is 4 what the
                  data prefer?)
pr7676-shape    ms per micro-batch of the PR #7676 rows against micro-batch size: a straight line a + b x tokens?
vLLM sensitivity: the parameters (and the H100 SXM batch-1 step) if the release notes' operating batch were
128 instead of 256, or if vLLM's decode reached 85% of the datasheet bandwidth instead of the assumed 100%.
Every variant is a monkeypatch of the law (sim.core.runtimes, L) or of the fit (sim.lab.measured, R) for this
script only.
"""
from __future__ import annotations

import numpy as np

import sim.core.runtimes as L
import sim.lab.measured as R
from reference.batch import StepShape
from reference.config import get_preset
from sim.core.hardware import get_hardware


def medians(rows) -> dict:
    fit = {"llama.cpp": R.fit_llamacpp([r for r in rows if r.role == "fit"]), "vllm": None}
    ins = [x for x in R.evaluate(fit, [r for r in rows if r.runtime == "llama.cpp"]) if x["role"] == "fit"]
    logo = [dict(x, runtime="llama.cpp", role="logo") for x in R.leave_one_gpu_out(rows)]
    out = {}
    for name, res in (("in-sample", [dict(x) for x in ins]), ("LOGO", logo)):
        for s in R.summarize(res, by=("kind",)):
            out[f"{name} {s['kind']}"] = s["median_abs_error"]
    return out, fit["llama.cpp"]


def show(label, rows):
    m, params = medians(rows)
    cells = "  ".join(f"{k}={100 * v:4.1f}%" for k, v in m.items())
    print(f"{label:<15} {cells}")
    print(f"{'':<15} " + ", ".join(f"{k}={v:.4g}" for k, v in params.items()))


def main():
    rows = R.load_rows()
    show("chosen", rows)

    saved = dict(L.LEGACY_TENSOR_FRACTION)
    L.LEGACY_TENSOR_FRACTION.clear()
    show("no-hopper-half", rows)
    L.LEGACY_TENSOR_FRACTION.update(saved)

    saved_bw, saved_init = L.achieved_bandwidth, dict(R.LLAMACPP_INIT)
    # reuse the two bandwidth parameters as eta_GDDR and eta_HBM
    L.achieved_bandwidth = lambda hw, eta_gddr, eta_hbm: (eta_gddr if hw.memory_type == "GDDR" else eta_hbm) * hw.memory_bw
    R.LLAMACPP_INIT.update(bw_bytes_per_sm_clock=0.9, bw_sharpness=0.6)
    show("memory-type", rows)
    L.achieved_bandwidth = saved_bw
    R.LLAMACPP_INIT.clear()
    R.LLAMACPP_INIT.update(saved_init)

    fit_rows = [r for r in rows if r.role == "fit" and r.runtime == "llama.cpp"]
    print("hopper-scan    fraction: in-sample RMS log error")
    for frac in (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0):
        L.LEGACY_TENSOR_FRACTION.update(hopper=frac)
        p = R.fit_llamacpp(fit_rows)
        res = np.log([R.predict_row(r, {"llama.cpp": p}) / r.measured for r in fit_rows])
        print(f"               {frac:4.2f}: {np.sqrt(np.mean(res ** 2)):.4f}")
    L.LEGACY_TENSOR_FRACTION.update(saved)

    print("dequant-scan   bytes/param: in-sample RMS log error")
    for b in (2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0):
        L.DEQUANT_BYTES_PER_PARAM = b
        p = R.fit_llamacpp(fit_rows)
        res = np.log([R.predict_row(r, {"llama.cpp": p}) / r.measured for r in fit_rows])
        print(f"               {b:4.1f}: {np.sqrt(np.mean(res ** 2)):.4f}")
    L.DEQUANT_BYTES_PER_PARAM = 4.0

    lc = sorted((r.ubatch, 1e3 * r.ubatch / r.measured) for r in rows if r.row_id.startswith("LC7676"))
    x, y = np.array(lc).T
    b, a = np.polyfit(x, y, 1)
    print(f"pr7676-shape   ms per micro-batch = {a:.2f} + {b:.4f} x tokens; residuals (ms): "
          + ", ".join(f"ub{int(u)} {v - (a + b * u):+.2f}" for u, v in lc))
    law = L.build_law("llama.cpp", L.load_fit()["llama.cpp"], get_hardware("rtx-4090"), get_preset("llama-3.1-8b"),
                      "gguf-q4_0")
    print(f"               law's batch-1 decode step, same card/model/format, context 256: "
          f"{1e3 * law.seconds(1, 1, 257, 256):.2f} ms")

    print("vLLM sensitivity: parameters, and the batch-1 decode step (context 200) on H100 SXM / A100 SXM")
    for label, batch, bw in (("as fitted", 256, 1.0), ("blog batch 128", 128, 1.0), ("bw_efficiency 0.85", 256, 0.85)):
        R.VLLM_BLOG_BATCH, R.VLLM_BW_EFFICIENCY = batch, bw
        p = R.fit_vllm(rows)
        steps = [1e3 * L.build_law("vllm", p, get_hardware(h), get_preset("llama-3.1-8b"), "fp16")
                 .step_seconds(StepShape.decode(1, 200)) for h in ("h100-sxm", "a100-sxm-80gb")]
        print(f"  {label:<19} " + ", ".join(f"{k}={v:.4g}" for k, v in p.items())
              + f"  -> {steps[0]:.2f} ms / {steps[1]:.2f} ms")
    R.VLLM_BLOG_BATCH, R.VLLM_BW_EFFICIENCY = 256, 1.0


if __name__ == "__main__":
    main()
