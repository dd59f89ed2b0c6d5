"""Files into a collection: text extraction (PDF, Markdown, HTML, plain text), chunking, embedding, storing.

A document is known by its key (the absolute path for files ingested from disk, the file name
for uploads). Ingesting a key again with the same content (sha256) is skipped; with new content
its new chunks are stored first and then the old ones deleted, so a reader never sees the
document vanish. Every file gets its own result: one bad file never stops the batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from levante.rag.chunking import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_OVERLAP_TOKENS,
    Chunk,
    PageText,
    TokenCounter,
    chunk_pages,
)

if TYPE_CHECKING:
    from levante.rag.embeddings import Embedder
    from levante.rag.vectorstore import VectorStore

logger = logging.getLogger("levante.rag")

Status = Literal["added", "replaced", "unchanged", "error"]
PDF_SUFFIXES = frozenset({".pdf"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".mdown", ".mkd"})
HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
TEXT_SUFFIXES = frozenset({".txt", ".text", ".rst", ".log", ".csv", ".tsv"})
SUPPORTED_SUFFIXES = PDF_SUFFIXES | MARKDOWN_SUFFIXES | HTML_SUFFIXES | TEXT_SUFFIXES
EMBED_BATCH = 32


class ExtractionError(ValueError):
    """This file cannot be ingested; the message says why in a few words."""


@dataclass
class SourceFile:
    """A file to ingest: read from `path`, or given as `data` (an upload)."""

    name: str  # shown to users and cited: the file name
    key: str  # identity in the collection: absolute path, or the upload's name
    path: Path | None = None
    data: bytes | None = None
    error: str | None = None  # known to be unusable before reading (e.g. a missing path)

    @classmethod
    def from_path(cls, path: Path) -> SourceFile:
        full = path.expanduser().resolve()
        return cls(name=path.name, key=str(full), path=full)

    @classmethod
    def from_upload(cls, name: str, data: bytes) -> SourceFile:
        base = re.split(r"[\\/]", name)[-1].strip()  # clients may send a path; keep the file name
        return cls(name=base, key=base, data=data, error=None if base else "the upload has no file name")

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise ExtractionError("no such file") from None
        except OSError as e:
            raise ExtractionError(f"cannot read: {e.strerror or e}") from None


@dataclass
class FileResult:
    file: str
    status: Status
    chunks: int = 0
    pages: int = 0
    error: str | None = None
    path: str | None = None


class IngestProgress(Protocol):
    """What a progress display is told (the CLI draws bars from it)."""

    def file_started(self, name: str) -> None: ...
    def chunks_total(self, total: int) -> None: ...
    def chunks_embedded(self, count: int) -> None: ...
    def file_done(self, result: FileResult) -> None: ...


def collect_sources(paths: Iterable[Path]) -> list[SourceFile]:
    """Files named, and every non-hidden file under folders named (sorted); a missing path is an error entry."""
    out: list[SourceFile] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path).parts
                if child.is_file() and not any(part.startswith(".") for part in rel):
                    out.append(SourceFile.from_path(child))
        elif path.exists():
            out.append(SourceFile.from_path(path))
        else:
            source = SourceFile.from_path(path)
            source.error = "no such file or folder"
            out.append(source)
    return out


# ---- extraction -------------------------------------------------------------------------


def extract(data: bytes, name: str) -> list[PageText]:
    """Text of a file by its type (from the name's suffix); raises ExtractionError."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        kinds = "PDF, Markdown, HTML and plain text"
        raise ExtractionError(f"unsupported file type {suffix or '(no extension)'!r}; supported: {kinds}")
    if not data.strip():
        raise ExtractionError("empty file")
    if suffix in PDF_SUFFIXES:
        pages = pdf_pages(data)
    elif suffix in HTML_SUFFIXES:
        pages = [PageText(html_text(decode_text(data)))]
    elif suffix in MARKDOWN_SUFFIXES:
        pages = [PageText(markdown_text(decode_text(data)))]
    else:
        pages = [PageText(decode_text(data))]
    if not any(p.text.strip() for p in pages):
        hint = " (a scanned PDF needs OCR first)" if suffix in PDF_SUFFIXES else ""
        raise ExtractionError(f"no text{hint}")
    return pages


def decode_text(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise ExtractionError("binary content, not text")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def pdf_pages(data: bytes) -> list[PageText]:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")  # many "protected" PDFs only restrict printing: empty user password
            except (DependencyError, NotImplementedError) as e:
                raise ExtractionError(f"encrypted PDF that cannot be opened here ({e})") from None
            if not opened:
                raise ExtractionError("encrypted PDF (password-protected); decrypt it first")
        pages = []
        for number, page in enumerate(reader.pages, start=1):
            pages.append(PageText(pdf_paragraphs(page.extract_text() or ""), number))
        return pages
    except ExtractionError:
        raise
    except FileNotDecryptedError:
        raise ExtractionError("encrypted PDF (password-protected); decrypt it first") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError, RecursionError) as e:
        raise ExtractionError(f"not a readable PDF ({type(e).__name__}: {e})") from None


def pdf_paragraphs(text: str) -> str:
    """PDF text has a line per printed line: mend hyphenated words, end paragraphs at blank or short lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    widest = max((len(line) for line in lines), default=0)
    out: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped:
            out.append("\n\n")
            continue
        if out and out[-1].endswith("-") and not out[-1].endswith(" -") and stripped[:1].islower():
            out[-1] = out[-1][:-1] + stripped  # "capaci-" + "tor"
        else:
            out.append(stripped if not out or out[-1] == "\n\n" else " " + stripped)
        if len(stripped) < 0.6 * widest and not stripped.endswith("-"):  # a heading, or a paragraph's last line
            out.append("\n\n")
    return "".join(out).strip()


_MD_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\A---\n.*?\n---\n", re.S), ""),  # front matter
    (re.compile(r"\{%.*?%\}|\{\{.*?\}\}", re.S), ""),  # Jekyll / Liquid tags
    (re.compile(r"\{:[^}]*\}"), ""),  # kramdown attribute lists
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"^```.*$|^~~~.*$", re.M), ""),  # code fences (the code stays)
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images: their alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links: their text
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),
    (re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]+\S+.*$", re.M), ""),  # link definitions
    (re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M), r"\n\1\n"),  # headings: own paragraph
    (re.compile(r"^[ \t]{0,3}>[ \t]?", re.M), ""),  # block quotes
    (re.compile(r"^[ \t]*(?:[-*_][ \t]*){3,}$", re.M), ""),  # rules
    (re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$", re.M), ""),  # table separators
    (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?!\w)"), r"\1"),
    (re.compile(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?!\w)"), r"\1"),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"</?[A-Za-z][^>]*>"), ""),  # inline HTML tags
]


def markdown_text(text: str) -> str:
    """Markdown with its markup stripped lightly: the words stay, paragraphs stay apart."""
    text = text.replace("\r\n", "\n")
    for pattern, replacement in _MD_RULES:
        text = pattern.sub(replacement, text)
    return text.strip()


_HTML_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
_HTML_BLOCKS = frozenset({
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
    "section", "article", "header", "footer", "aside", "nav", "main", "pre", "blockquote", "figure",
    "figcaption", "hr", "title", "form", "details", "summary", "caption",
})


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _HTML_SKIP:
            self._skip += 1
        if tag in _HTML_BLOCKS:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HTML_BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _HTML_SKIP and self._skip:
            self._skip -= 1
        if tag in _HTML_BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._skip:
            self.parts.append(data)


def html_text(text: str) -> str:
    """Visible text of an HTML page (title first), one paragraph per block element; scripts and styles dropped."""
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    title = " ".join("".join(parser.title).split())
    body = "".join(parser.parts)
    return f"{title}\n\n{body}".strip() if title else body.strip()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the pipeline -----------------------------------------------------------------------


@dataclass
class Ingestor:
    """Extract, chunk, embed and store files into one collection of `store`."""

    store: VectorStore
    embedder: Embedder
    count_tokens: TokenCounter
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS

    def ingest(self, collection: str, sources: Sequence[SourceFile], progress: IngestProgress | None = None) -> list[FileResult]:
        results = []
        for source in sources:
            if progress is not None:
                progress.file_started(source.name)
            result = self.ingest_one(collection, source, progress)
            if progress is not None:
                progress.file_done(result)
            results.append(result)
        return results

    def ingest_one(self, collection: str, source: SourceFile, progress: IngestProgress | None = None) -> FileResult:
        shown = str(source.path) if source.path is not None else None
        try:
            if source.error is not None:
                raise ExtractionError(source.error)
            data = source.read()
            digest = content_hash(data)
            known = self.store.document_state(collection, source.key)
            if known is not None and known.content_hash == digest and known.complete:
                return FileResult(source.name, "unchanged", known.chunks, known.pages, path=shown)
            pages = extract(data, source.name)
            chunks = chunk_pages(pages, self.count_tokens, self.chunk_tokens, self.overlap_tokens)
            if not chunks:
                raise ExtractionError("no text")
            vectors = self._embed(chunks, progress)
            self.store.put_document(collection, source.key, source.name, digest, len(pages), chunks, vectors)
            status: Status = "added" if known is None else "replaced"
            return FileResult(source.name, status, len(chunks), len(pages), path=shown)
        except ExtractionError as e:
            return FileResult(source.name, "error", error=str(e), path=shown)
        except Exception as e:  # a store or embedding failure: report it for this file, go on with the next
            logger.exception("ingesting %s failed", source.name)
            return FileResult(source.name, "error", error=f"{type(e).__name__}: {e}", path=shown)

    def _embed(self, chunks: list[Chunk], progress: IngestProgress | None) -> list[list[float]]:
        if progress is not None:
            progress.chunks_total(len(chunks))
        vectors: list[list[float]] = []
        for start in range(0, len(chunks), EMBED_BATCH):
            batch = chunks[start : start + EMBED_BATCH]
            vectors.extend(self.embedder.embed([c.text for c in batch]))
            if progress is not None:
                progress.chunks_embedded(len(batch))
        return vectors

