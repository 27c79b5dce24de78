"""The JAX model against Hugging Face transformers (CPU torch, float32), same random weights.

Llama (GQA and not, tied and untied, llama3 rope scaling) and Qwen2 (qkv bias): logits agree
for a whole-sequence prefill (forward_dense) and for step-by-step decode through the paged
runner, compared with HF's logits over the whole sequence (the same positions, recomputed).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from reference.batch import ScheduledChunk, SchedulerOutput
from reference.config import Llama3RopeScaling, get_preset
from reference.layout import PagedLayout
from reference.model import forward_dense, init_params, rope_inv_freq
from reference.request import Request, SamplingParams
from reference.runner import ModelRunner

torch.manual_seed(0)
TINY = get_preset("tiny")
# Frequencies chosen so every band of the llama3 rule (kept, interpolated, slowed) is hit.
LLAMA3 = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)
CONFIGS = {
    "gqa-untied": TINY,
    "mha-tied": TINY.scaled(num_kv_heads=4, tie_embeddings=True),
    "gqa8-llama3-rope": TINY.scaled(num_heads=8, num_kv_heads=1, head_dim=8, rope_theta=500000.0,
                                    rope_scaling=LLAMA3),
    "qwen2-qkv-bias": TINY.scaled(qkv_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True),
}
_HF5 = int(transformers.__version__.split(".")[0]) >= 5


def hf_config(cfg):
    """A transformers config with the same shapes as our ModelConfig."""
    rope = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position,
              rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings)
    if _HF5:
        kw["rope_parameters"] = {**rope, "rope_theta": cfg.rope_theta}
    else:
        kw["rope_theta"] = cfg.rope_theta
        kw["rope_scaling"] = None if cfg.rope_scaling is None else rope
    if cfg.qkv_bias:
        return Qwen2Config(**kw)
    return LlamaConfig(head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False, **kw)


def hf_model(cfg, params):
    """An HF model (eager attention, float32) holding our weights."""
    hcfg = hf_config(cfg)
    hcfg._attn_implementation = "eager"
    model = (Qwen2ForCausalLM if cfg.qkv_bias else LlamaForCausalLM)(hcfg).float().eval()
    t = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))  # noqa: E731
    sd = {"model.embed_tokens.weight": t(params.embed), "model.norm.weight": t(params.final_norm)}
    sd["lm_head.weight"] = t(params.embed) if params.lm_head is None else t(params.lm_head).T
    for i, lp in enumerate(params.layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": t(lp.attn_norm), p + "post_attention_layernorm.weight": t(lp.mlp_norm),
               p + "self_attn.q_proj.weight": t(lp.wq).T, p + "self_attn.k_proj.weight": t(lp.wk).T,
               p + "self_attn.v_proj.weight": t(lp.wv).T, p + "self_attn.o_proj.weight": t(lp.wo).T,
               p + "mlp.gate_proj.weight": t(lp.w_gate).T, p + "mlp.up_proj.weight": t(lp.w_up).T,
               p + "mlp.down_proj.weight": t(lp.w_down).T}
        if cfg.qkv_bias:
            sd |= {p + "self_attn.q_proj.bias": t(lp.bq), p + "self_attn.k_proj.bias": t(lp.bk),
                   p + "self_attn.v_proj.bias": t(lp.bv)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied: lm_head is the embedding
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    params = init_params(cfg, seed=7)
    return cfg, params, hf_model(cfg, params)


def test_rope_frequencies_match_hf():
    cfg = CONFIGS["gqa8-llama3-rope"]
    model = hf_model(cfg, init_params(cfg, 0))
    hf = model.model.rotary_emb.inv_freq.numpy()
    ours = rope_inv_freq(cfg)
    np.testing.assert_allclose(ours, hf, rtol=1e-6)
    plain = rope_inv_freq(cfg.scaled(rope_scaling=None))
    assert (ours < plain * 0.99).any() and (ours == plain).any()  # scaling really acts on some bands


def test_prefill_logits_match_hf(pair):
    cfg, params, model = pair
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40))
    ours = np.asarray(jax.jit(forward_dense, static_argnums=1)(params, cfg, jnp.asarray(tokens)))
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(hf).max() > 1.0  # meaningful logits, not all near zero
    np.testing.assert_allclose(ours, hf, atol=5e-5, rtol=1e-5)


def test_paged_decode_logits_match_hf(pair):
    """Chunked prefill then step-by-step decode through the paged runner vs HF over the whole sequence."""
    cfg, params, model = pair
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, cfg.vocab_size, 21).tolist()
    runner = ModelRunner(cfg, params, layout=PagedLayout(num_blocks=32, block_size=4), min_blocks=16)
    table = [int(b) for b in rng.permutation(np.arange(1, 32))[:12]]
    req = Request("r", prompt, SamplingParams(max_tokens=12))
    ours = []
    for start, n in [(0, 9), (9, 12)]:  # prefill in two chunks
        runner.execute(SchedulerOutput([ScheduledChunk(req, start, n, block_table=table)]))
    ours.append(runner.last_logits()[0])
    req.append_token(int(np.argmax(ours[-1])), 0.0)
    while req.num_output_tokens < 12:
        runner.execute(SchedulerOutput([ScheduledChunk(req, req.num_tokens - 1, 1, block_table=table)]))
        ours.append(runner.last_logits()[0])
        req.append_token(int(np.argmax(ours[-1])), 0.0)

    with torch.no_grad():  # HF recomputes the whole sequence: no cache API, whose names move between releases
        full = model(torch.tensor([req.token_ids()])).logits[0].numpy()
    np.testing.assert_allclose(np.array(ours), full[len(prompt) - 1: -1], atol=5e-5, rtol=1e-5)
