"""Which physics a planner number rests on, in words: the cost model, and how close its calibration is.

The planner prices steps with each engine's runtime law by default ([cost_model] kind = "runtime":
llama.cpp for Ollama-style sequential engines, vLLM for continuous batching; sim.core.runtimes).
Each law was fitted on published measurements of some cards, models and weight formats
(experiments/measured, `servesim measured`); a candidate outside them is an extrapolation, and the
report says so candidate by candidate:

    llama.cpp law; card in its fit (rtx-4090 ...); model and weights measured
    vLLM law; card extrapolated (fitted on a100-sxm-80gb only); model extrapolated (fitted on llama-3.1-8b)
    + tp=2: all-reduce from the roofline's interconnect model (not calibrated)
"""
from __future__ import annotations

import functools

from sim.lab.experiment import Experiment
from sim.lab.measured import load_rows

#: In-sample and leave-one-GPU-out errors of the laws as `servesim measured` reports them (see
#: experiments/measured/README.md); quoted, not recomputed here.
LAW_ERRORS = {"llama.cpp": "3-5% in-sample, 4-6% leave-one-GPU-out",
              "vllm": "2 fitted rows, exact by construction: no accuracy figure"}


@functools.cache
def fit_coverage() -> dict[str, dict[str, frozenset]]:
    """{runtime: {"hardware": presets, "model": presets, "weights": formats}} of the rows each law was fitted on."""
    out: dict[str, dict[str, set]] = {}
    for row in load_rows():
        if row.role != "fit":
            continue
        cov = out.setdefault(row.runtime, {"hardware": set(), "model": set(), "weights": set()})
        cov["hardware"].add(row.hardware)
        cov["model"].add(row.model)
        cov["weights"].add(row.weight_format)
    return {r: {k: frozenset(v) for k, v in c.items()} for r, c in out.items()}


def _weights_measured(runtime: str, weights: str, fitted: frozenset) -> bool:
    # vLLM's rows are bf16; fp16 has the same bytes and tensor rate on these cards.
    same = {"bf16": {"bf16", "fp16"}, "fp16": {"bf16", "fp16"}}
    return any(weights in same.get(w, {w}) for w in fitted)


def physics_note(exp: Experiment) -> str:
    """How the experiment's (one) engine is priced, and how far that is from what was measured."""
    engine = exp.engines[0]
    kind = exp.cost_model.kind if exp.cost_model is not None else "roofline"
    tp = exp.hardware.tp
    comm = f"; tp={tp} all-reduce from the roofline's interconnect model (not calibrated)" if tp > 1 else ""
    if kind == "roofline":
        return "datasheet roofline at fixed efficiencies (not calibrated)" + comm
    if kind == "calibrated":
        return f"law fitted to the profile {exp.cost_model.profile}" + comm
    runtime = engine.runtime
    cov = fit_coverage().get(runtime)
    name = {"llama.cpp": "llama.cpp", "vllm": "vLLM"}[runtime]
    if cov is None:
        return f"{name} law (no fitted rows found)" + comm
    preset = exp.hardware.preset
    cards = sorted(cov["hardware"])
    card = ("card in its fit" if preset in cov["hardware"]
            else f"card extrapolated (fitted on {', '.join(cards) if len(cards) > 1 else cards[0] + ' only'})")
    model = ("model measured" if exp.model in cov["model"]
             else f"model extrapolated (fitted on {', '.join(sorted(cov['model']))})")
    weights = ("weights measured" if _weights_measured(runtime, engine.weights, cov["weights"])
               else f"{engine.weights} weights extrapolated (fitted on {', '.join(sorted(cov['weights']))})")
    split = ("; llama.cpp splits layers across GPUs, priced here as tensor parallel"
             if runtime == "llama.cpp" and tp > 1 else "")
    return f"{name} law ({LAW_ERRORS[runtime]}); {card}; {model}; {weights}{comm}{split}"
