"""Which replica served a request: the `X-Levante-Replica` response header.

A route hands its request to a replica and returns; for a streaming response the headers
leave before the first token. So every remote call a request makes registers a future that
resolves when a replica accepts the call (or refuses it), and this middleware holds the
response's start until those futures are done:

    route:       submit() ──> future (pending) ──> StreamingResponse ──> send(start) ─┐
    remote call:   ... replica accepts ──> future.set_result("abc123")                 │
    middleware:  await futures ──> start + "X-Levante-Replica: abc123" ──> client <────┘

Holding the start also keeps statuses right for streams: a request the replica refused before
any output (prompt too long, replica at capacity) is answered with its error status instead of
a 200 carrying an error event.

The futures are found through a context variable the middleware sets for the request: the
route and the response's body iterator run in tasks that inherit it.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from levante.server import errors

REPLICA_HEADER = "X-Levante-Replica"


@dataclass
class RequestCalls:
    """The remote calls one HTTP request made; each future resolves to the accepting replica's id."""

    calls: list[asyncio.Future[str]] = field(default_factory=list)

    def replicas(self) -> list[str]:
        done = [f for f in self.calls if f.done() and not f.cancelled() and f.exception() is None]
        return list(dict.fromkeys(f.result() for f in done))

    def refusal(self) -> BaseException | None:
        return next((f.exception() for f in self.calls if f.done() and not f.cancelled() and f.exception() is not None), None)


_current: contextvars.ContextVar[RequestCalls | None] = contextvars.ContextVar("levante_request_calls", default=None)


def track_call() -> asyncio.Future[str]:
    """A future for one remote call of the current request (untracked outside a request)."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    calls = _current.get()
    if calls is not None:
        calls.calls.append(future)
    return future


class ReplicaHeaderMiddleware:
    """Adds `X-Levante-Replica` to responses of requests served by replicas; answers a stream the
    replica refused before any output with the refusal's status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        calls = RequestCalls()
        token = _current.set(calls)
        replaced = False

        async def send_with_replica(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's own answer to a refused stream: already answered
            if message["type"] == "http.response.start" and calls.calls:
                await asyncio.wait(calls.calls)
                refusal = calls.refusal()
                if refusal is not None and message["status"] < 300 and isinstance(refusal, Exception):
                    replaced = True
                    await errors.render(Request(scope), errors.from_exception(refusal))(scope, receive, send)
                    return
                replicas = calls.replicas()
                if replicas:
                    headers = list(message.get("headers", []))
                    headers.append((REPLICA_HEADER.lower().encode(), ", ".join(replicas).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _current.reset(token)
