"""Error bodies: OpenAI's shape on /v1 (and everywhere else), Ollama's on /api.

OpenAI (and vLLM): {"error": {"message", "type", "param", "code"}} with the HTTP status.
Ollama: {"error": "message"} with the HTTP status (what the official ollama client reads).

Every error the app can produce goes through here, framework ones included: 404 for an unknown
path, 405 for a wrong method, 413 for a body over the limit, request-validation errors (400, as
vLLM answers them, naming the field), a body that is not JSON or nests too deep (400), and any
unhandled exception (500, logged, the server keeps serving).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("servesim.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 499: "invalid_request_error", 500: "server_error", 503: "server_busy"}


class ApiError(Exception):
    """An HTTP error: status, message, the request field it is about (param) and a machine code."""

    def __init__(self, status: int, message: str, param: str | None = None, *, type_: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        """The OpenAI-shaped body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, ollama: bool = False) -> JSONResponse:
        """The response in OpenAI's shape, or Ollama's ({"error": message}) for an /api route."""
        body = {"error": self.message} if ollama else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad(param: str, message: str) -> ApiError:
    """400 naming the field: the message starts with the field's name."""
    return ApiError(400, f"{param}: {message}", param)


def from_validation(err: ValidationError | RequestValidationError) -> ApiError:
    """400 naming the first invalid field (its dotted path, list indices in brackets)."""
    first = err.errors()[0]
    loc = [p for p in first.get("loc", ()) if p not in ("body",)]
    param = ""
    for p in loc:
        param += f"[{p}]" if isinstance(p, int) else (f".{p}" if param else str(p))
    param = param or "body"
    msg = first.get("msg", "invalid")
    if "input" in first and first.get("type") not in ("missing",):
        msg += f", got {_short(first['input'])}"
    return bad(param, msg)


def _short(v, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def is_ollama_path(path: str) -> bool:
    """Ollama's native routes answer errors in Ollama's shape."""
    return path.startswith("/api/")


def install(app: FastAPI) -> None:
    """Route every error of app through ApiError's shapes."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response(is_ollama_path(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif status == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return ApiError(status, msg, None, headers=getattr(exc, "headers", None)).response(
            is_ollama_path(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return from_validation(exc).response(is_ollama_path(request.url.path))

    @app.exception_handler(RecursionError)
    async def _too_deep(request, exc: RecursionError):  # a body parsed elsewhere than our parser
        return bad("body", "JSON nests too deep").response(is_ollama_path(request.url.path))

    @app.exception_handler(Exception)
    async def _any_error(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", None).response(
            is_ollama_path(request.url.path))
