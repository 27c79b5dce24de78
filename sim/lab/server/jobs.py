"""From a request body to a Job: prompts as token ids, n choices, how to sample them, how to answer.

Runs in a worker thread (handlers call it through asyncio.to_thread), so JSON parsing, validation
and tokenization never block the event loop that streams other clients' tokens. Work is bounded
before it is done: the body's size is already capped (limits.read_body), JSON that nests too deep
is 400, a text prompt longer in characters than the context is 400 before it is tokenized (the
byte tokenizer makes at least one token per character), stop strings are capped in number and
length.

Where this differs from the OpenAI API (on purpose):
- ignore_eos defaults to true (random weights: the output runs to max_tokens unless a stop is
  hit); pass ignore_eos=false to stop at the tokenizer's </s>.
- stop strings of one token become stop token ids (the engine stops); longer ones are matched on
  the decoded text. Either way the text ends before the stop string and finish_reason is "stop".
- n > 1 (and a list of prompts) is served as independent engine requests; with a seed, choice i
  samples with seed + i. seed must fit the sampler's 32-bit key (0..2^32-1): larger is 400, not wrapped.
- fields asking for what the server cannot do (logprobs, penalties, tools, audio, ...) are 400
  naming the field unless they hold their neutral value; fields it does not know are ignored
  with a logged warning, as vLLM does.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from reference.errors import ConfigError
from reference.tokenizer import ByteTokenizer
from sim.lab.server import schemas
from sim.lab.server.errors import ApiError, bad, from_validation
from sim.lab.server.limits import ServerLimits

log = logging.getLogger("servesim.server")

# Fields the server knows but cannot honour, and the values that ask for nothing.
_NEUTRAL = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
            "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
            "repeat_penalty": (None, 1), "logit_bias": (None, {}), "min_p": (None, 0), "min_tokens": (None, 0),
            "use_beam_search": (None, False), "tools": (None, []), "functions": (None, []),
            "function_call": (None, "none"), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
            "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
            "web_search_options": (None,), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
            "guided_grammar": (None,), "mirostat": (None, 0), "images": (None, []), "tool_calls": (None, []),
            "template": (None, ""), "context": (None, []), "format": (None, ""), "think": (None, False),
            "thinking": (None, ""), "response_format": (None, {"type": "text"})}


@dataclass
class Job:
    """A validated request: prompts (token ids) x n choices, how to sample them, how to answer."""

    api: str  # "completion" | "chat" (OpenAI), "generate" | "ollama_chat" (Ollama)
    model: str  # the name the client asked for (one of the served aliases)
    prompts: list[list[int]]
    n: int
    sampling: dict  # SamplingParams fields shared by every choice (seed: the base seed)
    max_tokens: list[int]  # per prompt
    max_tokens_param: str
    stop: list[str]
    stream: bool
    include_usage: bool = False
    return_token_ids: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        """A chat API (OpenAI or Ollama): the prompt came from messages."""
        return self.api in ("chat", "ollama_chat")


class JobBuilder:
    """Turns request bodies into Jobs for one served model (its aliases, tokenizer, context, limits)."""

    def __init__(self, model_names: list[str], tokenizer: ByteTokenizer, context_len: int, limits: ServerLimits):
        self.model_names = model_names
        self.tok = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.context_len = context_len
        self.limits = limits

    # ---- shared ----------------------------------------------------------------------------
    def parse(self, raw: bytes, model: type[BaseModel], where: str) -> BaseModel:
        """Bytes -> the request model: 400 for bad JSON, JSON too deep, or a field of the wrong type or range."""
        try:
            body = json.loads(raw)
        except RecursionError:
            raise bad("body", "JSON nests too deep") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise bad("body", f"not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise bad("body", f"must be a JSON object, got {type(body).__name__}")
        try:
            parsed = model.model_validate(body)
        except ValidationError as e:
            raise from_validation(e) from None
        except RecursionError:
            raise bad("body", "JSON nests too deep") from None
        self._refuse_unsupported(parsed, "")
        self._warn_unknown(parsed, where)
        return parsed

    def _refuse_unsupported(self, parsed: BaseModel, prefix: str) -> None:
        for name in type(parsed).model_fields:
            if name in _NEUTRAL and getattr(parsed, name) not in _NEUTRAL[name]:
                param = f"{prefix}{name}"
                raise bad(param, f"{_short(getattr(parsed, name))} asks for something servesim does not support")
        for name in ("options",):
            sub = getattr(parsed, name, None)
            if isinstance(sub, BaseModel):
                self._refuse_unsupported(sub, f"{name}.")
        for i, msg in enumerate(getattr(parsed, "messages", None) or []):
            if isinstance(msg, schemas.OllamaMessage):
                self._refuse_unsupported(msg, f"messages[{i}].")

    @staticmethod
    def _warn_unknown(parsed: BaseModel, where: str) -> None:
        unknown = sorted(parsed.model_extra or {})
        options = getattr(parsed, "options", None)
        if isinstance(options, BaseModel):
            unknown += [f"options.{k}" for k in sorted(options.model_extra or {})]
        if unknown:
            log.warning("%s: ignored fields the server does not know: %s", where, ", ".join(unknown))

    def check_model(self, name: str | None) -> str:
        """The served alias asked for; 400 when absent, 404 model_not_found when unknown."""
        if name is None or name == "":
            raise bad("model", f"required (this server serves {', '.join(map(repr, self.model_names))})")
        if name not in self.model_names:
            raise ApiError(404, f"The model `{name[:80]}` does not exist (this server serves "
                                f"{', '.join(map(repr, self.model_names))})", "model", code="model_not_found")
        return name

    @staticmethod
    def text(value: str, param: str) -> str:
        """value, or 400 if it is not encodable Unicode (a lone surrogate from a JSON \\ud800 escape)."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad(param, f"is not valid Unicode (lone surrogate at character {e.start})") from None
        return value

    def _check_chars(self, chars: int, param: str) -> None:
        """A prompt of at least `chars` tokens that cannot fit the context is refused before tokenizing."""
        if chars >= self.context_len:
            raise bad(param, f"the prompt is at least {chars} tokens; the context holds {self.context_len} "
                             "(exceeds the context)")

    def encode(self, text: str, param: str) -> list[int]:
        """Text prompt -> ids with <s>; its length checked against the context first."""
        self._check_chars(len(self.text(text, param)) + 1, param)
        return self.tok.encode(text, add_bos=True)

    def chat_ids(self, messages: list[dict], param: str = "messages") -> list[int]:
        """Chat template ids of messages (dicts with role, content), length checked first."""
        chars = 2 + sum(2 + len(m["content"]) for m in messages)
        for i, m in enumerate(messages):
            self.text(m["content"], f"{param}[{i}].content")
        self._check_chars(chars, param)
        try:
            return self.tok.apply_chat_template(messages)
        except ConfigError as e:
            raise ApiError(400, str(e), e.field) from None

    def stops(self, stop, param: str) -> list[str]:
        """Stop strings as a list, within the limits."""
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        lim = self.limits
        if len(stop) > lim.max_stop:
            raise bad(param, f"{len(stop)} stop strings; at most {lim.max_stop}")
        for i, s in enumerate(stop):
            if len(s) > lim.max_stop_chars:
                raise bad(param, f"stop string {i} has {len(s)} characters; at most {lim.max_stop_chars}")
            self.text(s, param)
        return stop

    def sampling(self, *, temperature, top_p, top_k, seed, stop: list[str], stop_ids, ignore_eos: bool) -> dict:
        """SamplingParams fields (without max_tokens); one-token stop strings become stop token ids."""
        ids = set(stop_ids) | {t for t in map(self.tok.single_token, stop) if t is not None}
        if not ignore_eos:
            ids.add(self.tok.eos_id)
        return dict(temperature=1.0 if temperature is None else float(temperature),
                    top_p=1.0 if top_p is None else float(top_p), top_k=max(top_k or 0, 0), seed=seed,
                    stop_token_ids=tuple(sorted(ids)), ignore_eos=ignore_eos)

    # ---- OpenAI --------------------------------------------------------------------------
    def openai(self, raw: bytes, chat: bool) -> Job:
        """POST /v1/completions or /v1/chat/completions."""
        model = schemas.ChatCompletionRequest if chat else schemas.CompletionRequest
        req = self.parse(raw, model, "/v1/chat/completions" if chat else "/v1/completions")
        name = self.check_model(req.model)
        if req.best_of not in (None, req.n):
            raise bad("best_of", f"{_short(req.best_of)}: only best_of = n is supported by servesim")
        if chat and req.tool_choice not in (None, "none") and not req.tools:
            raise bad("tool_choice", "given without tools (and tools are not supported by servesim)")
        if chat:
            prompts = [self.chat_ids([{"role": m.role, "content": _content(m.content)} for m in req.messages])]
        else:
            prompts = self._prompts(req.prompt)
        if req.n * len(prompts) > self.limits.max_choices:
            raise bad("n", f"{req.n} choices x {len(prompts)} prompts is more than {self.limits.max_choices}")
        param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        given = req.max_completion_tokens if param == "max_completion_tokens" else req.max_tokens
        # OpenAI / vLLM chat: up to the context; completions: 16
        max_tokens = [given or (self.context_len - len(p) if chat else 16) for p in prompts]
        stop = self.stops(req.stop, "stop")
        bad_id = next((t for t in req.stop_token_ids or [] if not 0 <= t < self.vocab_size), None)
        if bad_id is not None:
            raise bad("stop_token_ids", f"token id {bad_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        sampling = self.sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                 stop=stop, stop_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return Job("chat" if chat else "completion", name, prompts, req.n, sampling, max_tokens, param, stop,
                   req.stream, include_usage, req.return_token_ids)

    def _prompts(self, p) -> list[list[int]]:
        if p is None:
            raise bad("prompt", "required: a string, a list of strings, token ids or lists of token ids")
        if isinstance(p, str):
            return [self.encode(p, "prompt")]
        if not p:
            raise bad("prompt", "must not be empty")
        if isinstance(p[0], int):
            prompts = [p]
        elif isinstance(p[0], str):
            if len(p) > self.limits.max_choices:
                raise bad("prompt", f"{len(p)} prompts; at most {self.limits.max_choices}")
            return [self.encode(s, f"prompt[{i}]") for i, s in enumerate(p)]
        else:
            prompts = p
        if len(prompts) > self.limits.max_choices:
            raise bad("prompt", f"{len(prompts)} prompts; at most {self.limits.max_choices}")
        for i, ids in enumerate(prompts):
            if not ids:
                raise bad("prompt", f"prompt {i} has no tokens")
            if len(ids) >= self.context_len:
                raise bad("prompt", f"prompt {i} has {len(ids)} tokens; the context holds {self.context_len} "
                                    "(exceeds the context)")
            bad_id = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad_id is not None:
                raise bad("prompt", f"token id {bad_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        return prompts

    # ---- Ollama --------------------------------------------------------------------------
    def ollama(self, raw: bytes, chat: bool) -> Job:
        """POST /api/chat or /api/generate; a Job without prompts for Ollama's "load the model" request."""
        model = schemas.OllamaChatRequest if chat else schemas.GenerateRequest
        req = self.parse(raw, model, "/api/chat" if chat else "/api/generate")
        name = self.check_model(req.model)
        if chat and req.tools:
            raise bad("tools", "tools are not supported by servesim")
        opts = req.options or schemas.OllamaOptions()
        if opts.num_ctx is not None and opts.num_ctx > self.context_len:
            raise bad("options.num_ctx", f"{opts.num_ctx} is more than this engine's context of {self.context_len} "
                                         "tokens (set at start-up)")
        if chat:
            if not req.messages:
                return Job("ollama_chat", name, [], 1, {}, [], "options.num_predict", [], False)
            prompt = self.chat_ids([{"role": m.role, "content": m.content} for m in req.messages])
        else:
            if not req.prompt:
                return Job("generate", name, [], 1, {}, [], "options.num_predict", [], False)
            if req.raw:
                prompt = self.encode(req.prompt, "prompt")
            else:
                msgs = ([{"role": "system", "content": req.system}] if req.system else []) + \
                       [{"role": "user", "content": req.prompt}]
                prompt = self.chat_ids(msgs, "prompt")
        np_ = opts.num_predict
        max_tokens = np_ if np_ is not None and np_ > 0 else self.context_len - len(prompt)
        stop = self.stops(opts.stop, "options.stop")
        seed = opts.seed if opts.seed is not None and opts.seed >= 0 else None  # < 0: Ollama's "random"
        if seed is not None and seed > schemas.SEED_MAX:
            raise bad("options.seed", f"{seed} does not fit the sampler's 32-bit seed (0..{schemas.SEED_MAX})")
        # Ollama's defaults: temperature 0.8, top_k 40, top_p 0.9; it stops at end of sequence.
        sampling = self.sampling(temperature=0.8 if opts.temperature is None else opts.temperature,
                                 top_p=0.9 if opts.top_p is None else opts.top_p,
                                 top_k=40 if opts.top_k is None else opts.top_k, seed=seed, stop=stop, stop_ids=[],
                                 ignore_eos=True)
        return Job("ollama_chat" if chat else "generate", name, [prompt], 1, sampling, [max_tokens],
                   "options.num_predict", stop, req.stream)


def _content(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _short(v, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."
