"""Several registry models from one server: routing by name, load on first use, keep-alive unload, registry routes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import ollama
import pytest
from openai import OpenAI

from levante.registry.importers import import_path
from levante.registry.store import ModelRef, Store

if TYPE_CHECKING:
    from conftest import Server


@pytest.fixture(scope="module")
def registry_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Path], smollm2_gguf: Path, server_factory: Callable[..., Server]
) -> Server:
    home = tmp_path_factory.mktemp("multi") / "home"
    store = Store(home)
    import_path(store, smollm2_gguf, ModelRef.parse("smol:a"))
    import_path(store, tiny_model("llama"), ModelRef.parse("tiny:b"))
    args = ["smol:a", "--keep-alive", "3s", "--kv-cache-memory", "256MiB", "--max-model-len", "2048"]
    return server_factory(args, env={"LEVANTE_HOME": str(home)})


def loaded(server: Server) -> list[str]:
    return sorted(m["name"] for m in httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"])


def test_two_models_answer_under_their_own_names_and_idle_one_unloads(registry_server: Server) -> None:
    url = registry_server.url
    client = OpenAI(base_url=f"{url}/v1", api_key="x")
    listed = {m.id for m in client.models.list().data}
    assert {"smol:a", "tiny:b"} <= listed
    assert loaded(registry_server) == ["smol:a"]  # only the default is loaded at start

    smol = client.completions.create(model="smol:a", prompt="The sea is", max_tokens=4, temperature=0)
    tiny = client.completions.create(model="tiny:b", prompt="The sea is", max_tokens=4, temperature=0)
    assert smol.model == "smol:a" and tiny.model == "tiny:b"
    assert smol.choices[0].text != tiny.choices[0].text  # different weights, different answers
    assert loaded(registry_server) == ["smol:a", "tiny:b"]
    ps = {m["name"]: m for m in httpx.get(f"{url}/api/ps").json()["models"]}
    assert ps["smol:a"]["expires_at"].startswith("9999") and not ps["tiny:b"]["expires_at"].startswith("9999")

    deadline = time.monotonic() + 30
    while "tiny:b" in loaded(registry_server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert loaded(registry_server) == ["smol:a"]  # idle past its 3 s keep-alive
    again = client.completions.create(model="tiny:b", prompt="The sea is", max_tokens=4, temperature=0)
    assert again.choices[0].text == tiny.choices[0].text  # reloaded on demand, same greedy answer
    assert "tiny:b" in loaded(registry_server)
    with pytest.raises(Exception, match="not served"):
        client.completions.create(model="nope:1", prompt="x", max_tokens=2)


def test_ollama_registry_routes(registry_server: Server) -> None:
    client = ollama.Client(host=registry_server.url)
    names = {m.model for m in client.list().models}
    assert {"smol:a", "tiny:b"} <= names
    client.copy("smol:a", "smol:copy")
    assert "smol:copy" in {m.model for m in client.list().models}
    reply = client.chat(model="smol:copy", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3, "temperature": 0},
                        keep_alive=0)
    assert reply.message.content
    deadline = time.monotonic() + 15
    while "smol:copy" in loaded(registry_server) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "smol:copy" not in loaded(registry_server)  # keep_alive 0: unloaded once the request finished
    client.delete("smol:copy")
    assert "smol:copy" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("smol:copy")
    assert err.value.status_code == 404
    events = list(client.pull("smollm2", stream=True))
    assert events[-1].status == "success" and any(e.completed for e in events if e.total)
    assert "smollm2:latest" in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError):
        client.pull("mistral:7b-instruct-v0.3-nope")


def test_levante_ps_lists_loaded_models(registry_server: Server) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "levante.cli", "ps", "--url", registry_server.url], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "smol:a" in out.stdout and "forever" in out.stdout
    gone = subprocess.run([sys.executable, "-m", "levante.cli", "ps", "--url", "http://127.0.0.1:9"], capture_output=True, text=True,
                          timeout=120)
    assert gone.returncode == 1 and "cannot ask" in gone.stderr


def test_server_log_names_loads(registry_server: Server) -> None:
    log = registry_server.log_text()
    assert "loaded" in log and "tiny:b" in log
    assert json.dumps("The sea is") not in log
