"""Real clients against `servesim serve`: the official ollama client (chat, generate, streaming, list,
show, ps, version), litellm through both its OpenAI and its Ollama providers, and an Ollama-vs-vLLM
article-style aiohttp load client (experiments/benchmarks/http_users.py) served by the model alias
"llama3.1:8b" on both engines."""
from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
ollama = pytest.importorskip("ollama")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its price list
litellm = pytest.importorskip("litellm")

from reference.model import init_params  # noqa: E402
from sim.lab.server import create_app  # noqa: E402
from tests.server_harness import EXP, MODEL, PAGED_BUCKETS, SLOT_BUCKETS, serving, wait_idle  # noqa: E402

ALIAS = "llama3.1:8b"
_SPEC = importlib.util.spec_from_file_location(
    "http_users", Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "http_users.py")
http_users = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(http_users)
run_level = http_users.run_level


@pytest.fixture(scope="module", params=["continuous", "ollama"])
def srv(request):
    options = PAGED_BUCKETS if request.param == "continuous" else SLOT_BUCKETS
    app = create_app(EXP, request.param, params=init_params(EXP.model_spec, EXP.seed), runner_options=options,
                     model_names=[ALIAS, MODEL])
    with serving(app) as url:
        yield url, app.state.servesim


def test_ollama_client_chat_generate_and_models(srv):
    url, state = srv
    client = ollama.Client(host=url)
    r = client.chat(model=ALIAS, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 5, "seed": 3},
                    stream=False)
    assert r.done and r.done_reason == "length" and r.eval_count == 5 and r.message.role == "assistant"
    assert r.prompt_eval_count == len(state.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    again = client.chat(model=ALIAS, messages=[{"role": "user", "content": "hi"}],
                        options={"num_predict": 5, "seed": 3})
    assert again.message.content == r.message.content  # same seed, same text
    parts = list(client.chat(model=ALIAS, messages=[{"role": "user", "content": "hi"}],
                             options={"num_predict": 5, "seed": 3}, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == 5

    g = client.generate(model=ALIAS, prompt="Hello", options={"num_predict": 4, "temperature": 0})
    assert g.done and g.eval_count == 4
    streamed = list(client.generate(model=ALIAS, prompt="Hello", options={"num_predict": 4, "temperature": 0},
                                    stream=True))
    assert "".join(p.response for p in streamed) == g.response
    # a stop string ends the text before it
    if len(g.response) > 2 and g.response[1:3].strip():
        s = client.generate(model=ALIAS, prompt="Hello", options={"num_predict": 4, "temperature": 0,
                                                                   "stop": [g.response[1:3]]})
        assert s.response == g.response[:g.response.index(g.response[1:3])] and s.done_reason == "stop"

    assert [m.model for m in client.list().models] == [ALIAS, MODEL]
    show = client.show(ALIAS)
    assert show.modelinfo["llama.context_length"] == state.context_len and show.details.family == "llama"
    assert [m.model for m in client.ps().models] == [ALIAS, MODEL]
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope:1b", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert client.generate(model=ALIAS, prompt="").done_reason == "load"  # Ollama's "load the model" call
    wait_idle(url)


def test_litellm_openai_and_ollama_providers(srv):
    url, _ = srv
    r = litellm.completion(model=f"openai/{ALIAS}", api_base=url + "/v1", api_key="x",
                           messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    r = litellm.completion(model=f"ollama_chat/{ALIAS}", api_base=url, messages=[{"role": "user", "content": "hi"}],
                           max_tokens=3)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens == 3
    wait_idle(url)


def test_article_style_client(srv):
    url, _ = srv
    level = asyncio.run(run_level(url, ALIAS, users=4, requests=8, max_tokens=5, prompt="Tell me a story."))
    assert level["completed"] == 8 and level["failed"] == 0 and level["completion_tokens"] == 40
    assert level["output_tok_s"] > 0
    wait_idle(url)
