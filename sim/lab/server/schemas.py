"""Request bodies as pydantic models: OpenAI's (/v1) and Ollama's (/api), with their field names.

Types and ranges are checked here (a violation is 400 naming the field, sim.lab.server.errors).
Fields the server knows but cannot honour (logprobs, tools, audio, ...) are declared so that
sim.lab.server.jobs can refuse them by name unless they hold their neutral value; fields nobody
declared are kept (extra="allow") and ignored with a logged warning, as vLLM does.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = (1 << 32) - 1  # the sampler keys its PRNG with 32 bits; larger seeds are refused, not wrapped


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # "3" is not an integer, true is not 1


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class _OpenAISampling(_Body):
    model: str | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    ignore_eos: bool = True  # random weights: run to max_tokens unless told otherwise (documented difference)
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    user: str | None = None
    # Known, not supported unless neutral (jobs.UNSUPPORTED)
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    min_p: Any = None
    min_tokens: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


class CompletionRequest(_OpenAISampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]], None] = None
    echo: Any = None
    suffix: Any = None


class ChatCompletionRequest(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


# ------------------------------------------------------------------------------- Ollama


class OllamaOptions(_Body):
    """Ollama's `options` (the Modelfile parameters); those a sampler here has, plus ones known and ignored."""

    num_predict: int | None = None  # -1 or absent: until the context is full; -2: same (no context shift here)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = None  # < 0: a random seed, as Ollama
    stop: Union[str, list[str], None] = None
    num_ctx: int | None = Field(None, ge=1)  # the engine's context is fixed at start-up: checked, not changed
    # Known, not supported unless neutral
    repeat_penalty: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    min_p: Any = None
    mirostat: Any = None


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: Any = None
    tool_calls: Any = None
    thinking: Any = None


class _OllamaBody(_Body):
    model: str = Field(..., min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    options: OllamaOptions | None = None
    keep_alive: Any = None  # the model stays loaded for the server's life: accepted, nothing to do
    format: Any = None
    think: Any = None


class GenerateRequest(_OllamaBody):
    """POST /api/generate."""

    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: Any = None
    images: Any = None
    template: Any = None
    context: Any = None


class OllamaChatRequest(_OllamaBody):
    """POST /api/chat."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: Any = None


class ShowRequest(_Body):
    """POST /api/show (`model`, or the older `name`)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False
