"""Retrieval and the grounded prompt: top passages for a question, put before the model with their sources.

The same prompt builder serves `/v1/chat/completions` with `"rag"` and `levante rag query --answer`.
The passages go into a system message (merged with the conversation's own system prompt, if any);
a chat format that refuses a system message (some Mistral templates do) gets them at the head of
the last user message instead. Passages are dropped, lowest score first, until the prompt plus
the reply's token budget fits the model's context window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from levante.loaders.chat_template import ChatTemplateError, Message, message_text

if TYPE_CHECKING:
    from levante.rag.embeddings import Embedder
    from levante.rag.vectorstore import VectorStore

INSTRUCTIONS = (
    "Answer the question using only the passages below, which come from the user's documents. "
    "Cite each passage you use by its source in square brackets, for example [{example}]. "
    "If the passages do not contain the answer, say that the documents do not say."
)
NO_PASSAGES = "No passage of the user's documents matches the question: say that the documents do not cover it."


@dataclass(frozen=True)
class Passage:
    file: str
    page: int | None
    chunk: int
    score: float
    text: str
    path: str = ""

    @classmethod
    def from_payload(cls, score: float, payload: dict[str, Any]) -> Passage:
        page = payload.get("page")
        return cls(
            file=str(payload.get("file", "")), page=int(page) if page is not None else None, chunk=int(payload.get("chunk", 0)),
            score=score, text=str(payload.get("text", "")), path=str(payload.get("path", "")),
        )

    @property
    def label(self) -> str:
        return f"{self.file}, page {self.page}" if self.page is not None else self.file

    def source(self) -> dict[str, Any]:
        """What API responses carry for each passage."""
        return {"file": self.file, "page": self.page, "chunk": self.chunk, "score": round(self.score, 6), "text": self.text}


def search(store: VectorStore, embedder: Embedder, collection: str, query: str, top_k: int) -> list[Passage]:
    """The `top_k` chunks nearest the query, best first (raises CollectionNotFoundError)."""
    store.require(collection)
    vector = embedder.embed([query])[0]
    return [Passage.from_payload(hit.score, hit.payload) for hit in store.search(collection, vector, top_k)]


def context_block(passages: Sequence[Passage]) -> str:
    if not passages:
        return NO_PASSAGES
    example = passages[0].label
    body = "\n\n".join(f"[{p.label}]\n{p.text}" for p in passages)
    return f"{INSTRUCTIONS.format(example=example)}\n\nPassages:\n\n{body}"


def question(messages: Sequence[Message]) -> str:
    """What to search for: the last user message."""
    for m in reversed(messages):
        if m.get("role") == "user":
            text = message_text(m).strip()
            if text:
                return text
    raise ValueError("retrieval needs a user message with text to search for")


def grounded_messages(messages: Sequence[Message], passages: Sequence[Passage], in_system: bool = True) -> list[Message]:
    """The conversation with the passages added: in a leading system message, or before the last user message's text."""
    block = context_block(passages)
    out = [dict(m) for m in messages]
    if in_system:
        if out and out[0].get("role") == "system":
            own = message_text(out[0]).strip()
            out[0]["content"] = f"{own}\n\n{block}" if own else block
        else:
            out.insert(0, {"role": "system", "content": block})
        return out  # type: ignore[return-value]
    last = max(i for i, m in enumerate(out) if m.get("role") == "user")
    out[last]["content"] = f"{block}\n\nQuestion: {message_text(out[last])}"
    return out  # type: ignore[return-value]


def grounded_prompt(
    messages: Sequence[Message],
    passages: Sequence[Passage],
    encode: Callable[[list[Message]], list[int]],
    max_model_len: int,
    reply_tokens: int,
) -> tuple[list[int], list[Passage]]:
    """Prompt token ids with as many of the best passages as fit, and the passages used.

    `encode` applies the model's chat format (raising ChatTemplateError for a conversation it
    refuses). Passages are kept best-first; the lowest-scored goes first while the prompt plus
    `reply_tokens` exceeds `max_model_len`. With none left the prompt is returned anyway (the
    engine then reports the conversation itself as too long).
    """
    kept = sorted(passages, key=lambda p: p.score, reverse=True)
    in_system = True
    while True:
        try:
            ids = encode(grounded_messages(messages, kept, in_system))
        except ChatTemplateError:
            if not in_system:
                raise
            in_system = False  # this chat format takes no system message here: use the user turn
            continue
        if len(ids) + reply_tokens <= max_model_len or not kept:
            return ids, kept
        kept = kept[:-1]


def reply_budget(max_tokens: int | None, max_model_len: int) -> int:
    """Tokens to keep free for the answer: what the request asks, else a quarter of the window (at most 512)."""
    return max_tokens if max_tokens is not None else min(512, max_model_len // 4)
