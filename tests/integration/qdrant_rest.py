"""A stand-in Qdrant server for tests: Qdrant's REST API over qdrant-client's own in-memory engine.

No Qdrant server binary is installable on these machines (Qdrant ships in no package registry
we reach), so the `--qdrant-url` path is tested against this: the real remote client
(`QdrantClient(url=...)`: HTTP, JSON, the official request/response models) talks to a real
HTTP server whose storage and search are qdrant-client's local engine (`location=":memory:"`),
the reference implementation of Qdrant's semantics in Python. It serves the endpoints Levante
uses and answers anything else 404, so a new call would fail the tests loudly rather than pass
unseen. It records requests (method, path) and checks the `api-key` header when given one.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from qdrant_client import QdrantClient, models


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _ok(result: Any) -> JSONResponse:
    return JSONResponse({"result": _jsonable(result), "status": "ok", "time": 0.0})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": {"error": message}, "time": 0.0}, status_code=status)


DONE = models.UpdateResult(operation_id=0, status=models.UpdateStatus.COMPLETED)


def make_app(api_key: str | None = None) -> FastAPI:
    engine = QdrantClient(location=":memory:")
    app = FastAPI()
    app.state.requests = []
    app.state.indexes = []

    @app.middleware("http")
    async def check(request: Request, call_next: Any) -> Any:
        app.state.requests.append((request.method, request.url.path))
        if api_key is not None and request.headers.get("api-key") != api_key:
            return _error(401, "Must provide an API key or an Authorization bearer token")
        return await call_next(request)

    def missing(name: str) -> JSONResponse | None:
        return None if engine.collection_exists(name) else _error(404, f"Not found: Collection `{name}` doesn't exist!")

    @app.get("/collections")
    def collections() -> JSONResponse:
        return _ok(engine.get_collections())

    @app.get("/collections/{name}/exists")
    def exists(name: str) -> JSONResponse:
        return _ok({"exists": engine.collection_exists(name)})

    @app.get("/collections/{name}")
    def info(name: str) -> JSONResponse:
        return missing(name) or _ok(engine.get_collection(name))

    @app.put("/collections/{name}")
    async def create(name: str, request: Request) -> JSONResponse:
        if engine.collection_exists(name):
            return _error(409, f"Wrong input: Collection `{name}` already exists!")
        req = models.CreateCollection.model_validate(await request.json())
        return _ok(engine.create_collection(name, vectors_config=req.vectors, metadata=req.metadata))

    @app.delete("/collections/{name}")
    def delete(name: str) -> JSONResponse:
        return _ok(engine.delete_collection(name))

    @app.put("/collections/{name}/index")
    async def index(name: str, request: Request) -> JSONResponse:
        req = models.CreateFieldIndex.model_validate(await request.json())
        app.state.indexes.append((name, req.field_name, str(req.field_schema)))
        return missing(name) or _ok(DONE)

    @app.put("/collections/{name}/points")
    async def upsert(name: str, request: Request) -> JSONResponse:
        req = models.PointsList.model_validate(await request.json())
        return missing(name) or _ok(engine.upsert(name, points=req.points))

    @app.post("/collections/{name}/points/delete")
    async def delete_points(name: str, request: Request) -> JSONResponse:
        body = await request.json()
        selector: Any = models.FilterSelector.model_validate(body) if "filter" in body else models.PointIdsList.model_validate(body)
        return missing(name) or _ok(engine.delete(name, points_selector=selector))

    @app.post("/collections/{name}/points/count")
    async def count(name: str, request: Request) -> JSONResponse:
        req = models.CountRequest.model_validate(await request.json())
        return missing(name) or _ok(engine.count(name, count_filter=req.filter, exact=bool(req.exact)))

    @app.post("/collections/{name}/points/scroll")
    async def scroll(name: str, request: Request) -> JSONResponse:
        req = models.ScrollRequest.model_validate(await request.json())
        if (gone := missing(name)) is not None:
            return gone
        points, offset = engine.scroll(
            name, scroll_filter=req.filter, limit=req.limit or 10, offset=req.offset,
            with_payload=req.with_payload if req.with_payload is not None else True, with_vectors=req.with_vector or False,
        )
        return _ok({"points": points, "next_page_offset": offset})

    @app.post("/collections/{name}/points/query")
    async def query(name: str, request: Request) -> JSONResponse:
        req = models.QueryRequest.model_validate(await request.json())
        if (gone := missing(name)) is not None:
            return gone
        q = req.query.nearest if isinstance(req.query, models.NearestQuery) else req.query
        result = engine.query_points(
            name, query=q, query_filter=req.filter, limit=req.limit or 10,
            with_payload=req.with_payload if req.with_payload is not None else False, with_vectors=req.with_vector or False,
        )
        return _ok(result)

    return app


class QdrantRestServer:
    """The stand-in served by uvicorn on a loopback port in a background thread."""

    def __init__(self, api_key: str | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = make_app(api_key)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> QdrantRestServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the Qdrant stand-in did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(self.app.state.requests)

    @property
    def indexes(self) -> list[tuple[str, str, str]]:
        return list(self.app.state.indexes)
