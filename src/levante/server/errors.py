"""Errors with an HTTP status, rendered in the shape each API family's clients parse.

OpenAI: {"error": {"message", "type", "param", "code"}}; TGI: {"error", "error_type"};
Ollama: {"error"}. Bad input is always a 4xx with a message, never a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante.engine.async_engine import EngineDeadError
from levante.engine.llm_engine import PromptTooLongError
from levante.engine.scheduler import EngineOverloadedError

TGI_PATHS = ("/generate", "/generate_stream", "/tokenize", "/info")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def not_found(message: str, param: str | None = "model") -> APIError:
    return APIError(404, message, "not_found_error", param, "model_not_found" if param == "model" else None)


def overloaded(message: str, retry_after: int) -> APIError:
    return APIError(503, message, "server_overloaded", None, "overloaded", {"Retry-After": str(retry_after)})


def from_exception(exc: Exception, retry_after: int = 1) -> APIError:
    """Translate engine and validation errors into API errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, EngineOverloadedError):
        return overloaded(str(exc), retry_after)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "server_error", code="engine_dead")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return APIError(500, "internal error; see the server log", "server_error")


def render(request: Request, err: APIError) -> JSONResponse:
    path = request.url.path
    body: dict[str, Any]
    status = err.status
    if path.startswith("/api/"):
        body = {"error": err.message}
    elif path in TGI_PATHS or path == "/":
        kind = {400: "validation", 401: "unauthorized", 404: "not_found", 413: "validation", 415: "validation"}.get(status, "overloaded" if status in (429, 503) else "generation")
        body = {"error": err.message, "error_type": kind}
        if err.code == "overloaded":
            status = 429  # TGI answers 429 "Model is overloaded"
    else:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=status, headers=err.headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return render(request, exc)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    whole = next((e for e in errors if tuple(e.get("loc", ())) == ("body",) or e.get("type") == "json_invalid"), None)
    if whole is not None:
        return render(request, _body_error(request, whole))
    parts = []
    param = None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(parts) if parts else "invalid request body"
    return render(request, bad_request(message, param))


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    types = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
    err = APIError(exc.status_code, str(exc.detail), types.get(exc.status_code, "invalid_request_error"), headers=dict(exc.headers or {}))
    return render(request, err)


def _body_error(request: Request, error: Any) -> APIError:
    """The body as a whole is unusable: not JSON, not an object, or sent with another content type."""
    content_type = request.headers.get("content-type", "")
    if error.get("type") == "json_invalid":
        position = next((x for x in error.get("loc", ()) if isinstance(x, int)), None)
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at character {position}" if position is not None else ""
        return bad_request(f"the request body is not valid JSON: {reason}{where}")
    if isinstance(error.get("input"), bytes):  # FastAPI parses JSON only when the content type says so
        return APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got {content_type or 'no content type'!r})")
    if error.get("type") == "missing":
        return bad_request("the request body is missing: send a JSON object")
    return bad_request("the request body must be a JSON object")
