"""The RAG service over qdrant-client's in-memory and local stores: names, URLs, and re-ingestion
(unchanged skipped, changed replaced with its old chunks gone, a half-stored document redone).

A bag-of-words embedder stands in for all-MiniLM-L6-v2 here (the integration tests use the real one).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
from qdrant_client import models

from levante.rag.ingest import SourceFile
from levante.rag.service import RagConfig, RagService, validate_collection_name
from levante.rag.vectorstore import (
    CollectionExistsError,
    CollectionNotFoundError,
    StoreInUseError,
    VectorStore,
    doc_id,
)


class BagOfWords:
    dim = 64

    def embed(self, texts: list[str]) -> list[list[float]]:
        out = []
        for text in texts:
            v = [0.0] * self.dim
            for word in text.lower().split():
                v[int(hashlib.md5(word.strip(".,").encode()).hexdigest(), 16) % self.dim] += 1.0
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / norm for x in v])
        return out


@pytest.fixture
def service() -> RagService:
    return RagService(RagConfig(qdrant_url=":memory:"), embedder=BagOfWords())  # type: ignore[arg-type]


def notes(text: str) -> SourceFile:
    return SourceFile.from_upload("notes.md", text.encode())


def test_collection_names() -> None:
    for good in ("docs", "a", "team-docs_v2.1", "x" * 64):
        assert validate_collection_name(good) == good
    for bad in ("", "Docs", "-docs", ".hidden", "a/b", "a..b", "x" * 65, "doc s", "ü"):
        with pytest.raises(ValueError, match="invalid collection name"):
            validate_collection_name(bad)


def test_store_urls() -> None:
    assert RagConfig(qdrant_url="http://qdrant:6333").where == "http://qdrant:6333"
    assert RagConfig(qdrant_url="").qdrant_url is None
    assert RagConfig(path=Path("/tmp/x")).where == "/tmp/x"
    for bad in ("localhost:6333", "ftp://h", "http://", "http:// h"):
        with pytest.raises(ValueError, match="Qdrant URL"):
            RagConfig(qdrant_url=bad)


def test_ingest_skips_unchanged_and_replaces_changed(service: RagService) -> None:
    [r] = service.ingest("docs", [notes("The Glimmerhorn beacon flashes every 7 seconds.\n\nIts lamp lasts 300 nights.")])
    assert (r.status, r.chunks, r.pages) == ("added", 1, 1)
    assert service.ingest("docs", [notes("The Glimmerhorn beacon flashes every 7 seconds.\n\nIts lamp lasts 300 nights.")])[0].status == "unchanged"
    [r] = service.ingest("docs", [notes("The Glimmerhorn beacon flashes every 11 seconds.")])
    assert r.status == "replaced"
    info = service.info("docs")
    assert (info.documents, info.chunks) == (1, 1) and info.created > 0
    [hit] = service.query("docs", "how often does the beacon flash", top_k=5)
    assert hit.file == "notes.md" and "11 seconds" in hit.text and hit.page is None and hit.chunk == 0
    assert [c.name for c in service.collections()] == ["docs"]


def test_a_half_stored_document_is_ingested_again(service: RagService) -> None:
    text = "\n\n".join(f"Paragraph {i} " + "word " * 150 for i in range(4))
    [r] = service.ingest("docs", [notes(text)])
    assert r.status == "added" and r.chunks >= 3
    store = service.store
    store.client.delete("docs", points_selector=models.FilterSelector(filter=models.Filter(must=[
        models.FieldCondition(key="chunk", match=models.MatchValue(value=1))])))  # as if interrupted mid-way
    state = store.document_state("docs", "notes.md")
    assert state is not None and not state.complete
    assert service.ingest("docs", [notes(text)])[0].status == "replaced"
    state = store.document_state("docs", "notes.md")
    assert state is not None and state.complete and state.stored == r.chunks


def test_same_content_at_two_keys_are_two_documents(service: RagService) -> None:
    data = b"Identical words in two files."
    results = service.ingest("docs", [SourceFile.from_upload("a.txt", data), SourceFile.from_upload("dir/b.txt", data)])
    assert [(r.file, r.status) for r in results] == [("a.txt", "added"), ("b.txt", "added")]
    assert service.info("docs").documents == 2 and doc_id("a.txt") != doc_id("b.txt")


def test_errors_per_file_and_unknown_collections(service: RagService) -> None:
    results = service.ingest("docs", [SourceFile.from_upload("x.docx", b"PK"), notes("Fine text."), SourceFile.from_upload("", b"x")])
    assert [r.status for r in results] == ["error", "added", "error"]
    assert "no file name" in (results[2].error or "")
    with pytest.raises(CollectionNotFoundError):
        service.query("other", "anything")
    with pytest.raises(CollectionExistsError):
        service.create("docs")
    with pytest.raises(ValueError, match="top_k"):
        service.query("docs", "x", top_k=0)
    service.delete("docs")
    with pytest.raises(CollectionNotFoundError):
        service.delete("docs")


def test_local_store_is_one_client_at_a_time(tmp_path: Path) -> None:
    first = VectorStore.open(8, path=tmp_path / "qdrant")
    try:
        with pytest.raises(StoreInUseError, match="open in another process"):
            VectorStore.open(8, path=tmp_path / "qdrant")
    finally:
        first.close()
    VectorStore.open(8, path=tmp_path / "qdrant").close()  # free again once closed
