"""Levante as a Ray Serve application: one ingress deployment, one deployment per model.

    HTTP ──> Serve proxy ──> LevanteIngress replica: levante.server's FastAPI app, unchanged,
                               its models RemoteServedModels whose engine is a RemoteEngine
                               │ DeploymentHandle.options(stream=True).generate.remote(...)
                               ▼   (Ray routes to the replica with fewer requests in flight)
                             LevanteModel replicas: LLMEngine + AsyncLLMEngine each, yielding
                               Accepted(replica id), then the engine's RequestOutput deltas

Ray's autoscaler sizes each model deployment on ongoing requests per replica (its
`autoscaling_config`); Serve replaces a replica whose actor dies or whose `check_health` fails
(remote_engine.py: what a request on a failed replica gets).

The ingress reads each model's tokenizer and chat format from the model files on its own
node (no weights) and the limits (context window, memory) from a replica. `build_app` is the
application builder a Serve config names (options.py: its args).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.middleware import Middleware

from levante.config import EngineConfig
from levante.engine.async_engine import AsyncLLMEngine
from levante.engine.llm_engine import LLMEngine, PromptType
from levante.engine.scheduler import EngineOverloadedError
from levante.layers.linear import weight_bytes
from levante.outputs import RequestOutput
from levante.sampling_params import SamplingParams
from levante.scale.options import DeployOptions, deployment_name
from levante.scale.remote import (
    Accepted,
    JsonObjectMode,
    Refused,
    RemoteServedModel,
    ReplicaFacts,
    ReplicaReport,
    load_model_header,
)
from levante.scale.remote_engine import RemoteEngine
from levante.scale.replicas import ReplicaHeaderMiddleware

if TYPE_CHECKING:
    from levante.engine.json_mode import JsonVocabulary

logger = logging.getLogger("ray.serve")  # Serve tags these lines with the replica and request ids
T = TypeVar("T")


class LevanteModel:
    """One replica of a model deployment: the engine of one model (weights and KV pool)."""

    def __init__(self, config: EngineConfig) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncLLMEngine(LLMEngine(config))
        self._json_vocab: JsonVocabulary | None = None

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncIterator[Accepted | Refused | RequestOutput]:
        """Accepted, then the request's deltas (or Refused). A cancelled call (client gone) aborts
        the request and frees its KV blocks."""
        try:
            stream = self.engine.submit(prompt, self._local(params), request_id)
        except (ValueError, EngineOverloadedError) as e:
            yield Refused(e)
            return
        logger.info("request %s on replica %s", request_id, self.replica)
        yield Accepted(self.replica)
        async for out in stream:
            yield out

    def _local(self, params: SamplingParams) -> SamplingParams:
        """JSON mode's processor, built here from this replica's vocabulary tables."""
        if not params.logits_processors or not any(isinstance(p, JsonObjectMode) for p in params.logits_processors):
            return params
        from levante.engine.json_mode import JsonVocabulary, json_object_processor

        if self._json_vocab is None:
            self._json_vocab = JsonVocabulary(self.engine.tokenizer)
        vocab = self._json_vocab
        params.logits_processors = [json_object_processor(vocab) if isinstance(p, JsonObjectMode) else p for p in params.logits_processors]
        return params

    def facts(self) -> ReplicaFacts:
        engine = self.engine.engine
        loaded = engine.loaded
        return ReplicaFacts(
            replica=self.replica, max_model_len=engine.max_model_len, dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device), memory_bytes=self._memory_bytes(), engine_config=engine.config,
        )

    def report(self) -> ReplicaReport:
        error = self.engine.error
        return ReplicaReport(self.replica, self.engine.stats(), self._memory_bytes(), None if error is None else repr(error))

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it."""
        if self.engine.error is not None:
            raise RuntimeError(f"engine of replica {self.replica} stopped: {self.engine.error!r}")

    def _memory_bytes(self) -> int:
        engine = self.engine.engine
        weights = weight_bytes(engine.loaded.model)
        return weights + engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class LevanteIngress:
    """The HTTP API replica. Bound with the model deployments so that they deploy with it; its app
    is built by `serve.ingress`'s builder (see `_ingress_deployment`), which finds them by name."""

    def __init__(self, *models: Any) -> None:
        self.models = models


def _blocking(fn: Callable[[], T]) -> T:
    """Run a blocking Ray call from code that runs inside an event loop (the ingress builder does)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def _facts_of(handle: DeploymentHandle) -> Callable[[], ReplicaFacts]:
    def facts() -> ReplicaFacts:
        result: ReplicaFacts = handle.facts.remote().result()
        return result

    return facts


def ingress_app(opts: DeployOptions) -> FastAPI:
    """levante.server's app over the model deployments of this application."""
    from levante.rag.service import RagConfig
    from levante.server.app import create_app
    from levante.server.auth import KeyStore
    from levante.server.serving import ModelManager, ServedModel

    app_name = serve.get_replica_context().app_name
    served: list[ServedModel] = []
    for name, source in opts.named_models():
        handle = serve.get_deployment_handle(deployment_name(name), app_name=app_name)
        facts = _blocking(_facts_of(handle))  # waits for a replica to have loaded the model
        header = load_model_header(source, facts.dtype, facts.device)
        engine = RemoteEngine(handle, name, app_name, opts.min_replicas)
        served.append(RemoteServedModel(name, engine, header, facts))
        logger.info("model %s (%s): deployment %s, context %d tokens", name, source, deployment_name(name), facts.max_model_len)
    manager = ModelManager(served, keep_alive=None)  # no registry: the application serves exactly these models
    config = opts.server_config()
    env_key = os.environ.get("LEVANTE_API_KEY")
    keys = KeyStore(extra_keys=[*config.api_keys, *([env_key] if env_key else [])])
    rag = RagConfig(qdrant_url=opts.qdrant_url, qdrant_api_key=os.environ.get("QDRANT_API_KEY"))
    app = create_app(manager, config, keys, ui=opts.ui, rag=rag)
    app.user_middleware.append(Middleware(ReplicaHeaderMiddleware))  # innermost: sees the final status of each route
    return app


def _ingress_deployment(opts: DeployOptions) -> Any:
    args = opts.to_args(include_secrets=True)

    def build() -> FastAPI:  # runs on each ingress replica, after LevanteIngress.__init__
        return ingress_app(DeployOptions.from_args(args))

    return serve.deployment(serve.ingress(build)(LevanteIngress), name="LevanteIngress")


def build_app(args: dict[str, Any]) -> Any:
    """The application builder (`import_path: levante.scale.ray_serve:build_app` in a Serve config)."""
    opts = DeployOptions.from_args(args)
    model_options = opts.model_deployment_options()
    models = [
        serve.deployment(name=deployment_name(name), **model_options)(LevanteModel).bind(opts.replica_engine_config(source))
        for name, source in opts.named_models()
    ]
    return _ingress_deployment(opts).options(**opts.ingress_deployment_options()).bind(*models)
