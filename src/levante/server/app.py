"""The FastAPI application: routes of every API family over the same served models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante import __version__
from levante.config import ServerConfig
from levante.rag.service import RagConfig
from levante.server import errors
from levante.server.auth import KeyStore
from levante.server.metrics import Metrics
from levante.server.middleware import AuthMiddleware, BodyLimitMiddleware, RequestLogMiddleware
from levante.server.routes import ollama, openai, tgi, truss
from levante.server.routes import rag as rag_routes
from levante.server.serving import ModelManager
from levante.server.state import AppState

logger = logging.getLogger("levante.server")


def create_app(models: ModelManager, config: ServerConfig, keys: KeyStore | None = None, ui: bool = False, rag: RagConfig | None = None) -> FastAPI:
    keys = keys or KeyStore(extra_keys=config.api_keys)
    metrics = Metrics(models.stats)
    state = AppState(models=models, config=config, keys=keys, metrics=metrics, started=time.time(), rag_config=rag)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(models.reaper())  # unloads models idle past their keep-alive
        yield
        reaper.cancel()
        # uvicorn stops accepting and waits for open responses first; this catches stragglers.
        await models.drain(config.shutdown_timeout)
        models.shutdown()
        state.close_rag()  # releases the vector store (local mode locks its folder)

    app = FastAPI(
        title="Levante",
        version=__version__,
        description="Self-hosted inference for Mistral-family models: OpenAI, TGI, Truss, Ray Serve and Ollama APIs.",
        lifespan=lifespan,
    )
    app.state.levante = state
    app.add_exception_handler(errors.APIError, errors.api_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)

    @app.get("/health", tags=["Operations"], responses={503: {"description": "not ready"}})
    async def health() -> Response:
        """200 once the model is loaded and the engine loop is alive."""
        dead = [name for name, m in models.models.items() if m.engine.error is not None]
        if dead:
            return JSONResponse({"status": "error", "dead": dead}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(models.models)})

    @app.get("/metrics", tags=["Operations"], response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", tags=["Operations"], include_in_schema=False)
    async def root(request: Request) -> dict[str, Any]:
        return {"name": "levante", "version": __version__, "models": list(models.models), "docs": "/docs"}

    app.include_router(openai.router)
    app.include_router(tgi.router)
    app.include_router(truss.router)
    app.include_router(ollama.router)
    app.include_router(rag_routes.router)  # /v1/rag/collections, uploads
    _document_errors_as_served(app)
    public: tuple[str, ...] = ()
    if ui:  # chat page: its pages and assets are public; its calls to the API carry the user's key (levante/ui/chat.py)
        from levante.ui import UI_PATH, mount_ui

        mount_ui(app, _own_url(config), max_file_size=config.max_body_bytes)  # page uploads pass the body limit
        public = (UI_PATH,)

    # Order: the last added runs first. Log everything, then limit bodies, then check keys.
    app.add_middleware(AuthMiddleware, keys=keys, public_prefixes=public)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, exempt_prefixes=(rag_routes.RAG_PREFIX,))
    # /v1/rag uploads get their own, larger limit; other /v1/rag/ requests the usual one
    app.add_middleware(rag_routes.RagBodyLimitMiddleware, max_bytes=config.max_body_bytes,
                       max_upload_bytes=(rag or RagConfig()).max_upload_bytes)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestLogMiddleware, metrics=metrics)
    return app


def _own_url(config: ServerConfig) -> str:
    """This server's address from the configuration (the UI prefers the socket a request came in on)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    return f"http://[{host}]:{config.port}" if ":" in host else f"http://{host}:{config.port}"


def _document_errors_as_served(app: FastAPI) -> None:
    """Drop FastAPI's automatic 422 responses from the OpenAPI document.

    Validation errors are answered 400 in each API family's error shape (see errors.py), which
    the routes declare; a documented 422 that never comes misleads generated clients and
    contract tests.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI caches it on app.openapi_schema: edited in place here
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        if "loc" in components.get("ValidationError", {}).get("properties", {}):
            components.pop("ValidationError")
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
