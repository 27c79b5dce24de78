"""`servesim bench --url` against a server that drops kept-alive connections (as llama-server does).

A raw asyncio HTTP server answers the first request on each connection with a small SSE stream
(no "Connection: close", so a client may keep the connection) and closes the connection when a
second request arrives on it, without answering: the client's request is lost although the
server never took it. The bench client must complete every request anyway (a fresh connection
per request), and report, not hide, requests that do fail.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from reference.request import Outcome
from sim.lab.experiment import load_experiment
from sim.lab.http_bench import StreamingClient, client_session, run_http_bench
from sim.lab.workload import RequestSpec
from tests.fake_server import LoopbackServer

EXPERIMENT = """
name = "keepalive"
model = "tiny"
seed = 0

[workload]
kind = "closed_loop"
clients = [2]
requests_per_client = 4

[workload.prompt_tokens]
dist = "fixed"
value = 5

[workload.output_tokens]
dist = "fixed"
value = 3

[engines.continuous]
scheduler = "continuous"
"""


class DroppingServer(LoopbackServer):
    """HTTP/1.1 on 127.0.0.1: one answered request per connection, the next one dropped unanswered.

    refuse_every: answer every n-th completion with HTTP 503 (0 = never), to see failures reported.
    """

    def __init__(self, refuse_every: int = 0):
        super().__init__()
        self.refuse_every, self.completions, self.dropped = refuse_every, 0, 0

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path = lines[0].split()[:2]
                length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                               if k.lower() == "content-length"), 0)
                body = json.loads(await reader.readexactly(length)) if length else {}
                if served:  # a kept-alive connection: the server has moved on, the request is lost
                    self.dropped += 1
                    return
                served += 1
                writer.write(self._response(method, path, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _response(self, method: str, path: str, body: dict) -> bytes:
        if path == "/v1/models":
            return _http(200, "application/json", json.dumps({"data": [{"id": "m"}]}).encode())
        if path != "/v1/completions":
            return _http(404, "text/plain", b"not found")
        self.completions += 1
        if self.refuse_every and self.completions % self.refuse_every == 0:
            return _http(503, "application/json", json.dumps({"error": {"message": "busy"}}).encode())
        chunks = [{"choices": [{"text": "x", "token_ids": [9 + i]}]} for i in range(body["max_tokens"])]
        sse = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return _http(200, "text/event-stream", sse)


def _http(status: int, ctype: str, payload: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


def _send_sequentially(url: str, session_factory, n: int = 5) -> list:
    async def go():
        async with session_factory() as session:
            client = StreamingClient(session, url + "/v1", "m", time.perf_counter(), 10.0)
            return [await client.send(RequestSpec(f"r{i}", i, 4, 3)) for i in range(n)]

    return asyncio.run(go())


def test_bench_completes_every_request_when_the_server_drops_kept_alive_connections(tmp_path):
    lines: list[str] = []
    with DroppingServer() as url:
        summary = run_http_bench(load_experiment(EXPERIMENT), url, tmp_path, echo=lines.append)
    row = summary.iloc[0]
    assert row["completed"] == 8 and row["failed"] == 0, lines
    assert not any("NOT COMPLETED" in ln or "warm-up" in ln for ln in lines), lines


def test_bench_session_uses_a_fresh_connection_per_request():
    with DroppingServer() as url:
        reqs = _send_sequentially(url, client_session)
    assert [r.outcome for r in reqs] == [Outcome.COMPLETED] * 5, [r.reason for r in reqs]
    assert all(r.output_token_ids == [9, 10, 11] for r in reqs)


def test_the_server_does_break_a_keep_alive_client():
    """The failure the fix avoids is real: a pooled keep-alive session loses requests 2..n."""
    with DroppingServer() as url:
        reqs = _send_sequentially(url, lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
    assert reqs[0].outcome == Outcome.COMPLETED
    assert any(r.outcome == Outcome.ABORTED and "connection error" in r.reason for r in reqs[1:])


def test_bench_reports_failed_requests(tmp_path):
    lines: list[str] = []
    with DroppingServer(refuse_every=3) as url:
        summary = run_http_bench(load_experiment(EXPERIMENT), url, tmp_path, echo=lines.append)
    row = summary.iloc[0]
    assert row["num_requests"] == 8 and row["failed"] > 0 and row["completed"] + row["failed"] == 8
    assert any("NOT COMPLETED" in ln and "refused" in ln for ln in lines), lines
    assert any("warm-up" in ln for ln in lines) or row["refused"] >= 2, lines
