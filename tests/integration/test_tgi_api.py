"""TGI routes with Hugging Face's own client (`huggingface_hub.InferenceClient`) against a real `levante serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from levante import LLM, SamplingParams
from levante.loaders.loader import packaged_model_path

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
N = 12


@pytest.fixture(scope="module")
def llm() -> LLM:
    path = packaged_model_path("smollm2")
    assert isinstance(path, Path)
    return LLM(str(path), dtype="auto", kv_cache_memory=256 << 20, max_model_len=2048)


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> InferenceClient:
    return InferenceClient(base_url=smollm2_server.url, timeout=120)


@pytest.fixture(scope="module")
def greedy(llm: LLM) -> tuple[str, list[int], str | None]:
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=N))[0].outputs[0]
    return out.text, out.token_ids, out.finish_reason


def test_greedy_text_and_details_match_the_offline_engine(client: InferenceClient, greedy: tuple[str, list[int], str | None]) -> None:
    text, ids, finish = greedy
    assert client.text_generation(PROMPT, max_new_tokens=N) == text  # no sampling parameter given: greedy, as in TGI
    out = client.text_generation(PROMPT, max_new_tokens=N, details=True, do_sample=False)
    assert out.generated_text == text
    d = out.details
    assert [t.id for t in d.tokens] == ids
    assert d.generated_tokens == len(ids)
    assert d.finish_reason == {"length": "length", "stop": "eos_token"}[finish or ""]
    assert d.seed is None and d.prefill == []
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.tokens)
    assert "".join(t.text for t in d.tokens if not t.special) == text


def test_stream_concatenates_to_the_non_streamed_text(client: InferenceClient, greedy: tuple[str, list[int], str | None]) -> None:
    text, ids, _ = greedy
    events = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True, details=True))
    assert [e.index for e in events] == list(range(1, len(ids) + 1))
    assert [e.token.id for e in events] == ids
    # As the text-generation client's README does: special tokens (EOS) are not part of the text.
    assert "".join(e.token.text for e in events if not e.token.special) == text
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == text
    assert last.details is not None and last.details.generated_tokens == len(ids)
    assert last.details.input_length == len(client_tokens(client, PROMPT))
    plain = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True))
    assert all(isinstance(p, str) for p in plain) and len(plain) == len(ids)


def client_tokens(client: InferenceClient, text: str) -> list[int]:
    assert client.model is not None
    r = httpx.post(f"{client.model}/tokenize", json={"inputs": text}, timeout=30)
    r.raise_for_status()
    return [t["id"] for t in r.json()]


def test_stop_sequence_is_kept_and_reported(client: InferenceClient, greedy: tuple[str, list[int], str | None]) -> None:
    text, _, _ = greedy
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    out = client.text_generation(PROMPT, max_new_tokens=N, stop=[stop], details=True)
    assert out.details.finish_reason == "stop_sequence"
    assert out.generated_text == text[: text.index(stop) + len(stop)]


def test_prefill_and_top_tokens(client: InferenceClient, llm: LLM, greedy: tuple[str, list[int], str | None]) -> None:
    _, ids, _ = greedy
    out = client.text_generation(PROMPT, max_new_tokens=4, details=True, decoder_input_details=True, top_n_tokens=3)
    d = out.details
    prompt_ids = llm.tokenizer.encode(PROMPT)
    assert [t.id for t in d.prefill] == prompt_ids
    assert d.prefill[0].logprob is None and all(t.logprob is not None and t.logprob <= 0 for t in d.prefill[1:])
    assert [t.id for t in d.tokens] == ids[:4]
    assert d.top_tokens is not None and len(d.top_tokens) == 4
    for chosen, tops in zip(d.tokens, d.top_tokens, strict=True):
        assert len(tops) == 3
        top = [t if isinstance(t, dict) else t.__dict__ for t in tops]  # the client leaves these as dicts
        assert top[0]["id"] == chosen.id and top[0]["logprob"] == pytest.approx(chosen.logprob)  # greedy takes the top-1
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert all(set(t) >= {"id", "text", "logprob", "special"} for t in top)


def test_sampling_uses_and_reports_a_seed(client: InferenceClient) -> None:
    a = client.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=7, details=True)
    b = client.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=7, details=True)
    assert a.details.seed == 7 and a.generated_text == b.generated_text
    drawn = client.text_generation(PROMPT, max_new_tokens=4, temperature=0.9, details=True)  # temperature alone turns sampling on
    assert isinstance(drawn.details.seed, int)


def test_return_full_text_and_compat_route_shape(smollm2_server: Server, greedy: tuple[str, list[int], str | None]) -> None:
    text, _, _ = greedy
    r = httpx.post(smollm2_server.url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": N, "return_full_text": True}}, timeout=120)
    assert r.status_code == 200
    assert r.json() == [{"generated_text": PROMPT + text}]  # TGI's compat route answers a one-element list
    r = httpx.post(f"{smollm2_server.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": N}}, timeout=120)
    assert r.json() == {"generated_text": text}


def test_generate_stream_is_server_sent_events(smollm2_server: Server, greedy: tuple[str, list[int], str | None]) -> None:
    text, ids, _ = greedy
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": N}}
    with httpx.stream("POST", f"{smollm2_server.url}/generate_stream", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data:") :]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == ids
    assert events[-1]["generated_text"] == text and events[-1]["details"] is None
    assert set(events[0]) == {"index", "token", "generated_text", "details"}


def test_info(smollm2_server: Server) -> None:
    info = httpx.get(f"{smollm2_server.url}/info", timeout=30).json()
    assert info["model_id"] == "smollm2" and info["model_pipeline_tag"] == "text-generation"
    assert info["max_total_tokens"] == 4096
    assert info["max_input_tokens"] == info["max_input_length"] == 4095
    assert info["max_best_of"] == 1 and info["max_stop_sequences"] >= 4 and info["max_concurrent_requests"] > 0
    assert info["model_device_type"] == "cpu" and info["model_dtype"].startswith("torch.")
    assert info["router"] == "levante" and info["sha"] is None and info["docker_label"] is None and info["version"]


def test_tokenize_ids_and_offsets(smollm2_server: Server, llm: LLM) -> None:
    text = "Héllo wörld, the sea 🌊 is calm!"
    tokens = httpx.post(f"{smollm2_server.url}/tokenize", json={"inputs": text}, timeout=30).json()
    assert [t["id"] for t in tokens] == llm.tokenizer.encode(text)
    position = 0
    for t in tokens:
        assert t["start"] == position and t["stop"] >= t["start"]
        assert text[t["start"] : t["stop"]] == t["text"]
        position = t["stop"]
    assert position == len(text) and "".join(t["text"] for t in tokens) == text


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"parameters": {"max_new_tokens": 4}}, "inputs"),
        ({"inputs": "Hi", "parameters": {"max_new_tokens": 5000}}, "must be <= 4096. Given: "),
        ({"inputs": "Hi", "parameters": {"temperature": 0}}, "temperature"),
        ({"inputs": "Hi", "parameters": {"top_p": 1.0}}, "top_p"),
        ({"inputs": "Hi", "parameters": {"best_of": 2}}, "best_of"),
        ({"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": {}}}}, "grammar"),
        ({"inputs": "Hi", "parameters": {"truncate": 5000}}, "truncate"),
        ({"inputs": "Hi", "parameters": {"stop": ["a"] * 17}}, "stop"),
    ],
)
def test_bad_requests_get_tgi_errors(smollm2_server: Server, body: dict[str, object], needle: str) -> None:
    r = httpx.post(f"{smollm2_server.url}/generate", json=body, timeout=30)
    assert r.status_code == 400
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error_type"] == "validation"
    assert needle in err["error"]


def test_stream_refuses_decoder_input_details_before_streaming(smollm2_server: Server) -> None:
    body = {"inputs": "Hi", "parameters": {"decoder_input_details": True}}
    r = httpx.post(f"{smollm2_server.url}/generate_stream", json=body, timeout=30)
    assert r.status_code == 400 and "decoder_input_details" in r.json()["error"]


def test_client_raises_its_validation_error(client: InferenceClient) -> None:
    with pytest.raises(ValidationError, match="1 `inputs` tokens and 5000 `max_new_tokens`"):
        client.text_generation("Hi", max_new_tokens=5000)


def test_truncate_keeps_the_last_tokens(client: InferenceClient, llm: LLM) -> None:
    long_prompt = "One two three four five six seven eight nine ten. " + PROMPT
    kept = len(llm.tokenizer.encode(PROMPT))
    out = client.text_generation(long_prompt, max_new_tokens=2, truncate=kept, details=True, decoder_input_details=True)
    assert [t.id for t in out.details.prefill] == llm.tokenizer.encode(long_prompt)[-kept:]
