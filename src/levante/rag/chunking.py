"""Split extracted text into overlapping chunks that fit the embedder's window.

Paragraphs (blank-line separated; a PDF page is one or more) are packed whole into chunks of up
to `max_tokens` word pieces of the embedding model's tokenizer. A paragraph longer than that is
split at sentence boundaries (a sentence longer than that, at words). Each new chunk starts with
the tail of the previous one (up to `overlap_tokens`, whole sentences where they fit) so a fact
that straddles a boundary is still found whole in one chunk. Chunks never cross a page, so the
page a passage cites is the page it came from.

Example with max_tokens=12, overlap_tokens=4 and a counter of one token per word::

    page 1 paragraphs: "A b c d e. F g h." (8)   "I j k l m n." (6)   "O p." (2)
    chunk 0: "A b c d e. F g h."                    8 tokens; adding the next paragraph would make 14
    chunk 1: "F g h.\\n\\nI j k l m n.\\n\\nO p."     11 tokens; "F g h." (3) is the overlap: the
             longest run of whole trailing sentences of chunk 0 within 4 tokens
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

TokenCounter = Callable[[str], int]

DEFAULT_CHUNK_TOKENS = 200  # all-MiniLM-L6-v2 reads 256 word pieces, [CLS] and [SEP] included
DEFAULT_OVERLAP_TOKENS = 40

# A sentence ends at . ! ? or … (and a closing quote or bracket right after it) before a capital or digit.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+(?=[\"'“‘(\[]?[A-Z0-9À-ÖØ-Þ])")
_BLANK_LINE = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class PageText:
    """Text of one page (1-based `page` for paged formats such as PDF, None otherwise)."""

    text: str
    page: int | None = None


@dataclass(frozen=True)
class Chunk:
    text: str
    page: int | None
    index: int  # position in the document, from 0
    tokens: int


@dataclass(frozen=True)
class _Unit:
    """A paragraph, or a sentence (or word run) of an over-long one."""

    text: str
    tokens: int
    paragraph: int


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each with its inner whitespace collapsed."""
    out = []
    for block in _BLANK_LINE.split(text.replace("\r\n", "\n").replace("\r", "\n")):
        clean = " ".join(block.split())
        if clean:
            out.append(clean)
    return out


def sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def chunk_pages(
    pages: Sequence[PageText],
    count_tokens: TokenCounter,
    max_tokens: int = DEFAULT_CHUNK_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Chunk]:
    """Chunks of every page in order, numbered across the document."""
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens // 2:
        raise ValueError(f"overlap_tokens must be in 0..{max_tokens // 2 - 1}, got {overlap_tokens}")
    chunks: list[Chunk] = []
    for page in pages:
        units = _units(paragraphs(page.text), count_tokens, max_tokens)
        for text, tokens in _pack(units, count_tokens, max_tokens, overlap_tokens):
            chunks.append(Chunk(text=text, page=page.page, index=len(chunks), tokens=tokens))
    return chunks


def _units(paras: list[str], count: TokenCounter, max_tokens: int) -> list[_Unit]:
    units: list[_Unit] = []
    for p, para in enumerate(paras):
        n = count(para)
        if n <= max_tokens:
            units.append(_Unit(para, n, p))
            continue
        for sentence in sentences(para):
            m = count(sentence)
            if m <= max_tokens:
                units.append(_Unit(sentence, m, p))
            else:
                units.extend(_Unit(t, k, p) for t, k in _word_runs(sentence, count, max_tokens))
    return units


def _word_runs(text: str, count: TokenCounter, max_tokens: int) -> list[tuple[str, int]]:
    """Consecutive runs of whole words of at most `max_tokens` tokens (a single giant 'word' is cut by characters)."""
    runs: list[tuple[str, int]] = []
    words: list[str] = []
    used = 0
    for word in text.split():
        n = count(word)
        if n > max_tokens:  # a URL, a base64 blob...: cut it by characters
            runs.extend(_flush(words, used))
            words, used = [], 0
            step = max(1, len(word) * max_tokens // (n + 1))
            runs.extend((word[i : i + step], count(word[i : i + step])) for i in range(0, len(word), step))
            continue
        if used + n > max_tokens:
            runs.extend(_flush(words, used))
            words, used = [], 0
        words.append(word)
        used += n
    runs.extend(_flush(words, used))
    return runs


def _flush(words: list[str], used: int) -> list[tuple[str, int]]:
    return [(" ".join(words), used)] if words else []


def _join(units: Sequence[_Unit]) -> str:
    parts: list[str] = []
    for i, u in enumerate(units):
        if i:
            parts.append(" " if units[i - 1].paragraph == u.paragraph else "\n\n")
        parts.append(u.text)
    return "".join(parts)


def _pack(units: list[_Unit], count: TokenCounter, max_tokens: int, overlap_tokens: int) -> list[tuple[str, int]]:
    """Greedy packing; token counts add up because the tokenizer splits at whitespace first (BERT word pieces)."""
    out: list[tuple[str, int]] = []
    current: list[_Unit] = []
    used = 0
    fresh = 0  # units in `current` that are not overlap carried from the previous chunk
    for unit in units:
        if current and used + unit.tokens > max_tokens:
            if fresh:
                out.append((_join(current), used))
            current = _tail(current, count, overlap_tokens)
            used = sum(u.tokens for u in current)
            if used + unit.tokens > max_tokens:
                current, used = [], 0
            fresh = 0
        current.append(unit)
        used += unit.tokens
        fresh += 1
    if current and fresh:
        out.append((_join(current), used))
    return out


def _tail(units: list[_Unit], count: TokenCounter, budget: int) -> list[_Unit]:
    """The end of a chunk to repeat at the start of the next: whole sentences, else the last words."""
    if budget <= 0 or not units:
        return []
    last = units[-1]
    if last.tokens <= budget:
        return [last]
    pieces = sentences(last.text)
    kept: list[_Unit] = []
    used = 0
    for sentence in reversed(pieces):
        n = count(sentence)
        if used + n > budget:
            break
        kept.insert(0, _Unit(sentence, n, last.paragraph))
        used += n
    if kept:
        return kept
    words = last.text.split()
    tail: list[str] = []
    for word in reversed(words):
        n = count(word)
        if used + n > budget:
            break
        tail.insert(0, word)
        used += n
    return [_Unit(" ".join(tail), used, last.paragraph)] if tail else []


def embedding_token_counter(model_dir: Path | None = None) -> TokenCounter:
    """Word pieces of all-MiniLM-L6-v2's tokenizer (no [CLS]/[SEP], no truncation), without loading the model."""
    from tokenizers import Tokenizer

    from levante.rag.embeddings import packaged_embedding_model

    tokenizer = Tokenizer.from_file(str((model_dir or packaged_embedding_model()) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count
