"""A Llama-architecture decoder in JAX, as pure functions over a pytree of weights.

Pre-norm residual blocks: RMSNorm -> grouped-query attention with rotary embeddings ->
RMSNorm -> SwiGLU MLP; then a final RMSNorm and the LM head (tied to the embedding or not).
Qwen2 is the same with biases on the q, k, v projections (cfg.qkv_bias).

The attention step is a parameter (`attend`) so one decoder serves three callers:
`forward_dense` (no cache, full causal recomputation: the truth every test compares to),
and the model runner's paged and contiguous KV-cache paths (reference/runner.py).

Shape letters: B batch, T tokens, E hidden, H query heads, K kv heads, G = H // K,
D head dim, F MLP width, V vocab, L layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from reference.config import ModelConfig

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclass
class LayerParams:
    """Weights of one decoder layer. Linear weights are [in, out] (x @ w)."""

    attn_norm: Array  # [E]
    wq: Array  # [E, H*D]
    wk: Array  # [E, K*D]
    wv: Array  # [E, K*D]
    wo: Array  # [H*D, E]
    bq: Array | None  # [H*D] (qkv_bias only)
    bk: Array | None  # [K*D]
    bv: Array | None  # [K*D]
    mlp_norm: Array  # [E]
    w_gate: Array  # [E, F]
    w_up: Array  # [E, F]
    w_down: Array  # [F, E]


@jax.tree_util.register_dataclass
@dataclass
class Params:
    """All weights of the model. lm_head is None when tied to the embedding."""

    embed: Array  # [V, E]
    layers: list[LayerParams]  # L entries
    final_norm: Array  # [E]
    lm_head: Array | None  # [E, V]


def init_params(cfg: ModelConfig, seed: int = 0, dtype: Any = jnp.float32) -> Params:
    """Random weights from a seed, scaled so every activation is O(1).

    Linear weights ~ N(0, 1/fan_in) (so attention scores are O(1) and RoPE matters),
    the embedding and LM head ~ N(0, 1/E), RMSNorm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2).
    """
    rng = np.random.default_rng(seed)
    E, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size

    def normal(shape, std):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * std, dtype=dtype)

    def linear(n_in, n_out):
        return normal((n_in, n_out), 1.0 / math.sqrt(n_in))

    def norm():
        return jnp.asarray(1.0 + 0.1 * rng.standard_normal(E, dtype=np.float32), dtype=dtype)

    def bias(n):
        return normal((n,), 0.1) if cfg.qkv_bias else None

    layers = [
        LayerParams(attn_norm=norm(), wq=linear(E, cfg.q_size), wk=linear(E, cfg.kv_size),
                    wv=linear(E, cfg.kv_size), wo=linear(cfg.q_size, E), bq=bias(cfg.q_size),
                    bk=bias(cfg.kv_size), bv=bias(cfg.kv_size), mlp_norm=norm(),
                    w_gate=linear(E, F), w_up=linear(E, F), w_down=linear(F, E))
        for _ in range(cfg.num_layers)
    ]
    embed = normal((V, E), 1.0 / math.sqrt(E))
    lm_head = None if cfg.tie_embeddings else normal((E, V), 1.0 / math.sqrt(E))
    return Params(embed=embed, layers=layers, final_norm=norm(), lm_head=lm_head)


@jax.tree_util.register_dataclass
@dataclass
class OutIn:
    """A matrix stored transposed, [out, in] (linear computes x @ t.T).

    XLA's CPU matrix-vector product in bfloat16 is fast only in this layout (the contracted axis
    contiguous), and slow in [in, out]; a batch of rows is the other way round.
    """

    t: Array  # [out, in]


def with_matmul_dtype(params: Params, dtype: Any, out_in: bool = False) -> Params:
    """The same weights with every matrix (projections, MLP, LM head) in `dtype`, for a step's speed.

    out_in: matrices stored [out, in] (OutIn) and the LM head tied to the embedding, the layout of
    XLA CPU's fast one-row products; else [in, out] with the LM head its own [E, V] copy (a batch's).
    Norm weights and biases keep their dtype, and so do the activations (they follow the norm
    weights, see forward_hidden): each matmul multiplies its input cast to `dtype`, accumulating in
    float32 (`linear`). experiments/results/server16/ has the measurements behind both layouts.
    """
    def cast(w):
        return OutIn(jnp.asarray(w.T, dtype)) if out_in else jnp.asarray(w, dtype)

    layers = [LayerParams(attn_norm=lp.attn_norm, wq=cast(lp.wq), wk=cast(lp.wk), wv=cast(lp.wv), wo=cast(lp.wo),
                          bq=lp.bq, bk=lp.bk, bv=lp.bv, mlp_norm=lp.mlp_norm, w_gate=cast(lp.w_gate),
                          w_up=cast(lp.w_up), w_down=cast(lp.w_down)) for lp in params.layers]
    head = params.embed.T if params.lm_head is None else params.lm_head  # [E, V]
    if out_in:  # tied: hidden @ embed.T is already the [out, in] product; an untied head is stored so
        head = None if params.lm_head is None else OutIn(jnp.asarray(head.T, dtype))
    else:
        head = jnp.asarray(head, dtype)
    embed = jnp.asarray(params.embed, dtype if head is None else params.embed.dtype)
    return Params(embed=embed, layers=layers, final_norm=params.final_norm, lm_head=head)


def param_bytes(params: Params) -> int:
    """Bytes of all weights (each read once per forward step)."""
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in float32, as Hugging Face does: w * (x / rms(x)). x [..., E]."""
    x32 = x.astype(jnp.float32)  # [..., E]
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [D/2] (float32), with Llama-3.1 scaling when cfg.rope_scaling is set.

    Follows transformers' `_compute_llama3_parameters`: wavelengths longer than
    original_max_position / low_freq_factor are slowed down by `factor`, shorter than
    original_max_position / high_freq_factor are kept, and the band between is interpolated.
    """
    D = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, D, 2, dtype=np.float32) / D)))
    inv_freq = inv_freq.astype(np.float32)  # [D/2]
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)  # [D/2]
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq).astype(np.float32)
    smooth = ((s.original_max_position / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / s.factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate x [..., T, N, D] by its positions [..., T] (HF "rotate_half": halves, not pairs)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., T, 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)  # [..., T, N, D/2] each
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # [..., T, N, D]
    return x * cos + rotated * sin


def linear(x: Array, w: Array) -> Array:
    """x [..., in] @ w [in, out] -> [..., out] in x's dtype, accumulated in float32.

    x is cast to w's dtype first, so a float32 model with bfloat16 matrices (with_matmul_dtype) runs
    bfloat16 dots rather than converting the matrix to float32 on every step. w may be OutIn.
    """
    return _dot_f32(x, w).astype(x.dtype)


def _dot_f32(x: Array, w: Array) -> Array:
    """x [..., in] @ w ([in, out], or OutIn [out, in]) -> [..., out] float32, x cast to w's dtype."""
    if isinstance(w, OutIn):
        return jnp.matmul(x.astype(w.t.dtype), w.t.T, preferred_element_type=jnp.float32)
    return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """Plain causal attention with GQA, no cache. q [B, T, H, D], k, v [B, T, K, D] -> [B, T, H, D]."""
    B, T, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)  # [B, T, K, G, D]
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))  # [T, S]
    s = jnp.where(mask, s, -1e30)  # [B, K, G, T, S]
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)  # [B, T, K, G, D]
    return o.reshape(B, T, H, D).astype(q.dtype)


# attend(layer_index, q [..., H, D], k [..., K, D], v [..., K, D], layer_cache) -> (out [..., H, D], layer_cache)
AttendFn = Callable[[int, Array, Array, Array, Any], tuple[Array, Any]]


def decoder_layer(layer: LayerParams, cfg: ModelConfig, x: Array, positions: Array,
                  inv_freq: Array, attend: Callable, layer_cache: Any = None) -> tuple[Array, Any]:
    """One pre-norm block. x [..., T, E], positions [..., T] -> (x [..., T, E], layer_cache).

    `attend(q, k, v, layer_cache)` gets rotated q [..., T, H, D] and k, v [..., T, K, D],
    and is where a KV cache is written and read.
    """
    lead = x.shape[:-1]  # (..., T)
    with jax.named_scope("attention"):
        h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)  # [..., T, E]
        q, k, v = linear(h, layer.wq), linear(h, layer.wk), linear(h, layer.wv)  # [..., T, H*D], [..., T, K*D] x2
        if layer.bq is not None:
            q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
        q = q.reshape(*lead, cfg.num_heads, cfg.head_dim)  # [..., T, H, D]
        k = k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)  # [..., T, K, D]
        v = v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)  # [..., T, K, D]
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        o, layer_cache = attend(q, k, v, layer_cache)  # [..., T, H, D]
        x = x + linear(o.reshape(*lead, cfg.q_size), layer.wo)  # [..., T, E]
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)  # [..., T, E]
        x = x + linear(jax.nn.silu(linear(h, layer.w_gate)) * linear(h, layer.w_up), layer.w_down)  # [..., T, E]
    return x, layer_cache


def forward_hidden(params: Params, cfg: ModelConfig, tokens: Array, positions: Array,
                   attend: AttendFn, cache: list | None = None) -> tuple[Array, list | None]:
    """Embedding and all decoder layers, then the final norm.

    tokens, positions [..., T] -> (hidden [..., T, E], cache). `cache` is a per-layer list
    handed to attend(layer_index, q, k, v, cache[layer_index]) and returned updated. Activations
    are in the dtype of the norm weights (the matrices may be narrower: with_matmul_dtype).
    """
    inv_freq = jnp.asarray(rope_inv_freq(cfg))  # [D/2]
    x = params.embed[tokens].astype(params.final_norm.dtype)  # [..., T, E]
    new_cache = [] if cache is not None else None
    for i, layer in enumerate(params.layers):
        with jax.named_scope(f"layer_{i}"):
            layer_attend = lambda q, k, v, c, i=i: attend(i, q, k, v, c)  # noqa: E731
            x, c = decoder_layer(layer, cfg, x, positions, inv_freq, layer_attend,
                                 None if cache is None else cache[i])
            if new_cache is not None:
                new_cache.append(c)
    with jax.named_scope("final_norm"):
        x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)  # [..., T, E]
    return x, new_cache


def lm_head(params: Params, hidden: Array) -> Array:
    """Logits in float32: hidden [..., E] -> [..., V] (tied: hidden @ embed^T)."""
    return _dot_f32(hidden, params.embed.T if params.lm_head is None else params.lm_head)  # head [E, V] or OutIn


def forward_dense(params: Params, cfg: ModelConfig, tokens: Array) -> Array:
    """Full recomputation without a cache: tokens [B, T] (positions 0..T-1) -> logits [B, T, V] float32."""
    tokens = jnp.asarray(tokens)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))  # [B, T]
    hidden, _ = forward_hidden(params, cfg, tokens, positions,
                               lambda i, q, k, v, c: (causal_attention(q, k, v), c))
    return lm_head(params, hidden)  # [B, T, V]
