"""RAG API schemas: collections, uploads, retrieval, and the `rag` extension of chat completions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

COLLECTION_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class RagOptions(BaseModel):
    """Retrieval for a chat completion: passages of `collection` go into the prompt; the response lists them as `sources`."""

    model_config = ConfigDict(extra="ignore")
    collection: str = Field(min_length=1, max_length=64, description="Collection to search.")
    top_k: int = Field(4, ge=1, le=100, description="Passages to retrieve (fewer are used when the context window is short).")


class Source(BaseModel):
    file: str
    page: int | None = Field(None, description="1-based page for PDFs, null for other files.")
    chunk: int = Field(description="Chunk number within the file, from 0.")
    score: float = Field(description="Cosine similarity to the query.")
    text: str


class CollectionInfo(BaseModel):
    name: str
    documents: int
    chunks: int
    created: int = Field(description="Unix time; 0 when the collection was not made by Levante.")


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]


class CreateCollection(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, description="Lowercase letters, digits, '.', '_', '-'; at most 64.")


class DeletedCollection(BaseModel):
    name: str
    deleted: Literal[True] = True


class FileResult(BaseModel):
    file: str
    status: Literal["added", "replaced", "unchanged", "error"]
    chunks: int = 0
    pages: int = 0
    error: str | None = None


class IngestResponse(BaseModel):
    collection: str
    files: list[FileResult]


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: str = Field(min_length=1, max_length=16384)
    top_k: int = Field(4, ge=1, le=100)


class QueryResponse(BaseModel):
    data: list[Source]
