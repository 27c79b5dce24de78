"""A fake OpenAI-compatible streaming server with a known step-time law, for black-box profiling tests.

One engine loop batches every request it holds, continuous-batching style: a request that
arrives joins the next step with its whole prompt (one step computes it and yields its first
token), then gets one token per step until max_tokens. A step of B decodes and prompts of P
tokens in all sleeps DECODE_S + PER_SEQ_S x (B + prompts) + PER_TOKEN_S x P. Each request
first waits OVERHEAD_S before the engine sees it (the request overhead a TTFT shows and a token
gap does not). /metrics exports fake:steps_total and fake:running.
"""
from __future__ import annotations

import asyncio
import json
import threading

DECODE_S, PER_SEQ_S, PER_TOKEN_S, OVERHEAD_S = 0.030, 0.008, 0.0002, 0.010


def step_seconds(decodes: int, prompts: int, prompt_tokens: int) -> float:
    """The fake engine's law (s)."""
    return DECODE_S + PER_SEQ_S * (decodes + prompts) + PER_TOKEN_S * prompt_tokens


class _Seq:
    def __init__(self, prompt_len: int, max_tokens: int):
        self.prompt_len, self.max_tokens, self.sent = prompt_len, max_tokens, 0
        self.queue: asyncio.Queue = asyncio.Queue()


class LoopbackServer:
    """`with Server() as url:` serves self._conn on 127.0.0.1 (a free port) from a background thread's loop.

    A subclass defines `_conn(reader, writer)`, may start tasks of its own in `_start()` (on the loop),
    and sets `path`, appended to the base URL it returns."""

    path = ""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}{self.path}"

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _start(self) -> None:
        """Tasks to run beside the connections (none by default)."""

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._start()
        self.ready.set()
        self.loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self.loop)  # connections still open: end them before the loop closes
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()


class FakeServer(LoopbackServer):
    """`with FakeServer() as url:` the fake engine behind an OpenAI-style base URL (.../v1)."""

    path = "/v1"

    def __init__(self):
        super().__init__()
        self.active: list[_Seq] = []
        self.new: list[_Seq] = []
        self.steps = 0
        self._wake: asyncio.Event | None = None

    def _start(self) -> None:
        self._wake = asyncio.Event()
        self.loop.create_task(self._engine())

    async def _engine(self):
        while True:
            if not self.active and not self.new:
                self._wake.clear()
                await self._wake.wait()
            joining, self.new = self.new, []
            decodes = len(self.active)
            await asyncio.sleep(step_seconds(decodes, len(joining), sum(s.prompt_len for s in joining)))
            self.steps += 1
            self.active += joining
            for s in self.active:
                s.sent += 1
                s.queue.put_nowait(s.sent >= s.max_tokens)
            self.active = [s for s in self.active if s.sent < s.max_tokens]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path = lines[0].split()[:2]
            length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                           if k.lower() == "content-length"), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == "/v1/models":
                writer.write(_http(200, "application/json", json.dumps({"data": [{"id": "fake"}]}).encode()))
            elif path == "/metrics":
                text = f"fake:steps_total {self.steps}\nfake:running {len(self.active)}\n"
                writer.write(_http(200, "text/plain", text.encode()))
            elif path == "/v1/completions" and method == "POST":
                await self._complete(body, writer)
            else:
                writer.write(_http(404, "text/plain", b"not found"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _complete(self, body: dict, writer: asyncio.StreamWriter):
        await asyncio.sleep(OVERHEAD_S)
        seq = _Seq(len(body["prompt"]), int(body["max_tokens"]))
        self.new.append(seq)
        self._wake.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        await writer.drain()
        i = 0
        try:
            while True:
                done = await seq.queue.get()
                chunk = {"choices": [{"text": "x", "token_ids": [9 + i % 50]}]}
                writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await writer.drain()
                i += 1
                if done:
                    break
            writer.write(b"data: [DONE]\n\n")
        finally:
            seq.max_tokens = 0  # a client that went away stops being computed (at the next step)


def _http(status: int, ctype: str, payload: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    return head.encode() + payload
