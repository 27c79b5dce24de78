"""What one client may ask of the server, and the two checks made before a handler runs.

ServerLimits holds every limit in one place (the `servesim serve` flags set them):
- max_body_bytes: a request body over it is 413 before it is read (Content-Length) or as soon as
  the bytes received pass it (chunked bodies);
- max_stop / max_stop_chars: stop strings per request and characters per stop string (each
  generated token is matched against them, so together they bound that work);
- max_choices: n x prompts per request;
- max_queue: requests waiting for the engine beyond which new ones are 503 with Retry-After
  (set on every engine's scheduler whose own bound is unbounded);
- drain_s: on shutdown, how long open requests may run before their streams end with an error;
- api_key: when set, /v1 and /api routes need `Authorization: Bearer <key>` (vLLM's --api-key);
  /health, /metrics and /version stay open, as in vLLM.

Prompt length is checked on the raw text before tokenizing (a byte tokenizer makes at least one
token per character), so an oversized prompt costs no tokenizer work (sim.lab.server.jobs).
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from reference.errors import ConfigError
from sim.lab.server.errors import ApiError

RETRY_AFTER_S = 1  # what a 503 tells the client to wait (s)


@dataclass(frozen=True)
class ServerLimits:
    """Per-request and server-wide limits (see the module docstring)."""

    max_body_bytes: int = 1 << 20  # 1 MiB: a prompt fills the context long before
    max_stop: int = 16
    max_stop_chars: int = 256
    max_choices: int = 256
    max_queue: int = 512  # Ollama's OLLAMA_MAX_QUEUE default
    drain_s: float = 10.0
    api_key: str | None = None

    def __post_init__(self):
        for name in ("max_body_bytes", "max_stop", "max_stop_chars", "max_choices", "max_queue"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {v!r}")
        if not isinstance(self.drain_s, (int, float)) or self.drain_s < 0:
            raise ConfigError("drain_s", f"must be a number >= 0, got {self.drain_s!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key", "must not be empty (omit it to serve without a key)")


_OPEN_PATHS = ("/health", "/metrics", "/version", "/ping", "/", "/docs", "/openapi.json")


async def _send_error(send, status: int, message: str, path: str, headers: list | None = None) -> None:
    if path.startswith("/api/"):
        body = {"error": message}
    else:
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """ASGI middleware: the API key, then the body limit (413), before any handler runs."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        key = self.limits.api_key
        if key is not None and path not in _OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await _send_error(send, 401, "missing or wrong API key (Authorization: Bearer <key>)", path,
                                         [(b"www-authenticate", b"Bearer")])
        limit = self.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_error(send, 400, "body: Content-Length is not a number", path)
            if too_big:
                return await _send_error(send, 413, f"body: {int(length)} bytes is more than the limit of "
                                                    f"{limit} bytes", path)
        await self.app(scope, receive, send)  # a chunked body is counted as it is read (read_body)


async def read_body(http, limit: int) -> bytes:
    """The request body, or ApiError 413 as soon as more than limit bytes arrived (bodies without Content-Length)."""
    chunks, seen = [], 0
    async for chunk in http.stream():
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, f"body: more than the limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)
