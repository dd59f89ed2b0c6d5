"""Operating the server: bad input, API keys, metrics, disconnects, shutdown, request ids, configuration.

Raw httpx against real `levante serve` processes on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from levante.loaders.loader import packaged_model_path

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

SMALL = ["--kv-cache-memory", "256MiB"]
CHAT = "/v1/chat/completions"


def hello(max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens, "temperature": 0, **extra}


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEVANTE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "levante.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Launched:
    """A `levante serve` started with exactly the given arguments (no --port added), for configuration tests."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def launch(args: list[str], port: int, tmp: Path, env: dict[str, str], timeout: float = 300) -> Launched:
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, "LEVANTE_HOME": str(tmp / "home"), **env}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "levante.cli", "serve", *args], stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = Launched(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"server did not become healthy in {timeout}s:\n{server.log_text()}")


def scrape(url: str) -> dict[str, float]:
    """Prometheus samples by name and labels (model_name left out): {'levante:x_total{reason="stop"}': 3.0}."""
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            values[s.name + (f"{{{labels}}}" if labels else "")] += s.value
    return values


def wait_idle(url: str, idle_kv: float | None = None, timeout: float = 10) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits (and the KV pool is back to `idle_kv`); return the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        idle = m["levante:num_requests_running"] == 0 and m["levante:num_requests_waiting"] == 0
        if idle and (idle_kv is None or m["levante:kv_cache_usage_perc"] == pytest.approx(idle_kv, abs=1e-9)):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout}s: {dict(m)}")
        time.sleep(0.2)


def assert_openai_error(r: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return dict(error)


def log_line(log: str, request_id: str) -> str:
    lines = [line for line in log.splitlines() if f" {request_id} " in line]
    assert lines, f"request {request_id} is not in the server log"
    return lines[-1]


# ---- bad input -------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
MSG = [{"role": "user", "content": "hi"}]

BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, tuple[str, ...]]] = [
    ("malformed JSON", "POST", CHAT, {"content": b'{"messages": [', "headers": JSON}, 400, ("not valid JSON",)),
    ("messages not a list", "POST", CHAT, {"json": {"messages": "hi"}}, 400, ("messages",)),
    ("temperature not a number", "POST", CHAT, {"json": {"messages": MSG, "temperature": "hot"}}, 400, ("temperature",)),
    ("body not an object", "POST", CHAT, {"json": [1, 2]}, 400, ("JSON object",)),
    ("missing messages", "POST", CHAT, {"json": {"model": "smollm2"}}, 400, ("messages",)),
    ("empty messages", "POST", CHAT, {"json": {"messages": []}}, 400, ("messages",)),
    ("negative max_tokens", "POST", CHAT, {"json": {"messages": MSG, "max_tokens": -1}}, 400, ("max_tokens",)),
    ("zero max_tokens", "POST", CHAT, {"json": {"messages": MSG, "max_tokens": 0}}, 400, ("max_tokens",)),
    ("max_tokens past the window", "POST", CHAT, {"json": {"messages": MSG, "max_tokens": 100000}}, 400,
     ("context window is 4096 tokens", "100000")),
    ("absurd max_tokens", "POST", CHAT, {"json": {"messages": MSG, "max_tokens": 10**12}}, 400, ("max_tokens",)),
    ("unknown model", "POST", CHAT, {"json": {"model": "gpt-4o", "messages": MSG}}, 404, ("gpt-4o", "smollm2")),
    ("wrong content type", "POST", CHAT, {"content": json.dumps({"messages": MSG}).encode(), "headers": {"content-type": "text/plain"}}, 415,
     ("application/json",)),
    ("unknown route", "GET", "/v1/nothing", {}, 404, ()),
    ("wrong method", "GET", CHAT, {}, 405, ()),
    ("logit_bias key not an integer", "POST", CHAT, {"json": {"messages": MSG, "logit_bias": {"abc": 1}}}, 400, ("logit_bias",)),
    ("logit_bias outside the vocabulary", "POST", CHAT, {"json": {"messages": MSG, "logit_bias": {"99999999": 1}}}, 400, ("vocabulary",)),
    ("n=0", "POST", CHAT, {"json": {"messages": MSG, "n": 0}}, 400, ("n",)),
    ("17 stop strings", "POST", CHAT, {"json": {"messages": MSG, "stop": [f"s{i}" for i in range(17)]}}, 400, ("16 stop strings",)),
    ("unknown role", "POST", CHAT, {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, 400, ("role",)),
    ("top_logprobs without logprobs", "POST", CHAT, {"json": {"messages": MSG, "top_logprobs": 2}}, 400, ("logprobs",)),
    ("empty prompt", "POST", "/v1/completions", {"json": {"prompt": ""}}, 400, ("empty",)),
    ("token id outside the vocabulary", "POST", "/v1/completions", {"json": {"prompt": [1, 10**9]}}, 400, ("49152",)),
    ("embedding input empty", "POST", "/v1/embeddings", {"json": {"input": []}}, 400, ("input",)),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "fragments"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS])
def test_bad_input_gets_its_status_and_an_openai_error(
    smollm2_server: Server, method: str, path: str, kwargs: dict[str, Any], status: int, fragments: tuple[str, ...]
) -> None:
    r = httpx.request(method, smollm2_server.url + path, timeout=60, **kwargs)
    error = assert_openai_error(r, status, *fragments)
    if status == 404 and path == CHAT:
        assert error["code"] == "model_not_found" and error["param"] == "model"
    if "context window" in error["message"]:
        assert error["code"] == "context_length_exceeded"
    # and the server keeps serving
    ok = httpx.post(smollm2_server.url + CHAT, json=hello(1), timeout=120)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_body_over_8_mib_is_refused(smollm2_server: Server) -> None:
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (9 << 20)}]}).encode()
    r = httpx.post(smollm2_server.url + CHAT, content=huge, headers=JSON, timeout=60)
    assert_openai_error(r, 413, str(8 << 20))
    assert httpx.post(smollm2_server.url + CHAT, json=hello(1), timeout=120).status_code == 200


# ---- a server configured by a file: public bind, small body limit and context window --------


@pytest.fixture(scope="module")
def config_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    tmp = tmp_path_factory.mktemp("config-server")
    port = free_port()
    config = tmp / "levante.toml"
    config.write_text(
        f'[server]\nhost = "0.0.0.0"\nport = {port}\nmax_body_bytes = 65536\n\n'
        f"[engine]\nmax_model_len = 256\nkv_cache_memory = {128 << 20}\n"
    )
    server = launch(["--config", str(config), "--log-level", "info"], port, tmp, {})
    yield server
    server.stop()


def test_config_file_sets_host_port_and_limits(config_server: Launched) -> None:
    models = httpx.get(f"{config_server.url}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("smollm2", 256)]
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    assert_openai_error(httpx.post(config_server.url + CHAT, content=body, headers=JSON, timeout=60), 413, "65536")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold for a streamed body too
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}]}'

    assert_openai_error(httpx.post(config_server.url + CHAT, content=chunks(), headers=JSON, timeout=60), 413, "65536")
    assert httpx.post(config_server.url + CHAT, json=hello(2), timeout=120).status_code == 200


def test_prompt_longer_than_the_context_window(config_server: Launched) -> None:
    long = " ".join(["elephant"] * 300)
    r = httpx.post(config_server.url + CHAT, json={"messages": [{"role": "user", "content": long}]}, timeout=60)
    error = assert_openai_error(r, 400, "context window is 256 tokens", "the prompt has")
    assert error["code"] == "context_length_exceeded"
    prompt_tokens = int(error["message"].split("the prompt has ")[1].split()[0])
    assert prompt_tokens > 256
    r = httpx.post(config_server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 256}, timeout=60)
    assert_openai_error(r, 400, "context window is 256 tokens", "256 more")
    assert httpx.post(config_server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=120).status_code == 200


def test_public_bind_without_keys_warns(config_server: Launched) -> None:
    log = config_server.log_text()
    assert "listening on 0.0.0.0 without API keys" in log
    assert httpx.get(f"{config_server.url}/health", timeout=10).status_code == 200  # still serves on loopback


def test_unknown_config_key_fails_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nhots = "0.0.0.0"\n')
    out = cli("serve", "--config", str(bad), home=tmp_path)
    assert out.returncode != 0
    assert "unknown options ['hots']" in out.stderr and "Traceback" not in out.stderr + out.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1\n")
    out = cli("serve", "--config", str(broken), home=tmp_path)
    assert out.returncode != 0 and "cannot read config" in out.stderr and "Traceback" not in out.stderr + out.stdout


# ---- environment variables and API keys ------------------------------------------------------

FLAG_KEY = "flag-key-" + uuid.uuid4().hex


@dataclass
class Keyed:
    server: Launched
    home: Path
    key: str
    key_id: str


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    """`levante serve` configured TGI-style by MODEL_ID and PORT (no model argument, no --port), with a key
    created by `levante keys create` before start and one given by --api-key."""
    tmp = tmp_path_factory.mktemp("keyed-server")
    home = tmp / "home"
    created = cli("keys", "create", "--name", "ci", home=home)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = key.split("-")[1]
    assert key.startswith("lv-") and key_id in created.stderr
    gguf = packaged_model_path("smollm2")
    assert gguf is not None
    port = free_port()
    env = {"MODEL_ID": str(gguf), "PORT": str(port), "LEVANTE_HOME": str(home)}
    server = launch([*SMALL, "--api-key", FLAG_KEY, "--log-level", "info"], port, tmp, env)
    yield Keyed(server, home, key, key_id)
    server.stop()


def test_model_id_and_port_from_the_environment(keyed: Keyed) -> None:
    models = httpx.get(f"{keyed.server.url}/v1/models", headers={"Authorization": f"Bearer {keyed.key}"}, timeout=30)
    assert models.status_code == 200
    gguf = packaged_model_path("smollm2")
    assert gguf is not None
    assert [m["id"] for m in models.json()["data"]] == [gguf.stem]  # served under the file's name: MODEL_ID was used


def test_api_keys_are_required_and_accepted_in_every_header(keyed: Keyed) -> None:
    url = keyed.server.url
    missing = httpx.get(f"{url}/v1/models", timeout=30)
    assert_openai_error(missing, 401, "API key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_openai_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer lv-nope-nope"}, timeout=30), 401, "invalid")
    assert_openai_error(httpx.post(f"{url}{CHAT}", json=hello(1), headers={"Authorization": "Bearer wrong"}, timeout=30), 401)
    assert_openai_error(httpx.get(f"{url}/metrics", timeout=30), 401)
    for headers in ({"Authorization": f"Bearer {keyed.key}"}, {"Api-Key": keyed.key}, {"X-Api-Key": keyed.key},
                    {"Authorization": f"Bearer {FLAG_KEY}"}):
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=30).status_code == 200, headers
    r = httpx.post(f"{url}{CHAT}", json={**hello(2), "model": None}, headers={"Api-Key": keyed.key}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200


def test_key_file_holds_digests_only_and_list_hides_secrets(keyed: Keyed) -> None:
    text = (keyed.home / "keys.json").read_text()
    secret = keyed.key.split("-", 2)[2]
    assert keyed.key not in text and secret not in text
    assert hashlib.sha256(keyed.key.encode()).hexdigest() in text
    assert (keyed.home / "keys.json").stat().st_mode & 0o077 == 0  # owner-only
    listed = cli("keys", "list", home=keyed.home)
    assert listed.returncode == 0 and keyed.key_id in listed.stdout and "ci" in listed.stdout
    assert secret not in listed.stdout and keyed.key not in listed.stdout


def test_keys_created_and_revoked_while_running(keyed: Keyed) -> None:
    url = keyed.server.url
    created = cli("keys", "create", "--name", "temp", home=keyed.home)
    assert created.returncode == 0
    temp = created.stdout.strip()
    temp_id = temp.split("-")[1]
    assert httpx.get(f"{url}/v1/models", headers={"X-Api-Key": temp}, timeout=30).status_code == 200
    revoked = cli("keys", "revoke", temp_id, home=keyed.home)
    assert revoked.returncode == 0 and temp_id in revoked.stdout
    assert_openai_error(httpx.get(f"{url}/v1/models", headers={"X-Api-Key": temp}, timeout=30), 401, "invalid")
    assert temp_id not in cli("keys", "list", home=keyed.home).stdout
    # the other keys still work
    assert httpx.get(f"{url}/v1/models", headers={"Api-Key": keyed.key}, timeout=30).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Api-Key": FLAG_KEY}, timeout=30).status_code == 200
    again = cli("keys", "revoke", temp_id, home=keyed.home)
    assert again.returncode != 0 and "no key" in again.stderr and "Traceback" not in again.stderr


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_count_requests_and_tokens(smollm2_server: Server) -> None:
    url = smollm2_server.url
    before = scrape(url)
    usages = []
    for max_tokens in (3, 5):
        r = httpx.post(url + CHAT, json=hello(max_tokens, ignore_eos=True), timeout=120)
        usages.append(r.json()["usage"])
    with httpx.stream("POST", url + CHAT, json=hello(4, ignore_eos=True, stream=True, stream_options={"include_usage": True}),
                      timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usages.append(json.loads(events[-2])["usage"])
    after = scrape(url)

    def delta(name: str) -> float:
        return after[name] - before[name]

    assert [u["completion_tokens"] for u in usages] == [3, 5, 4]
    assert delta("levante:time_to_first_token_seconds_count") == 3
    assert delta("levante:e2e_request_latency_seconds_count") == 3
    assert delta("levante:inter_token_latency_seconds_count") == (3 - 1) + (5 - 1) + (4 - 1)
    assert delta("levante:e2e_request_latency_seconds_sum") > 0 and delta("levante:time_to_first_token_seconds_sum") > 0
    assert delta("levante:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("levante:generation_tokens_total") == 12
    assert delta('levante:request_success_total{finished_reason="length"}') == 3
    assert delta('levante:http_requests_total{route="openai",status="200"}') == 3
    assert after["levante:num_requests_running"] == 0 and after["levante:num_requests_waiting"] == 0
    assert 0 <= after["levante:kv_cache_usage_perc"] <= 1
    assert after['levante:time_to_first_token_seconds_bucket{le="+Inf"}'] == after["levante:time_to_first_token_seconds_count"]


# ---- client disconnects ----------------------------------------------------------------------


def test_client_disconnect_aborts_the_request(smollm2_server: Server) -> None:
    url = smollm2_server.url
    idle_kv = wait_idle(url)["levante:kv_cache_usage_perc"]  # what this server holds with nothing running
    long = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000, "ignore_eos": True}
    before = scrape(url)
    log_start = len(smollm2_server.log_text())

    stream_id = f"disconnect-stream-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=120) as client, client.stream(
        "POST", url + CHAT, json={**long, "stream": True}, headers={"X-Request-Id": stream_id}
    ) as r:
        assert r.status_code == 200
        seen = 0
        lines = r.iter_lines()  # held: a dropped line iterator closes the response (httpx), which is a disconnect
        for line in lines:
            seen += line.startswith("data: ")
            if seen == 3:  # the role chunk and two tokens
                break
        assert scrape(url)["levante:num_requests_running"] == 1
    # the connection is closed here
    wait_idle(url, idle_kv)

    plain_id = f"disconnect-plain-{uuid.uuid4().hex[:8]}"
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + CHAT, json=long, headers={"X-Request-Id": plain_id}, timeout=3)
    after = wait_idle(url, idle_kv)

    assert after["levante:generation_tokens_total"] - before["levante:generation_tokens_total"] < 1000  # neither ran to the end
    assert after['levante:request_success_total{finished_reason="abort"}'] - before['levante:request_success_total{finished_reason="abort"}'] == 2
    log = smollm2_server.log_text()[log_start:]
    assert f"{stream_id} POST {CHAT} 200" in log_line(log, stream_id)
    assert f"{plain_id} POST {CHAT} 499" in log_line(log, plain_id)
    assert "Traceback" not in log
    assert httpx.post(url + CHAT, json=hello(1), timeout=120).status_code == 200


def test_a_refused_prompt_in_a_list_leaves_nothing_running(smollm2_server: Server) -> None:
    """/v1/completions with several prompts fails as a whole when one is refused: the prompts queued before it
    are aborted at once (not left generating for nobody)."""
    url = smollm2_server.url
    idle_kv = wait_idle(url)["levante:kv_cache_usage_perc"]
    body = {"model": "smollm2", "prompt": ["Write a very long story.", "word " * 5000], "max_tokens": 2000, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert_openai_error(r, 400, "context window")
    wait_idle(url, idle_kv, timeout=3)  # the first prompt, 2000 tokens long, would still run for a minute


# ---- request ids and logging -----------------------------------------------------------------


def test_request_ids_are_echoed_and_logged_without_prompts(smollm2_server: Server) -> None:
    url = smollm2_server.url
    marker = f"PINEAPPLE-{uuid.uuid4().hex}"
    given = f"rid-{uuid.uuid4().hex[:12]}"
    body = {"messages": [{"role": "user", "content": f"Repeat {marker}"}], "max_tokens": 2}
    r = httpx.post(url + CHAT, json=body, headers={"X-Request-Id": given}, timeout=120)
    assert r.status_code == 200 and r.headers["x-request-id"] == given
    assert r.json()["id"] == f"chatcmpl-{given}"
    plain = httpx.post(url + CHAT, json=body, timeout=120)
    generated = plain.headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0 and generated != given
    assert plain.json()["id"] == f"chatcmpl-{generated}"  # the id in the log line is the response's
    too_long = httpx.post(url + CHAT, json=body, headers={"X-Request-Id": "x" * 200}, timeout=120)
    replaced = too_long.headers["x-request-id"]
    assert len(replaced) == 32 and too_long.json()["id"] == f"chatcmpl-{replaced}"
    missing = httpx.get(f"{url}/v1/models/nope", headers={"X-Request-Id": given + "-404"}, timeout=30)
    assert missing.status_code == 404 and missing.headers["x-request-id"] == given + "-404"
    time.sleep(0.2)
    log = smollm2_server.log_text()
    line = log_line(log, given)
    assert f"{given} POST {CHAT} 200" in line and line.rstrip().endswith("ms")
    assert f"{generated} POST {CHAT} 200" in log_line(log, generated)
    assert f"{given}-404 GET /v1/models/nope 404" in log_line(log, given + "-404")
    assert marker not in log


# ---- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_finishes_open_streams_then_exits(server_factory: Callable[..., Server]) -> None:
    server = server_factory(["smollm2", *SMALL, "--max-model-len", "1024"])
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    data: list[str] = []
    refused = False
    with httpx.Client(timeout=120) as client, client.stream("POST", server.url + CHAT, json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                data.append(line[6:])
            if len(data) == 2:
                break
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not refused:
            try:
                httpx.get(f"{server.url}/health", timeout=2)
                time.sleep(0.1)
            except httpx.ConnectError:
                refused = True
        data += [line[6:] for line in lines if line.startswith("data: ")]
    assert refused, "the server still accepted connections after SIGTERM"
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the signal it caught once it has shut down, so the exit status is "killed by SIGTERM"
    assert server.process.wait(60) in (0, -signal.SIGTERM)
    log = server.log_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
