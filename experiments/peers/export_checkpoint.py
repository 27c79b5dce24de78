"""Write the project's random-weight model as checkpoints the real engines load.

    python experiments/peers/export_checkpoint.py --preset small-100m --seed 0 --out DIR \
        [--llamacpp /work/peers/llamacpp] [--force]

Writes, from reference.model.init_params(get_preset(PRESET), SEED) (float32, nothing downloaded):

  DIR/hf/config.json               LlamaForCausalLM config with the preset's shapes
  DIR/hf/generation_config.json    bos 1, eos 2, pad 0
  DIR/hf/model.safetensors         the weights, float32, in HF's names and [out, in] layout
                                   (the transpose of reference/model.py's [in, out])
  DIR/hf/tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
                                   a byte-level BPE (tokenizers library, no merges) wrapped in
                                   PreTrainedTokenizerFast, built to give the same ids as
                                   reference.tokenizer.ByteTokenizer (see build_tokenizer)
  DIR/servesim.json                preset and seed, so a test can rebuild the same weights

and with --llamacpp BUILD_DIR (the folder experiments/peers/llamacpp.sh setup filled):

  DIR/gguf/model-f16.gguf          llama.cpp's vendored convert_hf_to_gguf.py --outtype f16, run
                                   through convert_gguf.py (two small patches, see there) in
                                   BUILD_DIR/convert-venv
  DIR/gguf/model-q4_k_m.gguf       BUILD_DIR/build/bin/llama-quantize ... Q4_K_M

Files already present are kept unless --force. Bad options exit with a message naming the option.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from reference.config import PRESETS, ModelConfig, get_preset
from reference.tokenizer import BYTE_OFFSET, MIN_VOCAB, SPECIALS

HERE = Path(__file__).resolve().parent

# The project's chat template (reference.tokenizer.ByteTokenizer.apply_chat_template) in Jinja:
# <s>, then <|role|> content <|end|> per message, then <|assistant|> (always, as the project does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] in ['system', 'developer'] %}<|system|>"
    "{% elif m['role'] == 'user' %}<|user|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "<|assistant|>"
)


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' LlamaForCausalLM (legacy rope_theta keys: every reader knows them)."""
    if cfg.qkv_bias:
        raise SystemExit(f"--preset: {cfg.name} has qkv biases (Qwen2); only Llama-shaped presets are exported")
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }


def hf_state_dict(params) -> dict[str, np.ndarray]:
    """HF Llama tensor names -> float32 arrays; linear weights transposed to [out, in]."""
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))  # noqa: E731
    sd = {"model.embed_tokens.weight": f32(params.embed), "model.norm.weight": f32(params.final_norm)}
    if params.lm_head is not None:  # tied: HF reuses the embedding, no lm_head tensor
        sd["lm_head.weight"] = f32(np.asarray(params.lm_head).T)
    for i, lp in enumerate(params.layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": f32(lp.attn_norm),
               p + "post_attention_layernorm.weight": f32(lp.mlp_norm),
               p + "self_attn.q_proj.weight": f32(np.asarray(lp.wq).T),
               p + "self_attn.k_proj.weight": f32(np.asarray(lp.wk).T),
               p + "self_attn.v_proj.weight": f32(np.asarray(lp.wv).T),
               p + "self_attn.o_proj.weight": f32(np.asarray(lp.wo).T),
               p + "mlp.gate_proj.weight": f32(np.asarray(lp.w_gate).T),
               p + "mlp.up_proj.weight": f32(np.asarray(lp.w_up).T),
               p + "mlp.down_proj.weight": f32(np.asarray(lp.w_down).T)}
    return sd


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer(vocab_size: int):
    """A PreTrainedTokenizerFast giving ByteTokenizer's ids.

    Vocabulary: ids 0..7 the specials (added special tokens), ids 8..263 the 256 byte-level
    characters (id = 8 + byte), ids 264..V-1 the strings <|id|> as plain vocabulary entries.
    No merges, so BPE leaves every byte its own token: text -> [8 + b for b in utf8(text)], the
    ids ByteTokenizer.encode gives; the post-processor adds <s> in front, as the project's server
    does for a text prompt (encode(..., add_bos=True)). Where they differ: a special's name in the
    text ("<s>", "<|user|>", ...) becomes that special's id here (HF always parses added special
    tokens) but stays bytes in ByteTokenizer.encode. <|id|> for an extra id stays bytes in both
    (the entry is unreachable without merges) and decodes to the text <|id|> in both.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise SystemExit(f"--preset: vocab_size {vocab_size} < {MIN_VOCAB}, too small for a byte tokenizer")
    b2u = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab |= {b2u[b]: BYTE_OFFSET + b for b in range(256)}
    vocab |= {f"<|{i}|>": i for i in range(MIN_VOCAB, vocab_size)}
    assert len(vocab) == vocab_size and sorted(vocab.values()) == list(range(vocab_size))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting (irrelevant without merges, and simplest to reason about).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", add_bos_token=True, add_eos_token=False,
                                   model_max_length=1 << 30)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_hf(cfg: ModelConfig, seed: int, out: Path) -> None:
    from safetensors.numpy import save_file

    from reference.model import init_params

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
    save_file(hf_state_dict(init_params(cfg, seed)), str(out / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(cfg.vocab_size).save_pretrained(str(out))
    # transformers 5 records its own class name (TokenizersBackend); PreTrainedTokenizerFast is
    # what every reader knows (transformers 4 and 5, vLLM, llama.cpp's converter).
    tc_file = out / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text())
    tc |= {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False}
    tc_file.write_text(json.dumps(tc, indent=2) + "\n")


def llamacpp_tools(build: Path) -> tuple[Path, Path, Path]:
    """(converter venv python, vendored llama.cpp source, llama-quantize) of a llamacpp.sh build folder."""
    if not build.is_dir():
        raise SystemExit(f"--llamacpp: {build} is not a folder")
    tools = (build / "convert-venv" / "bin" / "python", build / "src", build / "build" / "bin" / "llama-quantize")
    for need in (tools[0], tools[1] / "convert_hf_to_gguf.py", tools[2]):
        if not need.exists():
            raise SystemExit(f"--llamacpp: {need} is missing; run experiments/peers/llamacpp.sh setup first")
    return tools


def write_gguf(hf: Path, out: Path, build: Path, force: bool) -> None:
    """f16 GGUF through the vendored converter, then Q4_K_M with llama-quantize."""
    py, src, quantize = llamacpp_tools(build)
    out.mkdir(parents=True, exist_ok=True)
    f16, q4 = out / "model-f16.gguf", out / "model-q4_k_m.gguf"
    if force or not f16.exists():
        run([str(py), str(HERE / "convert_gguf.py"), str(src), str(hf), "--outtype", "f16", "--outfile", str(f16)])
    if force or not q4.exists():
        run([str(quantize), str(f16), str(q4), "Q4_K_M"])


def run(cmd: list[str]) -> None:
    t0 = time.perf_counter()
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-100m", help="model preset (reference/config.py)")
    ap.add_argument("--seed", type=int, default=0, help="init_params seed")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--llamacpp", type=Path, help="llama.cpp build folder (llamacpp.sh setup) to also write GGUF")
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {args.preset!r}; one of {', '.join(PRESETS)}")
    cfg = get_preset(args.preset)
    if cfg.num_params > 2e9:
        raise SystemExit(f"--preset: {args.preset} has {cfg.num_params / 1e9:.1f}B parameters; "
                         "random float32 weights that large do not fit this workflow")
    if args.llamacpp is not None:
        llamacpp_tools(args.llamacpp.resolve())  # before writing anything
    out: Path = args.out
    meta = {"preset": args.preset, "seed": args.seed}
    meta_file = out / "servesim.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta and not args.force:
        raise SystemExit(f"--out: {out} holds {json.loads(meta_file.read_text())}, not {meta}; use --force")
    hf = out / "hf"
    if args.force or not (hf / "model.safetensors").exists():
        t0 = time.perf_counter()
        write_hf(cfg, args.seed, hf)
        print(f"wrote {hf} ({time.perf_counter() - t0:.1f} s)")
    out.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta) + "\n")
    if args.llamacpp is not None:
        write_gguf(hf, out / "gguf", args.llamacpp.resolve(), args.force)
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out)}  {f.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
