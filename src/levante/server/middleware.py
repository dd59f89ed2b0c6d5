"""Pure ASGI middleware (streaming-safe): request ids and logging, body-size limit, API keys."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from levante.server.auth import PUBLIC_PATHS, KeyStore, key_from_headers
from levante.server.errors import TGI_PATHS
from levante.server.metrics import Metrics

logger = logging.getLogger("levante.server")


def _error_body(path: str, status: int, message: str, type_: str) -> bytes:
    if path.startswith("/api/"):
        body: dict[str, Any] = {"error": message}
    elif path in TGI_PATHS:
        body = {"error": message, "error_type": type_}
    else:
        body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
    return json.dumps(body).encode()


async def _reply(send: Send, scope: Scope, status: int, message: str, type_: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _error_body(scope["path"], status, message, type_)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _route_family(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/api/"):
        return "ollama"
    if path in TGI_PATHS:
        return "tgi"
    return path.strip("/").split("/")[0] or "root"


MAX_REQUEST_ID = 128  # longer (or unprintable) X-Request-Id values are replaced by a generated id


def response_id(request: Request, prefix: str) -> str:
    """`prefix-<id>` with the id RequestLogMiddleware gave this request (a fresh one where it did not
    run): what the routes name their engine requests and responses (chatcmpl-<id>, tgi-<id>, ...)."""
    rid = getattr(request.state, "request_id", None)
    return f"{prefix}-{rid if isinstance(rid, str) else uuid.uuid4().hex}"


class RequestLogMiddleware:
    """Gives every request an id (X-Request-Id, kept if the client sent one), logs method, path, status, time; no bodies."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict((k.decode().lower(), v.decode(errors="replace")) for k, v in scope["headers"])
        given = headers.get("x-request-id", "")
        request_id = given if 0 < len(given) <= MAX_REQUEST_ID and given.isprintable() else uuid.uuid4().hex
        # The routes name their engine requests and response ids after it (chatcmpl-<id>), so a log
        # line, the X-Request-Id header and the response's id all tell the same request.
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = (time.monotonic() - start) * 1000
            logger.info("%s %s %s %d %.1fms", request_id, scope["method"], scope["path"], status, elapsed)
            self.metrics.http_requests.labels(_route_family(scope["path"]), str(status)).inc()


class BodyLimitMiddleware:
    """413 for bodies over the limit, whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        message_413 = f"request body is larger than the limit of {limit} bytes"
        for k, v in scope["headers"]:
            if k.lower() == b"content-length" and v.isdigit() and int(v) > limit:
                await _reply(send, scope, 413, message_413, "invalid_request_error")
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(message_413)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reply(send, scope, 413, message_413, "invalid_request_error")


class _TooLarge(HTTPException):
    """Raised from `receive` once a body without Content-Length passes the limit.

    An HTTPException, because FastAPI turns any other exception raised while it reads the body
    into a 400 "error parsing the body"; this one it re-raises, and the app's handler renders 413.
    """

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class AuthMiddleware:
    """When keys exist, every route but the health checks needs one."""

    def __init__(self, app: ASGIApp, keys: KeyStore, public_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = keys
        self.public_prefixes = public_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(self.public_prefixes) or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope["headers"]}
        key = key_from_headers(headers)
        if key is None:
            await _reply(send, scope, 401, "missing API key: send 'Authorization: Bearer <key>' or 'Api-Key: <key>'",
                         "authentication_error", [(b"www-authenticate", b"Bearer")])
            return
        if not self.keys.verify(key):
            await _reply(send, scope, 401, "invalid API key", "authentication_error", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
