"""The grounded prompt: passages with their sources in a system message (or the user turn when the
chat format refuses a system message), fitted to the context window with SmolLM2's real tokenizer."""

from __future__ import annotations

from typing import Any

import gguf
import pytest

from levante.loaders.chat_template import ChatTemplateError, JinjaChatFormat, Message
from levante.loaders.loader import packaged_model_path
from levante.loaders.tokenizer import Tokenizer, tokenizer_from_gguf
from levante.rag.retrieve import (
    Passage,
    context_block,
    grounded_messages,
    grounded_prompt,
    question,
    reply_budget,
)

# Mistral-7B-Instruct-v0.1's own template: it refuses any system message.
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

PASSAGES = [
    Passage("specs.pdf", 2, 3, 0.81, "The Zorblax-7 flux capacitor operates at 4,812 millijoules."),
    Passage("notes.md", None, 0, 0.42, "The Glimmerhorn beacon flashes every 7 seconds."),
    Passage("specs.pdf", 3, 5, 0.63, "The Merovant ferry carries at most 96 passengers."),
]


@pytest.fixture(scope="module")
def smollm() -> tuple[Tokenizer, str]:
    path = packaged_model_path("smollm2")
    assert path is not None
    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return tokenizer_from_gguf(metadata), str(metadata["tokenizer.chat_template"])


def test_passages_go_into_a_system_message_with_labels() -> None:
    messages: list[Message] = [{"role": "user", "content": "How much energy does the Zorblax-7 need?"}]
    out = grounded_messages(messages, PASSAGES[:2])
    assert [m["role"] for m in out] == ["system", "user"]
    system = str(out[0]["content"])
    assert "[specs.pdf, page 2]\nThe Zorblax-7 flux capacitor operates at 4,812 millijoules." in system
    assert "[notes.md]\nThe Glimmerhorn beacon" in system
    assert "only the passages below" in system
    assert out[1] == messages[0] and messages == [{"role": "user", "content": "How much energy does the Zorblax-7 need?"}]


def test_an_existing_system_prompt_is_kept_first() -> None:
    messages: list[Message] = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Énergie ?"}]
    out = grounded_messages(messages, PASSAGES[:1])
    assert len(out) == 2 and str(out[0]["content"]).startswith("Answer in French.\n\n")
    assert "4,812" in str(out[0]["content"])


def test_in_the_user_turn_when_asked() -> None:
    messages: list[Message] = [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Energy?"},
    ]
    out = grounded_messages(messages, PASSAGES[:1], in_system=False)
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[0]["content"] == "Hi"
    assert str(out[2]["content"]).endswith("\n\nQuestion: Energy?") and "4,812" in str(out[2]["content"])


def test_no_passages_says_so() -> None:
    assert "do not cover" in context_block([])


def test_question_is_the_last_user_message() -> None:
    assert question([{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "second"}]) == "second"
    with pytest.raises(ValueError):
        question([{"role": "system", "content": "only a system prompt"}])


def test_smollm2_template_gets_a_system_message(smollm: tuple[Tokenizer, str]) -> None:
    tokenizer, template = smollm
    chat = JinjaChatFormat(tokenizer, template)
    messages: list[Message] = [{"role": "user", "content": "How much energy does the Zorblax-7 need?"}]
    ids, used = grounded_prompt(messages, PASSAGES, chat.encode, max_model_len=4096, reply_tokens=256)
    assert used == sorted(PASSAGES, key=lambda p: -p.score)  # all fit, best first
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nAnswer the question using only the passages")
    assert text.index("specs.pdf, page 2") < text.index("specs.pdf, page 3") < text.index("notes.md")


def test_template_without_system_role_gets_the_passages_in_the_user_turn(smollm: tuple[Tokenizer, str]) -> None:
    tokenizer, _ = smollm
    chat = JinjaChatFormat(tokenizer, MISTRAL_V01_TEMPLATE, bos_token="<s>", eos_token="</s>")
    messages: list[Message] = [{"role": "user", "content": "How much energy does the Zorblax-7 need?"}]
    with pytest.raises(ChatTemplateError):
        chat.encode(grounded_messages(messages, PASSAGES))
    ids, used = grounded_prompt(messages, PASSAGES, chat.encode, max_model_len=4096, reply_tokens=256)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<s>[INST] Answer the question using only the passages")
    assert text.endswith("Question: How much energy does the Zorblax-7 need? [/INST]")
    assert "4,812 millijoules" in text and len(used) == 3


def test_lowest_scored_passages_are_dropped_to_fit(smollm: tuple[Tokenizer, str]) -> None:
    tokenizer, template = smollm
    chat = JinjaChatFormat(tokenizer, template)
    messages: list[Message] = [{"role": "user", "content": "How much energy does the Zorblax-7 need?"}]
    best_first = sorted(PASSAGES, key=lambda p: -p.score)
    sizes = {k: len(grounded_prompt(messages, best_first[:k], chat.encode, 10**6, 0)[0]) for k in range(4)}
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3]
    reply = 100
    for k in range(4):  # a window that holds exactly k passages plus the reply keeps the k best
        ids, used = grounded_prompt(messages, PASSAGES, chat.encode, max_model_len=sizes[k] + reply, reply_tokens=reply)
        assert [p.score for p in used] == sorted((p.score for p in PASSAGES), reverse=True)[:k]
        assert len(ids) == sizes[k]
    ids, used = grounded_prompt(messages, PASSAGES, chat.encode, max_model_len=10, reply_tokens=reply)
    assert used == [] and len(ids) == sizes[0]  # nothing fits: the bare prompt, for the engine to refuse


def test_reply_budget() -> None:
    assert reply_budget(64, 4096) == 64
    assert reply_budget(None, 4096) == 512
    assert reply_budget(None, 1024) == 256


def test_sources_shape() -> None:
    source: dict[str, Any] = PASSAGES[0].source()
    assert source == {"file": "specs.pdf", "page": 2, "chunk": 3, "score": 0.81, "text": PASSAGES[0].text}
    assert Passage.from_payload(0.5, {"file": "a.md", "page": None, "chunk": 4, "text": "t", "path": "/x/a.md"}).label == "a.md"
