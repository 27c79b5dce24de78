"""Weight formats (bits per weight, compute dtype per hardware) and KV-cache dtypes (bytes per element).

Bits per weight count everything a checkpoint stores for the quantised matrices, scales and
zero points included, so weight_bytes(...) is what a decode step streams from memory:

- fp16 / bf16: 16.
- fp8 (per-tensor or per-channel scale, as vLLM / ModelOpt FP8 checkpoints): 8; one scale per
  tensor or output row is negligible.
- int8 (W8A8, SmoothQuant-style, per-channel scales): 8.
- awq-int4 / gptq-int4 at group size 128: 4 bits per weight + per group of 128 weights one fp16
  scale (16 bits) and one 4-bit zero point packed 8 to an int32 (4 bits):
  4 + (16 + 4) / 128 = 4.156. Kernels that unpack the zero to fp16 would count 4.25; the
  on-disk size agrees with 4.156 (Llama-3.1-8B AWQ-INT4 checkpoints are ~5.73 GB: 6.98 B layer
  weights x 4.156 bits + 1.05 B embedding/LM-head weights kept at 16 bits). GPTQ's g_idx is one
  int32 per input row, negligible.
- gguf-q8_0: blocks of 32 int8 weights with one fp16 scale: (32 x 8 + 16) / 32 = 8.5.
- gguf-q4_k_m: a mix (Q4_K at 4.5 bpw for most tensors, Q6_K at 6.5625 for half of attn_v /
  ffn_down and for the output matrix); llama.cpp reports ~4.85-4.9 bpw averaged over the whole
  file for Llama-3-8B. We use 4.85 (design brief) for every tensor, embeddings included.
- gguf-q4_0: blocks of 32 4-bit weights with one fp16 scale: (32 x 4 + 16) / 32 = 4.5 (files keep the
  output matrix at Q6_K, ~4.54 bpw averaged over Llama-2-7B's 3.56 GiB / 6.74 B params; 4.5 used).
- nvfp4: 4-bit E2M1 values with one FP8 (E4M3) scale per 16: 4 + 8 / 16 = 4.5 (plus one FP32
  scale per tensor, negligible).

Embeddings and LM head: AWQ/GPTQ/FP8/INT8/NVFP4 checkpoints keep the token embedding and the LM
head at 16 bits (`embedding_bits`); GGUF quantises them too, and its bpw is already a whole-file
average. Norm weights are counted at the format's bits (they are ~0.003% of the parameters).

Compute dtype: weight-only formats (AWQ, GPTQ, GGUF on GPU) dequantise to fp16 and run fp16
tensor cores (W4A16 Marlin kernels; llama.cpp's MMQ int8 path is not modelled). FP8 runs FP8
tensor cores where they exist (Ada, Hopper, Blackwell) and otherwise weight-only (FP8 Marlin on
Ampere): fp16. NVFP4 runs FP4 tensor cores on Blackwell, else fp16 (FP4 Marlin). INT8 W8A8 runs
INT8 tensor cores (Ampere and later).

Plain Python, no JAX.
"""
from __future__ import annotations

from dataclasses import dataclass

from reference.errors import ConfigError


@dataclass(frozen=True)
class WeightFormat:
    """How a checkpoint stores its weights, and what the matmuls compute in."""

    name: str
    bits_per_weight: float  # bits per weight of the quantised matrices, scales and zeros included
    embedding_bits: float  # bits per weight of the token embedding and LM head
    compute_preference: tuple[str, ...]  # compute dtypes, best first; the first the hardware has is used
    description: str


@dataclass(frozen=True)
class KVDtype:
    """Element type of the KV cache."""

    name: str
    bytes_per_element: float
    description: str


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in [
        WeightFormat("fp16", 16.0, 16.0, ("fp16",), "IEEE half precision"),
        WeightFormat("bf16", 16.0, 16.0, ("bf16", "fp16"), "bfloat16"),
        WeightFormat("fp8", 8.0, 16.0, ("fp8", "fp16"), "FP8 E4M3 weights (W8A8 where FP8 tensor cores exist)"),
        WeightFormat("int8", 8.0, 16.0, ("int8", "fp16"), "INT8 W8A8, per-channel scales"),
        WeightFormat("awq-int4", 4.0 + (16 + 4) / 128, 16.0, ("fp16",),
                     "AWQ 4-bit, group 128, fp16 scale + 4-bit zero per group"),
        WeightFormat("gptq-int4", 4.0 + (16 + 4) / 128, 16.0, ("fp16",),
                     "GPTQ 4-bit, group 128, fp16 scale + 4-bit zero per group"),
        WeightFormat("gguf-q4_k_m", 4.85, 4.85, ("fp16",), "llama.cpp Q4_K_M (whole-file average)"),
        WeightFormat("gguf-q8_0", 8.5, 8.5, ("fp16",), "llama.cpp Q8_0: 32 int8 + fp16 scale"),
        WeightFormat("nvfp4", 4.5, 16.0, ("fp4", "fp16"), "NVFP4: E2M1 + FP8 scale per 16"),
        WeightFormat("gguf-q4_0", 4.5, 4.5, ("fp16",), "llama.cpp Q4_0: 32 x 4-bit + fp16 scale"),
    ]
}

KV_DTYPES: dict[str, KVDtype] = {
    k.name: k
    for k in [
        KVDtype("fp16", 2.0, "IEEE half precision"),
        KVDtype("bf16", 2.0, "bfloat16"),
        KVDtype("fp8", 1.0, "FP8 (vLLM kv_cache_dtype=fp8, E4M3 by default)"),
        KVDtype("fp8_e4m3", 1.0, "FP8 E4M3"),
        KVDtype("fp8_e5m2", 1.0, "FP8 E5M2"),
        KVDtype("q8_0", 8.5 / 8, "llama.cpp/Ollama q8_0 KV: 32 int8 + fp16 scale"),
        KVDtype("q4_0", 4.5 / 8, "llama.cpp/Ollama q4_0 KV: 32 x 4-bit + fp16 scale"),
    ]
}


def get_weight_format(name: str, field: str = "weight_format") -> WeightFormat:
    """The weight format called name; ConfigError naming field and listing formats otherwise."""
    try:
        return WEIGHT_FORMATS[name]
    except (KeyError, TypeError):
        raise ConfigError(field, f"unknown weight format {name!r}", ", ".join(WEIGHT_FORMATS)) from None


def get_kv_dtype(name: str, field: str = "kv_dtype") -> KVDtype:
    """The KV dtype called name; ConfigError naming field and listing dtypes otherwise."""
    try:
        return KV_DTYPES[name]
    except (KeyError, TypeError):
        raise ConfigError(field, f"unknown KV dtype {name!r}", ", ".join(KV_DTYPES)) from None


def compute_dtype(fmt: WeightFormat | str, hardware) -> str:
    """The dtype the matmuls of this format run in on this hardware (first supported preference)."""
    if isinstance(fmt, str):
        fmt = get_weight_format(fmt)
    for dtype in fmt.compute_preference:
        if hardware.supports(dtype):
            return dtype
    raise ConfigError("weight_format", f"{fmt.name} has no compute dtype on {hardware.name}",
                      ", ".join(fmt.compute_preference))


def weight_bytes(model_cfg, fmt: WeightFormat | str) -> int:
    """Bytes of all weights of model_cfg stored in this format (embeddings at fmt.embedding_bits)."""
    if isinstance(fmt, str):
        fmt = get_weight_format(fmt)
    embed = model_cfg.embedding_params * (1 if model_cfg.tie_embeddings else 2)
    rest = model_cfg.num_params - embed
    return int(round((rest * fmt.bits_per_weight + embed * fmt.embedding_bits) / 8))
