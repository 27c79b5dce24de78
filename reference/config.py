"""Model shapes: the Llama-family presets with their real dimensions, and what follows from them.

Plain Python (no JAX): the simulator sizes memory and step costs from the same shapes.
Parameter counts, weight bytes and KV bytes per token are derived, never typed in.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from reference.errors import ConfigError


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 rotary frequency scaling (long-context 'llama3' rope_type)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-architecture decoder (pre-norm, RoPE, GQA, SwiGLU)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds biases to the q, k, v projections
    max_position: int = 4096
    source: str = field(default="", compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be a positive integer, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("model.num_kv_heads",
                              f"{self.num_kv_heads} does not divide num_heads={self.num_heads}",
                              "a divisor of num_heads")

    @property
    def q_size(self) -> int:
        """Width of the query projection output."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projection outputs."""
        return self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two RMSNorm weights)."""
        h = self.hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        """Parameters of the token embedding (and of the LM head when untied)."""
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Total parameters, counting an untied LM head."""
        head = 0 if self.tie_embeddings else self.embedding_params
        return self.embedding_params + head + self.num_layers * self.params_per_layer + self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (all but the embedding lookup and norms).

        A forward pass costs about 2 * matmul_params FLOPs per token, plus attention.
        """
        lm_head = self.embedding_params
        return self.num_layers * (self.params_per_layer - 2 * self.hidden_size) + lm_head

    def weight_bytes(self, bits_per_weight: float = 16.0) -> int:
        """Bytes of all weights at the given precision (bits per weight, e.g. 16, 8, 4.85)."""
        return int(round(self.num_params * bits_per_weight / 8))

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> int:
        """Bytes of K and V for one token across all layers (bytes)."""
        return int(round(2 * self.num_layers * self.kv_size * bytes_per_element))

    def attention_flops(self, query_tokens: int, context_tokens: int) -> float:
        """FLOPs of QK^T and PV for query_tokens attending over context_tokens each (all layers)."""
        return 4.0 * self.num_layers * self.q_size * query_tokens * context_tokens

    def scaled(self, **changes) -> ModelConfig:
        """A copy with some fields changed (tests and benchmarks build variants this way)."""
        return replace(self, **changes)


_LLAMA31_ROPE = Llama3RopeScaling()

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig("llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                    rope_scaling=_LLAMA31_ROPE, max_position=131072,
                    source="meta-llama/Llama-3.1-8B config.json"),
        ModelConfig("llama-3.1-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                    num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                    rope_scaling=_LLAMA31_ROPE, max_position=131072,
                    source="meta-llama/Llama-3.1-70B config.json"),
        ModelConfig("llama-2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                    num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, max_position=4096,
                    source="meta-llama/Llama-2-7b-hf config.json"),
        ModelConfig("llama-2-13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                    num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128, max_position=4096,
                    source="meta-llama/Llama-2-13b-hf config.json"),
        ModelConfig("mistral-7b-v0.3", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                    max_position=32768, source="mistralai/Mistral-7B-v0.3 config.json"),
        ModelConfig("qwen2.5-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                    num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, qkv_bias=True, max_position=32768,
                    source="Qwen/Qwen2.5-7B config.json"),
        # ~100M parameters: big enough that a CPU decode step is weight-bandwidth bound.
        ModelConfig("small-100m", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                    num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64, tie_embeddings=True,
                    max_position=4096, source="servesim benchmark shape"),
        ModelConfig("tiny", vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position=2048,
                    source="servesim test shape"),
    ]
}


def get_preset(name: str) -> ModelConfig:
    """The preset called name; ConfigError listing the presets otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError("model", f"unknown preset {name!r}", ", ".join(PRESETS)) from None
