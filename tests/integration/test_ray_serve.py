"""Scale-out on Ray Serve: replicas, autoscaling, a killed replica (issue 7).

A local Ray cluster started here (loopback only, 2 logical CPUs, no dashboard, its own temp
dir); `levante deploy --address ... --detach` runs SmolLM2 on it (2..3 replicas of half a CPU
and one thread each, a 128 MiB KV pool each) and the tests talk to the Serve proxy with the
openai client. The whole module takes ~4-6 minutes on a busy 2-core machine: every test here
is slow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import ray
import yaml
from ray import serve
from ray._private import ray_constants
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from levante.cli import app as cli_app
from levante.scale.deploy import on_loopback

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

T = TypeVar("T")
APP = "levante"
MODEL_DEPLOYMENT = "model-smollm2"
# Fast autoscaling for the test: decisions on 2 s of metrics pushed every 0.5 s.
AUTOSCALING = {"look_back_period_s": 2, "metrics_interval_s": 0.5}
DEPLOY_ARGS = [
    "smollm2", "--min-replicas", "2", "--max-replicas", "3", "--target-ongoing-requests", "2",
    "--upscale-delay", "1", "--downscale-delay", "4", "--autoscaling-config", json.dumps(AUTOSCALING),
    "--replica-cpus", "0.5", "--threads", "1", "--kv-cache-memory", "128MiB", "--max-model-len", "2048",
]
MESSAGES = [{"role": "user", "content": "Name three rivers in Spain."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def replica_states(deployment: str = MODEL_DEPLOYMENT) -> dict[str, int]:
    status = serve.status().applications[APP].deployments[deployment]
    return {str(getattr(k, "value", k)): n for k, n in status.replica_states.items() if n}


def replica_actors(deployment: str = MODEL_DEPLOYMENT) -> dict[str, str]:
    """Replica id -> actor name of the live replicas of a deployment."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {a["name"].rsplit("#", 1)[1]: a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


@dataclass
class Deployment:
    url: str
    metrics_url: str
    logs: Path
    deploy_output: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=180)

    def serve_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("replica_*.log")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A one-machine Ray cluster on 127.0.0.1, shut down at the end of the module."""
    saved = dict(os.environ)
    temp = tempfile.mkdtemp(prefix="lvray", dir="/tmp")  # short: Ray's socket paths live under it
    cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    on_loopback()  # Ray's ports on 127.0.0.1
    os.environ["LEVANTE_HOME"] = str(tmp_path_factory.mktemp("home"))  # no API keys from the user's home
    metrics_port = free_port()
    context = ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=temp, _metrics_export_port=metrics_port,
        configure_logging=False, log_to_driver=False,
    )
    assert context.address_info["node_ip_address"] == "127.0.0.1"
    try:
        yield {**context.address_info, "metrics_port": metrics_port}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(cluster: dict[str, Any]) -> Deployment:
    """`levante deploy` onto the cluster (a second driver process), detached: the app stays."""
    port = free_port()
    cmd = [sys.executable, "-m", "levante.cli", "deploy", *DEPLOY_ARGS, "--address", cluster["gcs_address"], "--port", str(port), "--detach"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"served at http://127.0.0.1:{port}/v1" in done.stdout
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, 60, "/health 200")
    return Deployment(url, f"http://127.0.0.1:{cluster['metrics_port']}/metrics", Path(cluster["session_dir"]) / "logs" / "serve", done.stdout)


def test_deploy_config_is_a_serve_config(tmp_path: Path) -> None:
    """`levante deploy --config` writes what `serve deploy` and a RayService take; its builder builds the app."""
    out = tmp_path / "levante-serve.yaml"
    result = CliRunner().invoke(cli_app, ["deploy", *DEPLOY_ARGS, "--api-key", "sk-test-8e1f", "--config", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "sk-test-8e1f" not in text  # keys go in LEVANTE_API_KEY on the cluster, not in a config file
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (application,) = config["applications"]
    assert application["import_path"] == "levante.scale.ray_serve:build_app"
    args = application["args"]
    assert args["models"] == ["smollm2"] and args["min_replicas"] == 2 and args["max_replicas"] == 3
    assert args["kv_cache_memory"] == 128 << 20 and args["autoscaling_config"] == AUTOSCALING

    from levante.scale.options import DeployOptions

    opts = DeployOptions.from_args(args)
    autoscaling = opts.model_deployment_options()["autoscaling_config"]
    assert autoscaling == {"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 2.0,
                           "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, **AUTOSCALING}
    module, attr = application["import_path"].split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert isinstance(builder(args), serve.Application)

    with pytest.raises(ValueError, match="unknown levante deploy options"):
        DeployOptions.from_args({**args, "replicas": 2})
    bad = CliRunner().invoke(cli_app, ["deploy", "smollm2", "--detach"])
    assert bad.exit_code == 1 and "--address" in bad.output


def _chat(client: openai.OpenAI, stream: bool, max_tokens: int = 24) -> tuple[str, str, str]:
    """(replica header, text, response id) of one chat completion."""
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=stream,  # type: ignore[call-overload]
    )
    replica = raw.headers.get("x-levante-replica", "")
    if stream:
        chunks = list(raw.parse())
        return replica, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[0].id
    completion = raw.parse()
    return replica, completion.choices[0].message.content or "", completion.id


def test_two_replicas_serve_concurrent_requests(deployment: Deployment) -> None:
    assert replica_states() == {"RUNNING": 2}
    live = set(replica_actors())
    client = deployment.client()
    with ThreadPoolExecutor(4) as pool:  # 4 at once: 2 per replica, the autoscaler's target (no third replica)
        results = list(pool.map(lambda i: (i % 2 == 0, *_chat(client, stream=i % 2 == 0)), range(16)))
    assert all(text for _, _, text, _ in results)
    assert {r for _, r, _, _ in results} == live  # both replicas served, each response names its replica
    assert {r for streamed, r, _, _ in results if streamed} == live  # streams included

    # The ingress logs which replica served each request (Serve's replica logs, under the request id).
    _, replica, _, response_id = results[0]
    wait_for(lambda: re.search(rf"request {re.escape(response_id)}: model smollm2, replica {replica}", deployment.serve_logs()),
             30, "the ingress log line of a request")

    # Every API family streams through the proxy and names its replica.
    with httpx.stream("POST", f"{deployment.url}/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-levante-replica"] in live
        assert any(line.startswith("data:") for line in r.iter_lines())
    with httpx.stream("POST", f"{deployment.url}/api/chat", json={"model": "smollm2", "messages": MESSAGES, "options": {"num_predict": 4}}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-levante-replica"] in live
        assert json.loads(list(r.iter_lines())[-1])["done"] is True
    # JSON mode: the replica builds the processor from its own vocabulary tables.
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "A JSON object naming a city."}],
                                           max_tokens=24, temperature=0, response_format={"type": "json_object"})
    assert (reply.choices[0].message.content or "").lstrip().startswith("{")
    # A stream the replica refuses keeps its status (here 400: the prompt exceeds the context).
    r = httpx.post(f"{deployment.url}/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "word " * 3000}], "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_health_and_metrics(deployment: Deployment) -> None:
    health = httpx.get(f"{deployment.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["models"] == ["smollm2"]
    info = httpx.get(f"{deployment.url}/info", timeout=10).json()
    assert info["max_total_tokens"] == 2048  # the replicas' limits, reported to the ingress

    def ours() -> str | None:
        text = httpx.get(f"{deployment.url}/metrics", timeout=10).text
        return text if re.search(r'levante:kv_cache_usage_perc\{model_name="smollm2"\}', text) else None

    text = wait_for(ours, 20, "levante metrics")
    assert re.search(r'levante:time_to_first_token_seconds_count\{model_name="smollm2"\} [1-9]', text)
    # Ray's own metrics, Serve's included, on the node's metrics port beside ours.
    wait_for(lambda: "ray_serve_" in httpx.get(deployment.metrics_url, timeout=10).text, 60, "Ray Serve metrics")


def test_autoscaling_up_under_load_and_down_when_idle(deployment: Deployment) -> None:
    wait_for(lambda: replica_states() == {"RUNNING": 2}, 60, "2 replicas at rest")
    client = deployment.client()
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        while not stop.is_set():
            try:
                _chat(client, stream=True, max_tokens=48)
            except Exception as e:
                errors.append(e)

    workers = [threading.Thread(target=load) for _ in range(8)]  # 4 per replica, twice the target
    for w in workers:
        w.start()
    try:
        started = time.monotonic()
        wait_for(lambda: replica_states().get("RUNNING", 0) >= 3, 180, "a third replica under load", interval=1)
        print(f"scaled up to 3 replicas in {time.monotonic() - started:.0f}s")
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert not errors, errors[:3]
    started = time.monotonic()
    wait_for(lambda: replica_states() == {"RUNNING": 2}, 120, "back to 2 replicas when idle", interval=1)
    print(f"scaled down to 2 replicas in {time.monotonic() - started:.0f}s after the load stopped")


def test_replica_killed_under_load(deployment: Deployment) -> None:
    wait_for(lambda: replica_states() == {"RUNNING": 2} and len(replica_actors()) == 2, 120, "2 replicas at rest")
    victim_id, victim = sorted(replica_actors().items())[0]
    client = deployment.client()

    def one(i: int) -> tuple[float, str, str]:
        start = time.monotonic()
        try:
            replica, text, _ = _chat(client, stream=i % 2 == 0, max_tokens=64)
            return start, ("ok" if text else "empty"), replica
        except openai.APIStatusError as e:  # non-streaming: the HTTP status and OpenAI error body
            return start, "error", f"{e.status_code} {e.code}: {e.message}"
        except openai.APIError as e:  # streaming: an error event after the 200
            return start, "error", f"stream {e.code}: {e.message}"

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        time.sleep(2.0)  # requests in flight on both replicas
        killed = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        outcomes = [f.result(timeout=240) for f in futures]
    print("outcomes:", [(round(start - killed, 1), kind, detail) for start, kind, detail in outcomes])
    failed = [detail for _, kind, detail in outcomes if kind != "ok"]
    # Only requests in flight on the dead replica may fail, each with a clear "replica failed" error ...
    assert len(failed) <= 4, outcomes
    assert all(d.startswith(("503 replica_failed", "stream replica_failed")) for d in failed), failed
    # ... those sent after the kill are served (by the survivor, or sent again if routed to the dead one).
    assert all(kind == "ok" for start, kind, _ in outcomes if start > killed), outcomes

    # Serve replaces the replica; new requests succeed on both again.
    wait_for(lambda: victim_id not in replica_actors() and replica_states() == {"RUNNING": 2} and len(replica_actors()) == 2,
             180, "a replacement replica", interval=1)
    assert httpx.get(f"{deployment.url}/health", timeout=10).status_code == 200
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda i: _chat(client, stream=i % 2 == 0), range(8)))
    assert all(text for _, text, _ in after)
    assert {r for r, _, _ in after} <= set(replica_actors())
