"""What the runtime laws predict for the published claims' setups (reported, never tuned to them).

    PYTHONPATH=. python experiments/measured/setups.py

Batch-1 decode step of Llama-3.1-8B at context 200 (the claims' 100 prompt + 200 output tokens,
mid-generation), tokens/s = 1 / step; next to it the roofline (sim.core.roofline defaults).
"""
from __future__ import annotations

from reference.config import get_preset
from reference.batch import StepShape
from sim.core.roofline import RooflineCostModel
from sim.core.runtime_costmodel import make_runtime_cost_model

M8 = get_preset("llama-3.1-8b")
SETUPS = [("llama.cpp", "gguf-q4_k_m", hw) for hw in ("h100-sxm", "a100-sxm-80gb", "rtx-4090")] + \
         [("vllm", "fp16", hw) for hw in ("h100-sxm", "a100-sxm-80gb")]


def main():
    s = StepShape.decode(1, 200)
    print(f"{'runtime':<10} {'format':<12} {'hardware':<14} {'step ms':>8} {'tok/s':>7} {'roofline tok/s':>15}  breakdown ms")
    for runtime, fmt, hw in SETUPS:
        c = make_runtime_cost_model(M8, hw, runtime, fmt).step_time(s)
        roof = RooflineCostModel(M8, hw, fmt).step_seconds(s)
        parts = ", ".join(f"{k}={1e3 * v:.2f}" for k, v in c.breakdown.items() if v)
        print(f"{runtime:<10} {fmt:<12} {hw:<14} {1e3 * c.total_s:8.2f} {1 / c.total_s:7.1f} {1 / roof:15.1f}  {parts}")


if __name__ == "__main__":
    main()
