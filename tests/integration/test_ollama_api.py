"""Ollama routes with the official `ollama` Python client against a real `levante serve`."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import ollama
import pytest

from levante import LLM, SamplingParams
from levante.loaders.loader import packaged_model_path

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def llm() -> LLM:
    path = packaged_model_path("smollm2")
    assert isinstance(path, Path)
    return LLM(str(path), dtype="auto", kv_cache_memory=256 << 20, max_model_len=2048)


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> ollama.Client:
    return ollama.Client(host=smollm2_server.url, timeout=120)


def offline_chat(llm: LLM, messages: list[dict[str, str]], n: int) -> tuple[str, list[int], str | None, int]:
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=n))[0]
    o = out.outputs[0]
    return o.text, o.token_ids, o.finish_reason, len(out.prompt_token_ids)


def test_chat_greedy_matches_the_offline_engine(client: ollama.Client, llm: LLM) -> None:
    text, ids, finish, n_prompt = offline_chat(llm, QUESTION, 12)
    r = client.chat(model="smollm2", messages=QUESTION, stream=False, options=GREEDY)
    assert r.message.role == "assistant" and r.message.content == text
    assert r.done and r.done_reason == finish
    assert r.eval_count == len(ids) and r.prompt_eval_count == n_prompt
    assert r.model == "smollm2"
    for duration in (r.total_duration, r.load_duration, r.prompt_eval_duration, r.eval_duration):
        assert isinstance(duration, int) and duration > 0
    assert r.total_duration is not None and r.eval_duration is not None and r.total_duration >= r.eval_duration
    assert r.created_at is not None and datetime.fromisoformat(r.created_at).tzinfo is not None


def test_chat_stream_concatenates_to_the_whole_reply(client: ollama.Client, llm: LLM, smollm2_server: Server) -> None:
    text, ids, finish, _ = offline_chat(llm, QUESTION, 12)
    parts = list(client.chat(model="smollm2:latest", messages=QUESTION, options=GREEDY, stream=True))
    assert len(parts) >= 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == text
    last = parts[-1]
    assert last.message.content == "" and last.done_reason == finish and last.eval_count == len(ids)
    assert {p.model for p in parts} == {"smollm2:latest"}
    # Without "stream" in the body the server streams NDJSON, as Ollama does.
    with httpx.stream("POST", f"{smollm2_server.url}/api/chat", json={"model": "smollm2", "messages": QUESTION, "options": GREEDY},
                      timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(x["message"]["content"] for x in lines) == text and lines[-1]["done"] is True


def test_generate_templates_the_prompt_and_returns_context(client: ollama.Client, llm: LLM) -> None:
    system = "Answer in one short sentence."
    text, ids, _, _ = offline_chat(llm, [{"role": "system", "content": system}, QUESTION[0]], 10)
    r = client.generate(model="smollm2", prompt=QUESTION[0]["content"], system=system, options={"temperature": 0, "num_predict": 10})
    assert r.response == text
    prompt_ids = llm.encode_chat([{"role": "system", "content": system}, QUESTION[0]])
    assert r.context is not None and list(r.context) == prompt_ids + ids
    # Continue the conversation from the returned context: it is prepended to the next prompt.
    follow = client.generate(model="smollm2", prompt="And of Spain?", context=r.context, options={"temperature": 0, "num_predict": 4})
    assert follow.context is not None and list(follow.context[: len(r.context)]) == list(r.context)
    assert follow.prompt_eval_count is not None and follow.prompt_eval_count > len(r.context)


def test_generate_raw_skips_the_template(client: ollama.Client, llm: LLM) -> None:
    prompt = "The capital of France is"
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    r = client.generate(model="smollm2", prompt=prompt, raw=True, options={"temperature": 0, "num_predict": 8})
    assert r.response == expected and r.done_reason == "length" and r.eval_count == 8
    parts = list(client.generate(model="smollm2", prompt=prompt, raw=True, stream=True, options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.response or "" for p in parts) == expected and parts[-1].context == r.context


def test_options_stop_and_empty_requests(client: ollama.Client, llm: LLM) -> None:
    text, _, _, _ = offline_chat(llm, QUESTION, 12)
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    r = client.chat(model="smollm2", messages=QUESTION, stream=False, options={**GREEDY, "stop": [stop]}, keep_alive="5m")
    assert r.done_reason == "stop" and r.message.content == text[: text.index(stop)]
    loaded = client.chat(model="smollm2", messages=[])
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    assert client.generate(model="smollm2", prompt="").done_reason == "load"


def test_format_json_constrains_the_reply(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": 'Reply with the JSON object {"answer": "yes"} and nothing else.'}]
    r = client.chat(model="smollm2", messages=messages, format="json", stream=False, options={"temperature": 0, "num_predict": 48})
    assert r.done_reason == "stop", r.message.content
    assert isinstance(json.loads(r.message.content or ""), dict)


def test_tags_show_ps_version(client: ollama.Client, smollm2_server: Server) -> None:
    tags = client.list().models
    assert [m.model for m in tags] == ["smollm2:latest"]
    raw = httpx.get(f"{smollm2_server.url}/api/tags", timeout=30).json()["models"][0]
    assert raw["name"] == raw["model"] == "smollm2:latest" and len(raw["digest"]) == 64
    d = tags[0].details
    assert d is not None and (d.format, d.family, d.quantization_level, d.parameter_size) == ("gguf", "llama", "Q4_1", "134.52M")
    assert tags[0].size is not None and tags[0].size > 50_000_000 and tags[0].modified_at is not None

    shown = client.show("smollm2:latest")
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 4096
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["general.parameter_count"] == 134_515_008
    assert shown.capabilities == ["completion"]
    assert shown.template is not None and "{{ .Prompt }}" in shown.template and "<|im_start|>" in shown.template
    assert shown.parameters is not None and 'stop "<|im_end|>"' in shown.parameters
    assert shown.modelfile is not None and shown.modelfile.startswith("# Modelfile")

    running = client.ps().models
    assert [(m.name, m.size_vram, m.context_length) for m in running] == [("smollm2:latest", 0, 4096)]
    assert running[0].expires_at is not None and running[0].expires_at.year > 2100

    version = httpx.get(f"{smollm2_server.url}/api/version", timeout=30)
    assert version.status_code == 200 and version.json()["version"].startswith("0.")


def test_embed_gives_unit_vectors_that_rank_paraphrases_closer(client: ollama.Client) -> None:
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply on Monday."]
    r = client.embed(model="all-minilm", input=texts)
    assert r.model == "all-minilm" and len(r.embeddings) == 3
    assert r.prompt_eval_count is not None and r.prompt_eval_count > 10
    for v in r.embeddings:
        assert len(v) == 384 and math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4)

    def cos(a: int, b: int) -> float:
        return math.fsum(x * y for x, y in zip(r.embeddings[a], r.embeddings[b], strict=True))

    assert cos(0, 1) > cos(0, 2) + 0.2
    single = client.embed(model="all-minilm:latest", input=texts[0]).embeddings
    legacy = client.embeddings(model="all-minilm-l6-v2", prompt=texts[0]).embedding
    assert len(single) == 1 and all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(single[0], legacy, strict=True))
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(single[0], r.embeddings[0], strict=True))


def test_unknown_models_are_404(client: ollama.Client) -> None:
    for call in (
        lambda: client.chat(model="nope", messages=QUESTION, stream=False),
        lambda: list(client.chat(model="nope:7b", messages=QUESTION, stream=True)),
        lambda: client.generate(model="nope", prompt="hi"),
        lambda: client.show("nope"),
        lambda: client.embed(model="nope", input="hi"),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 404 and caught.value.error.startswith("model 'nope")


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/api/chat", {"model": "smollm2", "messages": QUESTION, "options": {"num_ctx": 8192}}, "num_ctx 8192 is larger than this model's context window of 4096"),
        ("/api/chat", {"model": "smollm2", "messages": QUESTION, "options": {"num_predict": 0}}, "num_predict"),
        ("/api/chat", {"model": "smollm2", "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/api/chat", {"model": "smollm2", "messages": QUESTION, "format": {"type": "object"}}, "JSON schema"),
        ("/api/chat", {"model": "smollm2", "messages": QUESTION, "think": True}, "thinking"),
        ("/api/chat", {"messages": QUESTION}, "model"),
        ("/api/generate", {"model": "smollm2", "prompt": "hi", "template": "{{ .Prompt }}"}, "template"),
        ("/api/generate", {"model": "smollm2", "prompt": "hi", "options": {"temperature": -1}}, "temperature"),
        ("/api/embed", {"model": "smollm2", "input": "hi"}, "does not support embeddings"),
        ("/api/embed", {"model": "all-minilm", "input": "hi", "dimensions": 128}, "384"),
    ],
)
def test_bad_requests_are_400_with_ollama_errors(smollm2_server: Server, path: str, body: dict[str, object], needle: str) -> None:
    r = httpx.post(f"{smollm2_server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and needle in r.json()["error"]
