"""`servesim serve` on loopback with the tiny model: the OpenAI client, 256 concurrent streams,
a full queue answered 503, bad input answered 400, disconnects that free their KV, /metrics
that agree with what clients saw, no compile while serving, and `servesim bench --url` driving it.

Two servers per module (continuous batching, and Ollama-style sequential with max_queue 8), built
as tests/server_harness.py says.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
aiohttp = pytest.importorskip("aiohttp")
openai = pytest.importorskip("openai")

from click.testing import CliRunner  # noqa: E402

from reference.errors import ConfigError  # noqa: E402
from reference.model import init_params  # noqa: E402
from reference.request import Request, SamplingParams  # noqa: E402
from reference.tokenizer import ByteTokenizer, TextStream  # noqa: E402
from sim.lab.server import create_app, engine_loop  # noqa: E402
from sim.lab.server.engine_loop import Sub  # noqa: E402
from sim.lab.server.errors import ApiError  # noqa: E402
from sim.lab.server.jobs import Job  # noqa: E402
from tests.server_harness import (CONFIG, EXP, MODEL, PAGED_BUCKETS, SLOT_BUCKETS, metrics, prompt_ids,  # noqa: E402
                                  serving, wait_idle)


@pytest.fixture(scope="module")
def params():
    return init_params(EXP.model_spec, EXP.seed)


@pytest.fixture(scope="module")
def cont(params):
    app = create_app(EXP, "continuous", params=params, runner_options=PAGED_BUCKETS)
    with serving(app) as url:
        yield url, app.state.servesim


@pytest.fixture(scope="module")
def seq(params):
    app = create_app(EXP, "ollama", params=params, runner_options=SLOT_BUCKETS)
    with serving(app) as url:
        yield url, app.state.servesim


async def stream_completion(session, url: str, prompt, max_tokens: int) -> tuple[int, dict]:
    """One streaming /v1/completions: (status, {"tokens", "usage", "finish", "error", "retry_after"})."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.7,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            return resp.status, {"error": await resp.json(), "retry_after": resp.headers.get("Retry-After")}
        out = {"tokens": 0, "usage": None, "finish": None, "done": False}
        async for line in resp.content:
            line = line.strip()
            if not line:
                continue
            assert line.startswith(b"data: ")
            if line == b"data: [DONE]":
                out["done"] = True
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                out["tokens"] += len(c["token_ids"])
                out["finish"] = c["finish_reason"] or out["finish"]
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
        return 200, out


async def many_streams(url: str, count: int, max_tokens: int) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(stream_completion(session, url, prompt_ids(i), max_tokens)
                                      for i in range(count)))


# ---------------------------------------------------------------------------------------
# Tokenizer (no server)

def test_tokenizer_round_trip_and_stop_strings():
    tok = ByteTokenizer(512)
    text = "héllo, wörld\n<|300|>"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(text, parse_special=True)
    assert ids[-1] == 300 and tok.decode(ids) == text
    assert all(0 <= t < 512 for t in tok.encode(text, add_bos=True))
    assert tok.single_token("\n") == 8 + 10 and tok.single_token("ab") is None
    chat = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    assert chat[0] == tok.bos_id and tok.decode(chat, skip_special=False).endswith("hi<|end|><|assistant|>")
    ts = TextStream(tok, ["lo, w"])
    pieces = [ts.push(t) for t in tok.encode("hello, world")]
    assert "".join(pieces) == "hel" and ts.stopped  # "l" held back until "lo, w" was certain
    ts = TextStream(tok, ["xyz"])
    assert "".join(ts.push(t) for t in tok.encode("abcxy")) + ts.finish() == "abcxy"


# ---------------------------------------------------------------------------------------
# OpenAI client

def test_openai_client_completions_chat_streaming(cont):
    url, state = cont
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]

    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("Hello there") + 1  # + <s>
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5

    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text  # greedy: same text
    assert chunks[-1].usage.completion_tokens == 7 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_completion_tokens=4, n=2, seed=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 8
    assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) \
        == ["length", "length"]

    # Stop strings: the text ends before the first occurrence, finish_reason "stop"; a one-token stop
    # string becomes a stop token id (the engine stops), a longer one is matched on the text.
    full = client.completions.create(model=MODEL, prompt=[9, 10, 11], max_tokens=12, temperature=0,
                                     extra_body={"return_token_ids": True})
    ids, text, tok = full.choices[0].model_extra["token_ids"], full.choices[0].text, state.tokenizer
    pieces = [(tok.decode(ids[k:k + m]), k + m) for m in (1, 2) for k in range(1, 10)]
    one = next((p, e) for p, e in pieces if p and p in text and tok.single_token(p) is not None)
    longer = next((p, e) for p, e in pieces if p and p in text and tok.single_token(p) is None)
    for stop, end in (one, longer):
        r = client.completions.create(model=MODEL, prompt=[9, 10, 11], max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens <= end
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    wait_idle(url)


def test_a_non_streamed_answer_gets_its_tokens_once(cont, monkeypatch):
    """Without a stream or stop strings the handler is woken once for the tokens, not once per step;
    the answer is the same text as the stream's (greedy)."""
    url, _ = cont
    seen: list[tuple[str, str, int]] = []  # (request id, event kind, token count) as the event loop gets them
    dispatch = engine_loop._dispatch

    def spy(events):
        seen.extend((sub.req.request_id, kind, len(data) if kind == "tokens" else 0) for sub, kind, data in events)
        dispatch(events)

    monkeypatch.setattr(engine_loop, "_dispatch", spy)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    whole = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0)
    tokens = [n for _, kind, n in seen if kind == "tokens"]
    assert tokens == [6] and [k for _, k, _ in seen][-1] == "finished"
    seen.clear()
    stopped = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0,
                                        stop=["@@@@@@@@"])  # matched on the text: every step's tokens are needed
    assert [n for _, kind, n in seen if kind == "tokens"] == [1] * 6
    seen.clear()
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0,
                                            stream=True))
    assert [n for _, kind, n in seen if kind == "tokens"] == [1] * 6
    assert whole.choices[0].text == stopped.choices[0].text == "".join(c.choices[0].text for c in chunks)
    wait_idle(url)


def test_stream_interval_sends_the_first_token_then_every_k(cont, monkeypatch):
    """--stream-interval 3 (vLLM's semantics): the first token at once, then 3 at a time, the rest at the end, each
    send one SSE event; the text is the same as with interval 1; a request with stop strings still gets every
    step's tokens."""
    url, state = cont
    seen: list[tuple[str, int]] = []
    dispatch = engine_loop._dispatch

    def spy(events):
        seen.extend((kind, len(data) if kind == "tokens" else 0) for sub, kind, data in events)
        dispatch(events)

    monkeypatch.setattr(engine_loop, "_dispatch", spy)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    ask = dict(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0, stream=True)
    each = "".join(c.choices[0].text for c in client.completions.create(**ask))
    assert [n for kind, n in seen if kind == "tokens"] == [1] * 8
    monkeypatch.setattr(state, "stream_interval", 3)
    seen.clear()
    chunks = list(client.completions.create(**ask))
    assert [n for kind, n in seen if kind == "tokens"] == [1, 3, 3, 1]
    assert len(chunks) == 5  # as vLLM: one event per engine send (its tokens' text together), then the finish
    assert "".join(c.choices[0].text for c in chunks) == each
    assert chunks[-1].choices[0].finish_reason == "length"
    seen.clear()
    list(client.completions.create(**ask, stop=["@@@@@@@@"]))
    assert [n for kind, n in seen if kind == "tokens"] == [1] * 8
    wait_idle(url)


def test_stream_interval_below_one_is_refused(params):
    with pytest.raises(ConfigError, match="stream_interval.*>= 1"):
        create_app(EXP, "continuous", params=params, runner_options=PAGED_BUCKETS, stream_interval=0)


def test_events_waiting_together_come_out_in_one_batch(cont):
    """A stream writes what was waiting when its handler woke in one go (choice_batches)."""
    _, state = cont
    ids = state.tokenizer.encode("abcd")

    async def batches():
        queue: asyncio.Queue = asyncio.Queue()
        job = Job("completion", MODEL, [[1, 2, 3]], 1, {}, [len(ids)], "max_tokens", [], True)
        sub = Sub(Request("batch-0", [1, 2, 3], SamplingParams(max_tokens=len(ids))), 0, queue)
        for t in ids:
            queue.put_nowait((sub, "tokens", [t]))
        queue.put_nowait((sub, "finished", "length"))
        return [b async for b in state.choice_batches(job, [sub], queue)]

    out = asyncio.run(batches())
    assert len(out) == 1 and "".join(d for _, d, _, _ in out[0]) == "abcd"
    assert [r for _, _, _, r in out[0]] == [None] * len(ids) + ["length"]

    async def tokens_then_error():  # what came before an engine error is still delivered, then the error
        queue: asyncio.Queue = asyncio.Queue()
        job = Job("completion", MODEL, [[1, 2, 3]], 1, {}, [8], "max_tokens", [], True)
        sub = Sub(Request("batch-1", [1, 2, 3], SamplingParams(max_tokens=8)), 0, queue)
        queue.put_nowait((sub, "tokens", ids[:2]))
        queue.put_nowait((sub, "error", "engine error: RuntimeError"))
        got = []
        with pytest.raises(ApiError, match="engine error"):
            async for batch in state.choice_batches(job, [sub], queue):
                got.append(batch)
        return got

    got = asyncio.run(tokens_then_error())
    assert len(got) == 1 and "".join(d for _, d, _, _ in got[0]) == "ab"


# ---------------------------------------------------------------------------------------
# Load

def test_256_concurrent_streams_continuous(cont):
    url, _ = cont
    before = wait_idle(url)
    results = asyncio.run(many_streams(url, 256, max_tokens=4))
    assert all(status == 200 for status, _ in results)
    assert all(r["tokens"] == 4 and r["usage"]["completion_tokens"] == 4 and r["finish"] == "length" and r["done"]
               for _, r in results)
    after = wait_idle(url)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["vllm:generation_tokens_total"] == sum(r["tokens"] for _, r in results) == 1024
    assert delta["vllm:prompt_tokens_total"] == sum(r["usage"]["prompt_tokens"] for _, r in results) == 256 * 6
    assert delta['vllm:request_success_total{finished_reason="length"}'] == 256
    assert delta["vllm:time_to_first_token_seconds_count"] == 256
    assert delta["vllm:e2e_request_latency_seconds_count"] == 256
    assert delta['servesim:request_refused_total{reason="busy"}'] == 0


def test_full_queue_answers_503_sequential(seq):
    url, state = seq
    before = wait_idle(url)
    results = asyncio.run(many_streams(url, 256, max_tokens=4))
    ok = [r for s, r in results if s == 200]
    busy = [r for s, r in results if s == 503]
    assert len(ok) + len(busy) == 256
    assert len(ok) >= 9 and busy, (len(ok), len(busy))  # one slot + max_queue 8 at least, the rest refused
    assert all(r["tokens"] == 4 and r["usage"]["completion_tokens"] == 4 and r["done"] for r in ok)
    assert all(r["retry_after"] and "server busy" in r["error"]["error"]["message"] for r in busy)
    after = wait_idle(url)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta['servesim:request_refused_total{reason="busy"}'] == len(busy)
    assert delta['vllm:request_success_total{finished_reason="length"}'] == len(ok)
    assert delta["vllm:generation_tokens_total"] == sum(r["tokens"] for r in ok)
    assert state.loop.scheduler.free_slots == [0]


def test_no_compile_while_serving(cont, seq):
    for url, state in (cont, seq):
        m = metrics(url)
        assert m["servesim:compilations_serving_total"] == 0
        assert 0 <= m["servesim:compilations_startup"] <= state.loop.num_shapes and state.loop.num_shapes > 0
        assert m["servesim:ready"] == 1


# ---------------------------------------------------------------------------------------
# Bad input and disconnects

@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "hi"}, "model", "required"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -3}, "max_tokens", "greater than or equal to 1"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": MODEL, "prompt": "x" * 300, "max_tokens": 4}, "prompt", "exceeds"),
    ({"model": MODEL, "prompt": "x" * 100, "max_tokens": 100}, "max_tokens", "exceeds"),
    ({"model": MODEL, "prompt": [1, 2, 9999]}, "prompt", "vocabulary"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"model": MODEL, "prompt": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 3}, "logprobs", "does not support"),
    ({"model": MODEL, "prompt": "hi", "n": 1000}, "n", "more than"),
    ({"model": MODEL}, "prompt", "required"),
])
def test_bad_requests_answer_400_naming_the_field(cont, body, param, words):
    url, _ = cont
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param) and words in err["message"], err


def test_bad_json_and_bad_chat(cont):
    url, _ = cont
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(url + "/health").status_code == 200


def test_disconnects_free_slots_and_blocks(cont, monkeypatch):
    url, state = cont
    runner = state.loop.engine.runner
    execute = runner.execute

    def slow_execute(*args, **kwargs):  # 20 ms a step: 120 tokens take seconds, so clients leave mid-way
        time.sleep(0.02)
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", slow_execute)
    before = wait_idle(url)

    async def go():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def stream_then_leave(i):
                body = {"model": MODEL, "prompt": prompt_ids(i), "max_tokens": 120, "stream": True}
                resp = await session.post(url + "/v1/completions", json=body)
                assert resp.status == 200
                await resp.content.readline()  # the first token's chunk
                resp.close()  # drop the connection mid-stream

            async def wait_then_leave(i):  # non-streaming: the client gives up once generation started
                body = {"model": MODEL, "prompt": prompt_ids(i), "max_tokens": 120}
                task = asyncio.create_task(session.post(url + "/v1/completions", json=body))
                while metrics(url)["vllm:generation_tokens_total"] == before["vllm:generation_tokens_total"]:
                    await asyncio.sleep(0.01)
                task.cancel()

            await asyncio.gather(*(stream_then_leave(i) for i in range(8)), wait_then_leave(99))

    asyncio.run(go())
    after = wait_idle(url)
    assert after["servesim:request_aborted_total"] - before.get("servesim:request_aborted_total", 0) == 9
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 9 * 120
    blocks = state.loop.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_usable_blocks and not blocks.tables


# ---------------------------------------------------------------------------------------
# servesim serve / servesim bench --url

def test_http_bench_drives_the_server(cont, tmp_path):
    url, _ = cont
    from sim.lab.cli import main

    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "http"
    result = CliRunner().invoke(main, ["bench", str(cfg), "--url", url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 1 and summary[0]["engine"] == "continuous" and summary[0]["concurrency"] == 3
    assert summary[0]["completed"] == 6 and summary[0]["failed"] == 0
    assert summary[0]["driver"] == "http" and summary[0]["mean_ttft_ms"] > 0 and summary[0]["mean_itl_ms"] > 0
    lines = (out / "requests.csv").read_text().splitlines()
    assert len(lines) == 7 and all(",completed," in line for line in lines[1:])
    wait_idle(url)


def test_serve_command_is_wired(tmp_path):
    from sim.lab.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0 and "--engine" in result.output and "--port" in result.output
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    result = CliRunner().invoke(main, ["serve", str(cfg), "--engine", "nope"])
    assert result.exit_code == 2 and "no engine 'nope'" in result.output
    result = CliRunner().invoke(main, ["serve", str(cfg), "--stream-interval", "0"])
    assert result.exit_code == 2 and "--stream-interval" in result.output

