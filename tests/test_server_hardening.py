"""The server against bad input and abuse: every bad request of issue 16 gets its status and an
OpenAI- (or Ollama-) shaped body, the server stays healthy, and the limits hold: API key, body
size, stop strings, prompt length, queue bound, unknown model aliases, graceful drain."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
aiohttp = pytest.importorskip("aiohttp")

from reference.model import init_params  # noqa: E402
from sim.lab.server import ServerLimits, create_app  # noqa: E402
from tests.server_harness import EXP, MODEL, PAGED_BUCKETS, prompt_ids, serving, wait_idle  # noqa: E402

KEY = "sk-test-key"
ALIAS = "llama3.1:8b"
LIMITS = ServerLimits(max_body_bytes=256 * 1024, max_stop=4, max_stop_chars=32, max_queue=16, drain_s=1.0,
                      api_key=KEY)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv():
    app = create_app(EXP, "continuous", params=init_params(EXP.model_spec, EXP.seed), runner_options=PAGED_BUCKETS,
                     model_names=[MODEL, ALIAS], limits=LIMITS)
    with serving(app) as url:
        yield url, app.state.servesim


def post(url, path, body=None, *, content=None, headers=AUTH, **kw):
    """POST JSON (escaped to ASCII, so lone surrogates travel as \\ud800 escapes, as a JSON client sends them)."""
    if body is not None:
        content = json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **headers,
                                                            **kw.pop("extra", {})}, timeout=30, **kw)


def ok_body(**kw):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (path, raw body or JSON, expected status, the field the error names or None)
BAD = [
    ("/v1/completions", ok_body(model="gpt-4"), 404, "model"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/completions", ok_body(prompt="\ud800 lone"), 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\udfffb"}]}, 400,
     "messages[0].content"),
    ("/v1/completions", deep_json(100_000), 400, "body"),
    ("/v1/completions", deep_json(500), 400, "body"),
    ("/v1/completions", b"\xff\xfe not json", 400, "body"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/completions", ok_body(temperature=3), 400, "temperature"),
    ("/v1/completions", ok_body(temperature=-0.1), 400, "temperature"),
    ("/v1/completions", ok_body(seed=1 << 40), 400, "seed"),
    ("/v1/completions", ok_body(seed=-1), 400, "seed"),
    ("/v1/completions", ok_body(max_tokens="3"), 400, "max_tokens"),
    ("/v1/completions", ok_body(stream="yes"), 400, "stream"),
    ("/v1/completions", ok_body(response_format={"type": "json_object"}), 400, "response_format"),
    ("/v1/completions", ok_body(echo=True), 400, "echo"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, 400,
     "audio"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "prediction": {"type": "content", "content": "x"}}, 400, "prediction"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "reasoning_effort": "high"}, 400, "reasoning_effort"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/completions", ok_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/v1/completions", ok_body(stop=["x" * 33]), 400, "stop"),
    ("/v1/completions", ok_body(prompt="y" * 200), 400, "prompt"),
    ("/v1/completions", ok_body(prompt=[[5] * 200]), 400, "prompt"),
    ("/v1/completions", ok_body(prompt=[]), 400, "prompt"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[0]}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_an_openai_body(srv, path, body, status, param):
    url, _ = srv
    r = post(url, path, content=body, extra={"content-type": "application/json"}) if isinstance(body, bytes) \
        else post(url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    if status == 404:
        assert err["code"] == "model_not_found"
    assert httpx.get(url + "/health").status_code == 200


def test_framework_errors_are_openai_shaped(srv):
    url, _ = srv
    for r, status in ((httpx.get(url + "/v1/nothing", headers=AUTH), 404),
                      (httpx.delete(url + "/v1/completions", headers=AUTH), 405),
                      (httpx.get(url + "/v1/models/nope", headers=AUTH), 404)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.get(url + f"/v1/models/{ALIAS}", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == ALIAS
    assert [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]] == [MODEL, ALIAS]
    r = httpx.post(url + "/api/generate", json={"model": "nope", "prompt": "x"}, headers=AUTH)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)  # Ollama's shape on /api


def test_api_key(srv):
    url, _ = srv
    assert httpx.post(url + "/v1/completions", json=ok_body()).status_code == 401
    r = httpx.post(url + "/v1/completions", json=ok_body(), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/api/tags").status_code == 401
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    assert post(url, "/v1/completions", ok_body()).status_code == 200


def test_body_limit_is_413_before_reading(srv):
    url, _ = srv
    big = json.dumps(ok_body(prompt="z" * (300 * 1024))).encode()
    r = post(url, "/v1/completions", content=big, extra={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("body")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(300):
            yield b" " * 1024
    r = httpx.post(url + "/v1/completions", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert httpx.get(url + "/health").status_code == 200


def test_unknown_fields_are_ignored_with_a_warning(srv, caplog):
    url, _ = srv
    with caplog.at_level(logging.WARNING, logger="servesim.server"):
        r = post(url, "/v1/completions", ok_body(frobnicate=1, another={"x": 1}))
    assert r.status_code == 200
    assert any("frobnicate" in m and "another" in m for m in caplog.messages)


def test_alias_is_served_and_echoed(srv):
    url, _ = srv
    r = post(url, "/v1/chat/completions", {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == ALIAS and r.json()["usage"]["completion_tokens"] == 3


def test_queue_bound_answers_503_with_retry_after(srv):
    url, state = srv
    before = wait_idle(url)

    async def go():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=AUTH) as s:
            async def one(i):
                body = {"model": MODEL, "prompt": prompt_ids(i), "max_tokens": 30}
                async with s.post(url + "/v1/completions", json=body) as r:
                    return r.status, r.headers.get("Retry-After")
            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(go())
    busy = [ra for st, ra in results if st == 503]
    assert {st for st, _ in results} <= {200, 503} and busy and all(ra == "1" for ra in busy)
    after = wait_idle(url)
    assert after['servesim:request_refused_total{reason="busy"}'] - before['servesim:request_refused_total{reason="busy"}'] \
        == len(busy)


def test_graceful_shutdown_drains_then_ends_streams_with_an_error():
    app = create_app(EXP, "continuous", params=init_params(EXP.model_spec, EXP.seed), runner_options=PAGED_BUCKETS,
                     limits=ServerLimits(drain_s=0.5))
    state = app.state.servesim
    runner = state.loop.engine.runner
    execute = runner.execute

    def slow(*a, **k):  # 20 ms a step: a 100-token stream outlives the drain deadline
        time.sleep(0.02)
        return execute(*a, **k)

    runner.execute = slow
    lines: list[bytes] = []
    with serving(app) as url:
        started = threading.Event()

        def client():
            body = {"model": MODEL, "prompt": prompt_ids(1), "max_tokens": 100, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    started.set()
                    lines.append(line.encode())
        t = threading.Thread(target=client)
        t.start()
        assert started.wait(30)
        t0 = time.monotonic()
    t.join(30)
    assert time.monotonic() - t0 < 10  # the drain deadline, not the stream's 100 tokens, ended it
    events = [json.loads(x[6:]) for x in lines if x.startswith(b"data: {")]
    assert "error" in events[-1] and "shutting down" in events[-1]["error"]["message"]
    assert len(events) < 100
