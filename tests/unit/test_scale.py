"""The Ray-free parts of scale-out: deploy options and their Serve config, replica stats, the replica header."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from starlette.middleware import Middleware

from levante.engine.llm_engine import EngineStats, PromptTooLongError
from levante.scale.options import DeployOptions, deployment_name
from levante.scale.remote import ReplicaReport, aggregate
from levante.scale.replicas import REPLICA_HEADER, ReplicaHeaderMiddleware, track_call
from levante.server import errors


def test_args_round_trip_and_defaults() -> None:
    opts = DeployOptions(models=["smollm2"], min_replicas=1, max_replicas=4, kv_cache_memory=128 << 20, api_keys=["k"])
    args = opts.to_args()
    assert args == {"models": ["smollm2"], "kv_cache_memory": 128 << 20, "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert "api_keys" in opts.to_args(include_secrets=True)
    again = DeployOptions.from_args({**args, "kv_cache_memory": "128MiB", "models": "smollm2"})
    assert again.to_args() == args
    with pytest.raises(ValueError, match="unknown"):
        DeployOptions.from_args({"models": ["smollm2"], "keep_alive": 5})  # `serve` options that mean nothing here


@pytest.mark.parametrize("bad", [{"min_replicas": 3, "max_replicas": 2}, {"max_replicas": 0}, {"target_ongoing_requests": 0},
                                 {"initial_replicas": 9, "max_replicas": 4}, {"route_prefix": "v1"}, {"models": []}])
def test_invalid_options(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DeployOptions(**{"models": ["smollm2"], **bad})  # type: ignore[arg-type]


def test_deployment_options() -> None:
    fixed = DeployOptions(models=["smollm2"], min_replicas=2, max_replicas=2).model_deployment_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 64 and fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    scaled = DeployOptions(models=["smollm2"], max_replicas=4, autoscaling_config={"look_back_period_s": 5}, device="cuda")
    options = scaled.model_deployment_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0,
                                             "upscale_delay_s": 30.0, "downscale_delay_s": 600.0, "look_back_period_s": 5}
    assert options["ray_actor_options"]["num_gpus"] == 1.0
    cpu = DeployOptions(models=["smollm2", "other.gguf"], replica_cpus=2).replica_engine_config("other.gguf")
    assert cpu.num_threads == 2 and cpu.model == "other.gguf" and cpu.cache.memory_fraction == 0.25  # not split between models
    config = DeployOptions(models=["smollm2"]).serve_config()
    assert config["applications"][0]["import_path"] == "levante.scale.ray_serve:build_app"


def test_names() -> None:
    assert deployment_name("mistral:7b-instruct") == "model-mistral-7b-instruct"
    assert DeployOptions(models=["smollm2"], served_model_name="chat").named_models() == [("chat", "smollm2")]
    with pytest.raises(ValueError, match="one name"):
        DeployOptions(models=["smollm2", "smollm2"]).named_models()


def test_aggregate_adds_counts_and_weighs_fractions() -> None:
    a = ReplicaReport("a", EngineStats(2, 1, 100, 50, 0.5, 0.1, 0.2, 3), 10)
    b = ReplicaReport("b", EngineStats(1, 0, 300, 300, 0.0, 0.0, 0.6, 1), 20)
    s = aggregate([a, b])
    assert (s.num_running, s.num_waiting, s.num_blocks, s.num_free_blocks, s.num_preemptions) == (3, 1, 400, 350, 4)
    assert s.kv_usage == pytest.approx(50 / 400) and s.prefix_cache_hit_rate == pytest.approx((0.2 * 100 + 0.6 * 300) / 400)
    assert aggregate([]).num_blocks == 0


def _app() -> FastAPI:
    """Routes that make 'remote calls' resolved a little later, as replicas accept or refuse them."""
    app = FastAPI(middleware=[Middleware(ReplicaHeaderMiddleware)])
    app.add_exception_handler(errors.APIError, errors.api_error_handler)

    def call(outcome: str | Exception) -> None:
        future = track_call()

        def resolve() -> None:
            future.set_exception(outcome) if isinstance(outcome, Exception) else future.set_result(outcome)

        asyncio.get_running_loop().call_later(0.05, resolve)

    async def body() -> AsyncIterator[str]:
        yield "data: first\n\n"  # sent before any replica answered: the header must still come first

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        call("r1")
        call("r2")
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/refused")
    async def refused() -> StreamingResponse:
        call(PromptTooLongError("the prompt has 9000 tokens"))
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/local")
    async def local() -> dict[str, str]:
        return {"ok": "yes"}

    return app


def test_replica_header_and_refused_streams() -> None:
    with TestClient(_app()) as client:
        r = client.get("/stream")
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "r1, r2" and r.text == "data: first\n\n"
        r = client.get("/refused")
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert REPLICA_HEADER not in client.get("/local").headers


# ---- the Ray side, without a cluster: a fake deployment handle ----------------------------------


class _FakeCall:
    """`handle.options(stream=True).remote(...)`: each call plays the next script of items/errors."""

    def __init__(self, scripts: list[list[object]]) -> None:
        self.scripts = scripts
        self.calls = 0

    def remote(self, *args: object) -> _FakeStream:
        script = self.scripts[min(self.calls, len(self.scripts) - 1)]
        self.calls += 1
        return _FakeStream(script)


class _FakeStream:
    def __init__(self, script: list[object]) -> None:
        self.items = list(script)
        self.cancelled = False

    def __aiter__(self) -> _FakeStream:
        return self

    async def __anext__(self) -> object:
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class _FakeHandle:
    deployment_name = "model-smollm2"

    def __init__(self, call: _FakeCall) -> None:
        self.call = call

    def options(self, **options: object) -> _FakeCall:
        return self.call


def _output(text: str, finished: bool) -> object:
    from levante.outputs import CompletionOutput, RequestOutput

    return RequestOutput("r", None, [1], [CompletionOutput(0, text, [5], finish_reason="stop" if finished else None)], finished)


async def _collect(scripts: list[list[object]]) -> tuple[list[str], BaseException | None, int]:
    from levante.sampling_params import SamplingParams
    from levante.scale.remote_engine import RemoteEngine

    call = _FakeCall(scripts)
    engine = RemoteEngine(_FakeHandle(call), "smollm2", "levante", min_replicas=1)  # type: ignore[arg-type]
    engine._poller = asyncio.get_running_loop().create_future()  # type: ignore[assignment]  # no status polling here
    stream = engine.submit({"prompt_token_ids": [1]}, SamplingParams(max_tokens=2), "r")
    texts: list[str] = []
    try:
        async for out in stream:
            texts.append(out.outputs[0].text)
    except Exception as e:
        return texts, e, call.calls
    return texts, None, call.calls


def test_remote_stream_retries_a_replica_that_died_before_any_output() -> None:
    from ray.exceptions import ActorDiedError

    from levante.scale.remote import Accepted

    ok = [Accepted("b"), _output("Hi", False), _output("!", True)]
    texts, error, calls = asyncio.run(_collect([[Accepted("a"), ActorDiedError()], ok]))
    assert (texts, error, calls) == (["Hi", "!"], None, 2)
    # Died mid-stream: no second try (the client has part of the answer), a clear 503.
    texts, error, calls = asyncio.run(_collect([[Accepted("a"), _output("Hi", False), ActorDiedError()], ok]))
    assert texts == ["Hi"] and calls == 1
    assert isinstance(error, errors.APIError) and error.status == 503 and error.code == "replica_failed"
    # Replicas keep dying: two more tries, then the error.
    texts, error, calls = asyncio.run(_collect([[ActorDiedError()]]))
    assert calls == 3 and isinstance(error, errors.APIError) and error.code == "replica_failed"


def test_remote_errors_keep_their_meaning() -> None:
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from levante.scale.remote import Refused
    from levante.scale.remote_engine import classify

    _, error, calls = asyncio.run(_collect([[Refused(PromptTooLongError("the prompt has 9000 tokens"))]]))
    assert isinstance(error, PromptTooLongError) and calls == 1  # a refusal is not retried
    assert errors.from_exception(error).status == 400  # type: ignore[arg-type]
    cause, failed = classify(RayTaskError("generate", "traceback", ValueError("bad")))
    assert isinstance(cause, ValueError) and not failed
    overload, failed = classify(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    assert isinstance(overload, errors.APIError) and overload.status == 503 and not failed


def test_health_follows_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from levante.scale import remote_engine

    states: dict[str, int] = {"RUNNING": 2}

    def status() -> SimpleNamespace:
        overview = SimpleNamespace(status="HEALTHY", replica_states=dict(states))
        return SimpleNamespace(applications={"levante": SimpleNamespace(deployments={"model-smollm2": overview})})

    monkeypatch.setattr(remote_engine.serve, "status", status)

    class Handle(_FakeHandle):
        def broadcast(self, method: str) -> SimpleNamespace:
            async def results_async(**kwargs: object) -> list[object]:
                return [ReplicaReport("a", EngineStats(1, 0, 10, 5, 0.5, 0.0, 0.0, 0), 100), RuntimeError("gone")]

            return SimpleNamespace(results_async=results_async)

    async def check() -> None:
        engine = remote_engine.RemoteEngine(Handle(_FakeCall([[]])), "smollm2", "levante", min_replicas=1)  # type: ignore[arg-type]
        await engine._poll_once()
        assert engine.error is None and engine.stats().num_running == 1 and engine.memory_bytes() == 100
        states.clear()
        states["STARTING"] = 1
        await engine._poll_once()
        assert isinstance(engine.error, Exception) and "no running replica" in str(engine.error)
        engine.shutdown()

    asyncio.run(check())


@pytest.mark.parametrize("manifest", ["rayservice-cpu.yaml", "rayservice-gpu.yaml"])
def test_rayservice_manifests_carry_a_valid_levante_application(manifest: str) -> None:
    """deploy/'s KubeRay manifests: their serveConfigV2 is a Serve config whose Levante application's args are
    options `levante deploy` accepts (the builder would refuse unknown ones at deploy time, on the cluster)."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((Path(__file__).parents[2] / "deploy" / manifest).read_text())
    assert doc["kind"] == "RayService"
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_config)
    apps = [a for a in schema.applications if a.import_path == "levante.scale.ray_serve:build_app"]
    assert len(apps) == 1
    opts = DeployOptions.from_args(apps[0].args)
    assert opts.models and opts.min_replicas <= opts.max_replicas
    if "gpu" in manifest:
        assert opts.device == "cuda" and opts.replica_gpus >= 1
