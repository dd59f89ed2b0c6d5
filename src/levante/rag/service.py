"""What the CLI and the HTTP routes call: collections, ingestion, retrieval over one vector store.

One RagService per process holds the Qdrant client (local mode allows one per folder) and reuses
the embedder it is given (the server's, shared with /v1/embeddings).
"""

from __future__ import annotations

import contextlib
import re
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from levante.home import levante_home
from levante.rag.chunking import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_OVERLAP_TOKENS,
    TokenCounter,
    embedding_token_counter,
)
from levante.rag.ingest import FileResult, Ingestor, IngestProgress, SourceFile
from levante.rag.retrieve import Passage, search

if TYPE_CHECKING:
    from levante.rag.embeddings import Embedder
    from levante.rag.vectorstore import CollectionInfo, VectorStore

COLLECTION_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_TOP_K = 100


class InvalidCollectionNameError(ValueError):
    pass


def validate_collection_name(name: str) -> str:
    """Same rules as registry names: lowercase letters, digits, '.', '_', '-'; at most 64 characters."""
    if not COLLECTION_NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidCollectionNameError(
            f"invalid collection name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass
class RagConfig:
    """Where the vectors live and how documents are cut. A Qdrant URL wins over the local folder."""

    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    path: Path | None = None  # local store; default LEVANTE_HOME/qdrant
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS
    max_upload_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.qdrant_url is not None and not self.qdrant_url.strip():
            self.qdrant_url = None
        if self.qdrant_url is not None and self.qdrant_url != ":memory:":
            parsed = urllib.parse.urlparse(self.qdrant_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname or " " in self.qdrant_url:
                raise ValueError(f"the Qdrant URL must look like http://host:6333 (or be ':memory:'), got {self.qdrant_url!r}")
        if not 8 <= self.chunk_tokens <= 254:
            raise ValueError(f"chunk_tokens must be in 8..254 (the embedder reads 256 with its markers), got {self.chunk_tokens}")
        if not 0 <= self.overlap_tokens < self.chunk_tokens // 2:
            raise ValueError(f"overlap_tokens must be in 0..{self.chunk_tokens // 2 - 1}, got {self.overlap_tokens}")
        if self.max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes must be positive")

    @property
    def local_path(self) -> Path:
        return self.path or levante_home() / "qdrant"

    @property
    def where(self) -> str:
        return self.qdrant_url or str(self.local_path)


class RagService:
    def __init__(self, config: RagConfig, embedder: Embedder | None = None, store: VectorStore | None = None) -> None:
        from levante.rag.embeddings import Embedder
        from levante.rag.vectorstore import VectorStore

        self.config = config
        self.embedder = embedder or Embedder()
        self.store = store or VectorStore.open(self.embedder.dim, config.qdrant_url, config.local_path, config.qdrant_api_key)
        self._counter: TokenCounter | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.store.close()

    def _count_tokens(self) -> TokenCounter:
        with self._lock:
            if self._counter is None:
                self._counter = embedding_token_counter()
            return self._counter

    def collections(self) -> list[CollectionInfo]:
        return self.store.collections()

    def info(self, name: str) -> CollectionInfo:
        return self.store.info(validate_collection_name(name))

    def create(self, name: str) -> CollectionInfo:
        return self.store.create(validate_collection_name(name))

    def delete(self, name: str) -> None:
        self.store.delete(validate_collection_name(name))

    def documents(self, name: str) -> list[dict[str, Any]]:
        validate_collection_name(name)
        self.store.require(name)
        return self.store.documents(name)

    def ingest(self, name: str, sources: Sequence[SourceFile], progress: IngestProgress | None = None) -> list[FileResult]:
        """Ingest files into `name`, creating it if missing; one result per file, errors included."""
        from levante.rag.vectorstore import CollectionExistsError

        validate_collection_name(name)
        if not self.store.exists(name):
            with contextlib.suppress(CollectionExistsError):  # created meanwhile by a concurrent request
                self.store.create(name)
        ingestor = Ingestor(self.store, self.embedder, self._count_tokens(), self.config.chunk_tokens, self.config.overlap_tokens)
        return ingestor.ingest(name, sources, progress)

    def query(self, name: str, text: str, top_k: int = 4) -> list[Passage]:
        validate_collection_name(name)
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
        if not text.strip():
            raise ValueError("the query is empty")
        return search(self.store, self.embedder, name, text, top_k)
