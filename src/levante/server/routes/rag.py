"""RAG routes: /v1/rag/collections (list, create, delete, upload-and-ingest, query), and the grounded prompt for chat.

Translation only: the work is levante.rag's, run in a worker thread (embedding and the vector
store block). Errors use OpenAI's shape: 400 bad input, 404 unknown collection, 409 a name
taken, 413 too large, 503 vector store unavailable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, File, Request, UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from levante.loaders.chat_template import ChatTemplateError, Message
from levante.rag.ingest import SourceFile
from levante.rag.retrieve import grounded_prompt, question, reply_budget
from levante.rag.service import InvalidCollectionNameError, RagService
from levante.server.errors import APIError, bad_request, not_found
from levante.server.middleware import BodyLimitMiddleware
from levante.server.protocol.openai import ErrorResponse
from levante.server.protocol.rag import (
    CollectionInfo,
    CollectionList,
    CreateCollection,
    DeletedCollection,
    FileResult,
    IngestResponse,
    QueryRequest,
    QueryResponse,
    RagOptions,
    Source,
)
from levante.server.serving import ServedModel
from levante.server.state import AppState

logger = logging.getLogger("levante.server")

RAG_PREFIX = "/v1/rag/"
router = APIRouter(tags=["RAG"])
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}
T = TypeVar("T")


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.levante
    return state


def _translate(exc: Exception) -> APIError:
    from levante.rag.vectorstore import CollectionExistsError, CollectionNotFoundError, VectorStoreError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, CollectionNotFoundError):
        return not_found(exc.args[0] if exc.args else str(exc), "collection")
    if isinstance(exc, CollectionExistsError):
        return APIError(409, str(exc), "invalid_request_error", "name", "collection_exists")
    if isinstance(exc, VectorStoreError):
        return APIError(503, str(exc), "server_error", None, "vector_store_unavailable", {"Retry-After": "5"})
    if isinstance(exc, InvalidCollectionNameError):
        return bad_request(str(exc), "name")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    logger.exception("RAG request failed")
    return APIError(500, "internal error; see the server log", "server_error")


async def _run(func: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(func, *args)
    except Exception as e:
        raise _translate(e) from e


async def _service(request: Request) -> RagService:
    return await _run(_state(request).rag)


@router.get("/v1/rag/collections", response_model=CollectionList, responses=ERRORS)
async def list_collections(request: Request) -> CollectionList:
    service = await _service(request)
    infos = await _run(service.collections)
    return CollectionList(data=[CollectionInfo(name=c.name, documents=c.documents, chunks=c.chunks, created=c.created) for c in infos])


@router.post("/v1/rag/collections", status_code=201, response_model=CollectionInfo, responses={**ERRORS, 409: {"model": ErrorResponse}})
async def create_collection(req: CreateCollection, request: Request) -> CollectionInfo:
    service = await _service(request)
    c = await _run(service.create, req.name)
    return CollectionInfo(name=c.name, documents=c.documents, chunks=c.chunks, created=c.created)


@router.delete("/v1/rag/collections/{name}", response_model=DeletedCollection, responses=ERRORS)
async def delete_collection(name: str, request: Request) -> DeletedCollection:
    service = await _service(request)
    await _run(service.delete, name)
    return DeletedCollection(name=name)


@router.post("/v1/rag/collections/{name}/files", response_model=IngestResponse, responses=ERRORS)
async def upload_files(
    name: str, request: Request,
    files: Annotated[list[UploadFile], File(description="PDF, Markdown, HTML or text files (field 'files', one or many).")],
) -> IngestResponse:
    """Ingest uploaded files (creating the collection if missing); a file that fails is reported, the others ingest."""
    service = await _service(request)
    sources = []
    for upload in files:
        data = await upload.read()
        await upload.close()
        sources.append(SourceFile.from_upload(upload.filename or "", data))
    results = await _run(service.ingest, name, sources)
    return IngestResponse(
        collection=name,
        files=[FileResult(file=r.file, status=r.status, chunks=r.chunks, pages=r.pages, error=r.error) for r in results],
    )


@router.post("/v1/rag/collections/{name}/query", response_model=QueryResponse, responses=ERRORS)
async def query_collection(name: str, req: QueryRequest, request: Request) -> QueryResponse:
    """The passages nearest to `query`, best first."""
    service = await _service(request)
    passages = await _run(service.query, name, req.query, req.top_k)
    return QueryResponse(data=[Source(**p.source()) for p in passages])


async def grounded_chat_prompt(
    state: AppState, served: ServedModel, messages: list[Message], options: RagOptions, max_tokens: int | None, add_generation_prompt: bool
) -> tuple[list[int], list[dict[str, Any]]]:
    """Prompt ids for a chat completion with `"rag"`: the best passages that fit, and those passages as sources."""
    service = await _run(state.rag)
    try:
        text = question(messages)
    except (ValueError, ChatTemplateError) as e:
        raise bad_request(str(e), "messages") from e
    try:
        passages = await _run(service.query, options.collection, text, options.top_k)
    except APIError as e:
        if e.param in ("name", "collection"):
            e.param = "rag.collection"
        raise
    chat = served.chat_format()

    def encode(conversation: list[Message]) -> list[int]:
        return chat.encode(conversation, add_generation_prompt=add_generation_prompt)

    budget = reply_budget(max_tokens, served.max_model_len)
    try:
        ids, used = await asyncio.to_thread(grounded_prompt, messages, passages, encode, served.max_model_len, budget)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from e
    logger.info("rag: %s passages of %r retrieved, %d used; prompt %d tokens", len(passages), options.collection, len(used), len(ids))
    return ids, [p.source() for p in used]


class RagBodyLimitMiddleware:
    """Body limits under /v1/rag/: uploads (…/files) up to `max_upload_bytes`, other requests the server's usual limit.

    The app's general BodyLimitMiddleware exempts RAG_PREFIX and this one takes over there.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.uploads = BodyLimitMiddleware(app, max_upload_bytes)
        self.others = BodyLimitMiddleware(app, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(RAG_PREFIX):
            target = self.uploads if scope["path"].endswith("/files") else self.others
            await target(scope, receive, send)
            return
        await self.app(scope, receive, send)
