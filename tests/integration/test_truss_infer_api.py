"""Truss/Baseten `/predict` and the Ray Serve example's `/infer`, called as their users call them (httpx/requests-style)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from levante import LLM, SamplingParams
from levante.loaders.loader import packaged_model_path

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

PROMPT = "What is the Mistral wind?"
N = 12


@pytest.fixture(scope="module")
def llm() -> LLM:
    path = packaged_model_path("smollm2")
    assert isinstance(path, Path)
    return LLM(str(path), dtype="auto", kv_cache_memory=256 << 20, max_model_len=2048)


@pytest.fixture(scope="module")
def http(smollm2_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=smollm2_server.url, timeout=180) as c:
        yield c


def chat_reply(llm: LLM, messages: list[dict[str, str]], n: int) -> str:
    return llm.chat(messages, SamplingParams(temperature=0, max_tokens=n))[0].outputs[0].text


def test_predict_wraps_the_prompt_in_the_chat_format(http: httpx.Client, llm: LLM) -> None:
    expected = chat_reply(llm, [{"role": "user", "content": PROMPT}], N)
    r = http.post("/predict", json={"prompt": PROMPT, "max_tokens": N, "temperature": 0})
    assert r.status_code == 200 and r.json() == {"output": expected}


def test_predict_stream_is_plain_text_that_joins_to_the_whole_reply(http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0}
    whole = http.post("/predict", json=body).json()["output"]
    with http.stream("POST", "/predict", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
        chunks = list(r.iter_text())
    assert "".join(chunks) == whole  # exactly the generated text: no framing, no prompt


def test_predict_raw_messages_and_transformers_style_fields(http: httpx.Client, llm: LLM) -> None:
    raw_prompt = "The Mistral is a wind that"
    raw = llm.generate(raw_prompt, SamplingParams(temperature=0, max_tokens=N))[0].outputs[0].text
    r = http.post("/predict", json={"prompt": raw_prompt, "raw": True, "max_tokens": N, "temperature": 0})
    assert r.json() == {"output": raw}
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}]
    r = http.post("/predict", json={"messages": messages, "max_tokens": N, "temperature": 0})
    assert r.json() == {"output": chat_reply(llm, messages, N)}
    # Transformers-based Trusses send max_new_tokens and do_sample=false for greedy; extra knobs are ignored.
    r = http.post("/predict", json={"prompt": PROMPT, "max_new_tokens": 6, "do_sample": False, "no_repeat_ngram_size": 3, "use_cache": True})
    assert r.json() == {"output": chat_reply(llm, [{"role": "user", "content": PROMPT}], 6)}


def test_baseten_url_forms(http: httpx.Client, llm: LLM) -> None:
    expected = {"output": chat_reply(llm, [{"role": "user", "content": PROMPT}], 4)}
    for path in ("/model_versions/abc123/predict", "/production/predict", "/environments/production/predict"):
        r = http.post(path, json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json() == expected, path


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_tokens": 4}, "prompt is required"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "not both"),
        ({"prompt": "hi", "max_tokens": 5000}, "context window is 4096 tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "model": "nope"}, "not served here"),
    ],
)
def test_predict_bad_requests(http: httpx.Client, body: dict[str, object], needle: str) -> None:
    r = http.post("/predict", json=body)
    assert r.status_code in (400, 404), r.text
    assert needle in r.json()["error"]["message"]


def test_infer_replies_as_the_ray_serve_example(http: httpx.Client, llm: LLM) -> None:
    sentence = "What is the capital of France?"
    r = http.get("/infer", params={"sentence": sentence, "max_tokens": 16})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == [chat_reply(llm, [{"role": "user", "content": sentence}], 16)]
    # Default budget: 512 new tokens, greedy (this reply ends well before that).
    default = http.get("/infer", params={"sentence": sentence}).json()
    assert default == [chat_reply(llm, [{"role": "user", "content": sentence}], 512)]
    # The example's Gradio client strips brackets and quotes off the raw body: it gets the reply.
    assert r.text.strip('["]?\n') == r.json()[0].strip('["]?\n')
    assert http.get("/infer").status_code == 400


@pytest.fixture(scope="module")
def keyed_server(server_factory: Callable[..., Server]) -> Server:
    return server_factory(["smollm2", "--kv-cache-memory", "64MiB", "--max-model-len", "1024", "--api-key", "k1"])


def test_baseten_api_key_header(keyed_server: Server) -> None:
    body = {"prompt": "Hi", "max_tokens": 2}
    url = f"{keyed_server.url}/predict"
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Api-Key wrong"}, timeout=60).status_code == 401
    ok = httpx.post(url, json=body, headers={"Authorization": "Api-Key k1"}, timeout=120)
    assert ok.status_code == 200 and isinstance(ok.json()["output"], str)
    assert httpx.post(url, json=body, headers={"Api-Key": "k1"}, timeout=120).status_code == 200
    assert httpx.get(f"{keyed_server.url}/infer", params={"sentence": "Hi"}, timeout=60).status_code == 401
    infer = httpx.get(f"{keyed_server.url}/infer", params={"sentence": "Hi", "max_tokens": 2},
                      headers={"Authorization": "Bearer k1"}, timeout=120)
    assert infer.status_code == 200 and len(infer.json()) == 1
