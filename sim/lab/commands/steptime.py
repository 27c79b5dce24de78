"""`servesim steptime`: one step's predicted time, broken down into weights, KV reads, compute, communication, overhead.

Priced by the roofline (datasheet peaks at fixed efficiencies) or, with --runtime, by that runtime's
calibrated law (sim.core.runtimes: llama.cpp's or vLLM's kernels, fitted on published measurements).
"""
from __future__ import annotations

import json

import click

from reference.batch import StepShape
from reference.config import PRESETS, get_preset
from reference.errors import ConfigError
from sim.core import formats
from sim.core.hardware import HARDWARE, get_hardware
from sim.core.roofline import DEFAULT_COMPUTE_EFFICIENCY, DEFAULT_MEM_EFFICIENCY, RooflineCostModel
from sim.core.runtime_costmodel import RuntimeCostModel
from sim.core.runtimes import RUNTIMES

# ConfigError fields -> the option a user typed.
_OPTION_OF_FIELD = {"model": "--model", "hardware": "--hardware", "weight_format": "--dtype",
                    "kv_dtype": "--kv-dtype", "tp": "--tp", "mem_efficiency": "--mem-efficiency",
                    "compute_efficiency": "--compute-efficiency", "step_overhead_s": "--overhead-ms",
                    "compute_dtype": "--dtype", "context_len": "--context", "cached_context": "--cached-context",
                    "prefill_tokens": "--prefill-tokens", "decode_seqs": "--decode-seqs", "runtime": "--runtime",
                    "ubatch": "--ubatch"}
#: How each cost model combines the breakdown's terms (printed under the breakdown).
_COMBINES = {"roofline": ("memory terms overlap compute:", "step = max(weights + kv reads, compute)",
                          "       + communication + overhead"),
             "llama.cpp": ("llama.cpp's terms add up:", "step = weights + kv reads + compute",
                           "       + communication + overhead"),
             "vllm": ("vLLM overlaps memory and compute:", "step = max(weights + kv reads, compute)",
                      "       + communication + host overhead")}


def _roofline_only(mem_efficiency, compute_efficiency, overhead_ms) -> None:
    """UsageError when a roofline knob is given with --runtime (the runtime laws have fitted efficiencies)."""
    for option, value in (("--mem-efficiency", mem_efficiency), ("--compute-efficiency", compute_efficiency),
                          ("--overhead-ms", overhead_ms)):
        if value is not None:
            raise ConfigError(option, "applies to the roofline only; a --runtime law has its own fitted efficiencies "
                                      "and overheads (servesim measured)", "omit it, or drop --runtime")


@click.command("steptime")
@click.option("--model", "model_name", required=True, help=f"Model preset ({', '.join(PRESETS)}).")
@click.option("--hardware", "hardware_name", required=True, help=f"Hardware preset ({', '.join(HARDWARE)}).")
@click.option("--dtype", "weight_format", default="fp16", show_default=True,
              help=f"Weight format ({', '.join(formats.WEIGHT_FORMATS)}).")
@click.option("--kv-dtype", default="fp16", show_default=True, help=f"KV dtype ({', '.join(formats.KV_DTYPES)}).")
@click.option("--tp", default=1, show_default=True, type=int, help="Tensor-parallel devices.")
@click.option("--prefill-tokens", default=0, show_default=True, type=int,
              help="New prompt tokens in the step (one chunk).")
@click.option("--cached-context", default=0, show_default=True, type=int,
              help="Tokens already cached before the prefill chunk (prefix hit or earlier chunks).")
@click.option("--decode-seqs", default=0, show_default=True, type=int, help="Sequences decoding one token.")
@click.option("--context", default=1024, show_default=True, type=int,
              help="Context length of each decoding sequence after the step (tokens).")
@click.option("--runtime", default=None,
              help=f"Price the step by this runtime's calibrated law ({', '.join(RUNTIMES)}) instead of the roofline.")
@click.option("--ubatch", default=512, show_default=True, type=int,
              help="With --runtime llama.cpp: tokens per micro-batch (n_ubatch); a larger step runs as several.")
@click.option("--mem-efficiency", default=None, type=float,
              help=f"Roofline: fraction of peak memory bandwidth reached (default {DEFAULT_MEM_EFFICIENCY}).")
@click.option("--compute-efficiency", default=None, type=float,
              help=f"Roofline: fraction of peak FLOP/s reached (default {DEFAULT_COMPUTE_EFFICIENCY}).")
@click.option("--overhead-ms", default=None, type=float,
              help="Roofline: fixed per-step overhead (ms); default: the hardware's.")
@click.option("--json", "as_json", is_flag=True, help="Print the prediction as JSON.")
def command(model_name, hardware_name, weight_format, kv_dtype, tp, prefill_tokens, cached_context, decode_seqs,
            context, runtime, ubatch, mem_efficiency, compute_efficiency, overhead_ms, as_json) -> None:
    """Predict one engine step's time (roofline, or a runtime's calibrated law), with its breakdown and bound."""
    try:
        model = get_preset(model_name)
        hw = get_hardware(hardware_name)
        for name, value in (("--prefill-tokens", prefill_tokens), ("--cached-context", cached_context),
                            ("--decode-seqs", decode_seqs)):
            if value < 0:
                raise ConfigError(name, f"must be >= 0, got {value}")
        if overhead_ms is not None and not overhead_ms >= 0:
            raise ConfigError("--overhead-ms", f"must be >= 0, got {overhead_ms}")
        if decode_seqs and context < 1:
            raise ConfigError("--context", f"must be >= 1 when decoding, got {context}")
        if prefill_tokens == 0 and decode_seqs == 0:
            raise ConfigError("--prefill-tokens/--decode-seqs", "the step computes nothing",
                              "--prefill-tokens > 0 or --decode-seqs > 0")
        if runtime is not None:
            _roofline_only(mem_efficiency, compute_efficiency, overhead_ms)
            cm = RuntimeCostModel(model, hw, runtime, weight_format, kv_dtype, tp, ubatch)
        else:
            cm = RooflineCostModel(model, hw, weight_format, kv_dtype, tp,
                                   mem_efficiency=DEFAULT_MEM_EFFICIENCY if mem_efficiency is None else mem_efficiency,
                                   compute_efficiency=(DEFAULT_COMPUTE_EFFICIENCY if compute_efficiency is None
                                                       else compute_efficiency),
                                   step_overhead_s=None if overhead_ms is None else overhead_ms / 1e3)
        shape = StepShape.decode(decode_seqs, context) + StepShape.prefill(prefill_tokens, cached_context)
    except ConfigError as e:
        option = _OPTION_OF_FIELD.get(e.field, e.field)
        raise click.UsageError(str(e.renamed(option))) from None
    cost = cm.step_time(shape)
    compute_dtype = formats.compute_dtype(cm.physics.weight_format, hw)
    peak_flops = hw.peak_flops(compute_dtype)
    result = {
        "model": model.name, "hardware": hw.name, "weight_format": weight_format, "kv_dtype": kv_dtype, "tp": tp,
        "cost_model": "runtime" if runtime else "roofline", "runtime": runtime,
        "compute_dtype": compute_dtype, "step": {
            "prefill_tokens": prefill_tokens, "cached_context": cached_context, "decode_seqs": decode_seqs,
            "context": context},
        "step_ms": cost.total_s * 1e3,
        "breakdown_ms": {k: v * 1e3 for k, v in cost.breakdown.items()},
        "bound": cost.bound,
        "bytes_per_device": cost.bytes_moved, "flops_per_device": cost.flops,
        "achieved_gb_s": cost.achieved_bandwidth / 1e9, "achieved_tflop_s": cost.achieved_flops / 1e12,
        "peak_gb_s": hw.memory_bw / 1e9, "peak_tflop_s": peak_flops / 1e12,
        "tokens_per_s": shape.new_tokens / cost.total_s, "decode_tokens_per_s": decode_seqs / cost.total_s,
        "weight_bytes_per_device": cm.physics.weight_bytes, "memory_bytes_per_device": hw.memory_bytes,
    }
    if runtime:
        result.update(runtime_params=dict(cm.params), ubatch=ubatch)
    else:
        result.update(mem_efficiency=cm.mem_efficiency, compute_efficiency=cm.compute_efficiency)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    b = result["breakdown_ms"]
    law = f"{runtime}'s calibrated law (servesim measured)" if runtime else "the roofline"
    click.echo(f"{model.name} on {hw.name} x{tp}: {weight_format} weights ({cm.physics.weight_bytes / 1e9:.2f} GB "
               f"per device, computed in {compute_dtype}), {kv_dtype} KV; priced by {law}")
    click.echo(f"step: {prefill_tokens} prefill tokens (on {cached_context} cached) + {decode_seqs} decode seqs "
               f"at context {context}")
    click.echo(f"predicted step time: {result['step_ms']:.3f} ms  ({cost.bound}-bound)")
    head, formula, tail = _COMBINES[runtime or "roofline"]
    click.echo(f"  weights        {b['weights']:9.3f} ms   {head}")
    click.echo(f"  kv reads       {b['kv_reads']:9.3f} ms   {formula}")
    click.echo(f"  compute        {b['compute']:9.3f} ms   {tail}")
    click.echo(f"  communication  {b['communication']:9.3f} ms")
    click.echo(f"  overhead       {b['overhead']:9.3f} ms")
    click.echo(f"achieved per device: {result['achieved_gb_s']:.0f} GB/s of {result['peak_gb_s']:.0f} peak "
               f"({result['achieved_gb_s'] / result['peak_gb_s']:.0%}), {result['achieved_tflop_s']:.1f} TFLOP/s "
               f"of {result['peak_tflop_s']:.0f} {compute_dtype} peak "
               f"({result['achieved_tflop_s'] / result['peak_tflop_s']:.1%})")
    click.echo(f"throughput: {result['tokens_per_s']:.0f} tokens/s computed, "
               f"{result['decode_tokens_per_s']:.0f} decode tokens/s")
    if cm.physics.weight_bytes > hw.memory_bytes:
        click.echo(f"warning: weights ({cm.physics.weight_bytes / 1e9:.1f} GB per device) exceed {hw.name}'s "
                   f"{hw.memory_gb:g} GB ({hw.memory_bytes / 1e9:.1f}e9 bytes); raise --tp or use a smaller --dtype",
                   err=True)
