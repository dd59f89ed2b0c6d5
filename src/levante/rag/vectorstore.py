"""Chunks and their vectors in Qdrant: embedded local mode under LEVANTE_HOME by default, a Qdrant server at a URL.

One point per chunk, cosine distance over unit vectors. The payload holds what a citation needs
(file, page, chunk, text) and what re-ingestion needs (doc_id from the document's key, the
content hash, the document's chunk count). Point ids are uuid5(doc_id, content hash, chunk), so
storing the same content twice writes the same points.

Qdrant's local mode lets one client per storage folder (per process and across processes) at a
time: a `levante serve` holding LEVANTE_HOME/qdrant and a `levante rag` command on the same home
conflict, and the second gets StoreInUseError with what to do instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from levante.rag.chunking import Chunk

NAMESPACE = uuid.UUID("6f1c8a52-3d0e-5b7a-9c4e-1b2d3f4a5b6c")
UPSERT_BATCH = 256
MEMORY = ":memory:"


class VectorStoreError(RuntimeError):
    """The vector store cannot do it now (busy, unreachable, or it refused); the message says why."""


class StoreInUseError(VectorStoreError):
    pass


class CollectionNotFoundError(LookupError):
    pass


class CollectionExistsError(ValueError):
    pass


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    documents: int
    chunks: int
    created: int  # unix time; 0 when the collection was not made by Levante


@dataclass(frozen=True)
class DocumentState:
    content_hash: str
    chunks: int  # how many the document has
    pages: int
    stored: int  # how many of them are stored with this hash

    @property
    def complete(self) -> bool:
        return self.stored == self.chunks


@dataclass(frozen=True)
class Hit:
    score: float
    payload: dict[str, Any]


def doc_id(key: str) -> str:
    return str(uuid.uuid5(NAMESPACE, key))


def point_id(document: str, content_hash: str, chunk: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{document}:{content_hash}:{chunk}"))


def _match(key: str, value: str | int) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


class VectorStore:
    """Thread-safe (one lock: local mode is not) wrapper of a QdrantClient for Levante's collections."""

    def __init__(self, client: QdrantClient, dim: int, where: str, remote: bool = False) -> None:
        self.client = client
        self.dim = dim
        self.where = where
        self.remote = remote
        self._lock = threading.RLock()

    @classmethod
    def open(cls, dim: int, url: str | None = None, path: Path | None = None, api_key: str | None = None) -> VectorStore:
        """`url` (a Qdrant server, or ":memory:" for a throw-away in-process store) wins over the local `path`."""
        if url:
            if url == MEMORY:
                return cls(QdrantClient(location=MEMORY), dim, "memory", remote=True)
            client = QdrantClient(url=url, api_key=api_key, timeout=60, check_compatibility=False)
            return cls(client, dim, url, remote=True)
        if path is None:
            raise ValueError("give the vector store a Qdrant URL or a local folder")
        path.mkdir(parents=True, exist_ok=True)
        try:
            client = QdrantClient(path=str(path))
        except RuntimeError as e:
            if "already accessed" not in str(e):
                raise
            raise StoreInUseError(
                f"the vector store {path} is open in another process (a running `levante serve` on the same "
                "LEVANTE_HOME?). Qdrant's local mode allows one process at a time: use that server's "
                "/v1/rag/ API, stop it, or run a Qdrant server and pass --qdrant-url to both."
            ) from None
        return cls(client, dim, str(path))

    def close(self) -> None:
        with self._lock:
            self.client.close()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except UnexpectedResponse as e:
                detail = e.content.decode(errors="replace")[:300] if e.content else e.reason_phrase
                raise VectorStoreError(f"Qdrant at {self.where} answered {e.status_code}: {detail}") from None
            except (ResponseHandlingException, ConnectionError, TimeoutError) as e:
                raise VectorStoreError(f"cannot reach Qdrant at {self.where}: {e}") from None

    # ---- collections --------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        with self._call():
            return bool(self.client.collection_exists(name))

    def require(self, name: str) -> None:
        if not self.exists(name):
            raise CollectionNotFoundError(f"collection {name!r} does not exist")

    def collections(self) -> list[CollectionInfo]:
        with self._call():
            names = sorted(c.name for c in self.client.get_collections().collections)
        out = []
        for name in names:
            with contextlib.suppress(CollectionNotFoundError):  # deleted meanwhile
                info = self._info(name, check_ours=True)
                if info is not None:
                    out.append(info)
        return out

    def info(self, name: str) -> CollectionInfo:
        info = self._info(name, check_ours=False)
        assert info is not None
        return info

    def _info(self, name: str, check_ours: bool) -> CollectionInfo | None:
        with self._call():
            if not self.client.collection_exists(name):
                raise CollectionNotFoundError(f"collection {name!r} does not exist")
            config = self.client.get_collection(name).config
            metadata = getattr(config, "metadata", None) or {}
            ours = metadata.get("levante")
            if check_ours and not ours and not self._compatible(config):
                return None  # someone else's collection on a shared Qdrant server
            chunks = self.client.count(name, exact=True).count
            documents = self.client.count(name, count_filter=models.Filter(must=[_match("chunk", 0)]), exact=True).count
        created = int(ours.get("created", 0)) if isinstance(ours, dict) else 0
        return CollectionInfo(name, documents, chunks, created)

    def _compatible(self, config: Any) -> bool:
        vectors = config.params.vectors
        return isinstance(vectors, models.VectorParams) and vectors.size == self.dim and vectors.distance == models.Distance.COSINE

    def create(self, name: str) -> CollectionInfo:
        created = int(time.time())
        with self._call():
            if self.client.collection_exists(name):
                raise CollectionExistsError(f"collection {name!r} already exists")
            self.client.create_collection(
                name,
                vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.COSINE),
                metadata={"levante": {"created": created, "dim": self.dim}},
            )
            if self.remote and self.where != "memory":  # local mode has no payload indexes
                for field, schema in (("doc_id", models.PayloadSchemaType.KEYWORD), ("chunk", models.PayloadSchemaType.INTEGER),
                                      ("content_hash", models.PayloadSchemaType.KEYWORD)):
                    self.client.create_payload_index(name, field, field_schema=schema)
        return CollectionInfo(name, 0, 0, created)

    def delete(self, name: str) -> None:
        with self._call():
            if not self.client.collection_exists(name):
                raise CollectionNotFoundError(f"collection {name!r} does not exist")
            self.client.delete_collection(name)

    # ---- documents ----------------------------------------------------------------------

    def document_state(self, name: str, key: str) -> DocumentState | None:
        """What is stored for the document with this key (None: nothing)."""
        document = doc_id(key)
        with self._call():
            points, _ = self.client.scroll(
                name, scroll_filter=models.Filter(must=[_match("doc_id", document)]), limit=1,
                with_payload=["content_hash", "chunks", "pages"], with_vectors=False,
            )
            if not points or points[0].payload is None:
                return None
            payload = points[0].payload
            digest = str(payload.get("content_hash", ""))
            stored = self.client.count(
                name, count_filter=models.Filter(must=[_match("doc_id", document), _match("content_hash", digest)]), exact=True
            ).count
        return DocumentState(digest, int(payload.get("chunks", -1)), int(payload.get("pages", 0)), stored)

    def put_document(
        self, name: str, key: str, file: str, content_hash: str, pages: int, chunks: Sequence[Chunk], vectors: Sequence[Sequence[float]]
    ) -> None:
        """Store a document's chunks, then drop any other version of it (the order keeps it findable throughout)."""
        document = doc_id(key)
        now = int(time.time())
        points = [
            models.PointStruct(
                id=point_id(document, content_hash, c.index),
                vector=list(v),
                payload={
                    "doc_id": document, "path": key, "file": file, "page": c.page, "chunk": c.index, "text": c.text,
                    "chunks": len(chunks), "pages": pages, "content_hash": content_hash, "ingested_at": now,
                },
            )
            for c, v in zip(chunks, vectors, strict=True)
        ]
        with self._call():
            for start in range(0, len(points), UPSERT_BATCH):
                self.client.upsert(name, points=points[start : start + UPSERT_BATCH], wait=True)
            stale = models.Filter(must=[_match("doc_id", document)], must_not=[_match("content_hash", content_hash)])
            self.client.delete(name, points_selector=models.FilterSelector(filter=stale), wait=True)

    def remove_document(self, name: str, key: str) -> int:
        """Delete a document's chunks; returns how many there were."""
        selector = models.Filter(must=[_match("doc_id", doc_id(key))])
        with self._call():
            count = self.client.count(name, count_filter=selector, exact=True).count
            self.client.delete(name, points_selector=models.FilterSelector(filter=selector), wait=True)
        return int(count)

    def documents(self, name: str) -> list[dict[str, Any]]:
        """One payload (file, path, chunks, pages, content_hash, ingested_at) per stored document version."""
        out: list[dict[str, Any]] = []
        offset: Any = None
        with self._call():
            while True:
                points, offset = self.client.scroll(
                    name, scroll_filter=models.Filter(must=[_match("chunk", 0)]), limit=256, offset=offset,
                    with_payload=["file", "path", "chunks", "pages", "content_hash", "ingested_at"], with_vectors=False,
                )
                out.extend(dict(p.payload or {}) for p in points)
                if offset is None:
                    return sorted(out, key=lambda d: str(d.get("path", "")))

    def search(self, name: str, vector: Sequence[float], top_k: int) -> list[Hit]:
        with self._call():
            if not self.client.collection_exists(name):
                raise CollectionNotFoundError(f"collection {name!r} does not exist")
            result = self.client.query_points(name, query=list(vector), limit=top_k, with_payload=True, with_vectors=False)
        return [Hit(float(p.score), dict(p.payload or {})) for p in result.points]
