"""The served models and the bridge from HTTP handlers to the engine: metrics, disconnects, accumulation."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fastapi import Request

from levante.config import EngineConfig
from levante.engine.async_engine import AsyncLLMEngine
from levante.engine.llm_engine import EngineStats, LLMEngine, PromptType
from levante.layers.linear import weight_bytes
from levante.loaders.chat_template import ChatFormat, ChatTemplateError, Message
from levante.loaders.loader import LoadedModel, packaged_model_path
from levante.outputs import OutputAccumulator, RequestOutput
from levante.rag.embeddings import Embedder
from levante.registry.store import Manifest, ModelRef, RegistryError, Store
from levante.sampling_params import SamplingParams
from levante.server.errors import APIError, bad_request, from_exception, not_found
from levante.server.metrics import Metrics


class OutputStream(Protocol):
    """One submitted request's deltas, in order; leaving the iteration early (or `abort`) aborts it."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def abort(self) -> None: ...


class EngineClient(Protocol):
    """What the server asks of an engine: `AsyncLLMEngine` in this process, or a proxy to engines
    elsewhere (levante.scale: replicas of a Ray Serve deployment). `submit` raises at once for
    input or capacity errors it can see; later ones surface while iterating."""

    def submit(self, prompt: PromptType, params: SamplingParams, request_id: str) -> OutputStream: ...

    @property
    def error(self) -> BaseException | None: ...

    @property
    def num_requests(self) -> int: ...

    def stats(self) -> EngineStats: ...

    async def drain(self, timeout: float) -> None: ...

    def shutdown(self) -> None: ...


@dataclass(eq=False)
class ServedModel:
    """A model this server serves. Here its engine runs in this process; a model whose engines run
    elsewhere (levante.scale.remote.RemoteServedModel) overrides the properties that read the
    local engine: loaded, max_model_len, engine_config, memory_bytes."""

    name: str
    engine: EngineClient
    created: float = field(default_factory=time.time)
    keep_alive: float | None = None  # idle seconds before unloading; None: stay loaded
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # requests started and not yet finished

    @property
    def local_engine(self) -> LLMEngine:
        if not isinstance(self.engine, AsyncLLMEngine):
            raise TypeError(f"model {self.name!r} is served by engines elsewhere, not by one in this process")
        return self.engine.engine

    @property
    def loaded(self) -> LoadedModel:
        return self.local_engine.loaded

    @property
    def max_model_len(self) -> int:
        return self.local_engine.max_model_len

    @property
    def engine_config(self) -> EngineConfig:
        return self.local_engine.config

    @property
    def memory_bytes(self) -> int:
        """Weights plus the KV pool (its whole budget: on CPU it is committed as it fills)."""
        return weight_bytes(self.loaded.model) + self.kv_cache_bytes

    @property
    def kv_cache_bytes(self) -> int:
        kv_cache = self.local_engine.runner.kv_cache
        return kv_cache.numel() * kv_cache.element_size()

    @property
    def expires_at(self) -> float | None:
        """Wall-clock time at which an idle model unloads (None: never)."""
        if self.keep_alive is None:
            return None
        return time.time() + max(0.0, self.keep_alive - (time.monotonic() - self.last_used))

    def chat_format(self) -> ChatFormat:
        chat = self.loaded.chat_format
        if chat is None:
            raise bad_request(f"model {self.name!r} has no chat template ({self.loaded.chat_template_error}); use the completions API")
        return chat

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        try:
            return self.chat_format().encode(messages, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            raise bad_request(str(e), "messages") from e


ModelLoader = Callable[[str, str], ServedModel]  # (what to load: path or registry name, served name) -> model


def canonical(name: str) -> str:
    """`smollm2` and `smollm2:latest` are one model; names that are not registry names stay as they are."""
    try:
        return str(ModelRef.parse(name))
    except RegistryError:
        return name


class ModelManager:
    """The models this server serves, by name, loaded on first use (Ollama-style).

    Models named at start-up are loaded at once (the first is the default for APIs that name
    no model); any registry model loads when a request names it. A model idle for its
    keep-alive is unloaded; loading one that would exceed the memory budget first unloads
    idle models, least recently used first.
    """

    def __init__(
        self,
        models: list[ServedModel],
        embedder: Embedder | None = None,
        loader: ModelLoader | None = None,
        keep_alive: float | None = None,
        memory_budget: int | None = None,
        store: Store | None = None,
        sources: dict[str, str] | None = None,
    ) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.embedder = embedder or Embedder()
        self.loader = loader
        self.keep_alive = keep_alive
        self.memory_budget = memory_budget
        self.store = store
        self.sources = dict(sources or {})  # served name -> path or registry name, for models named at start-up
        self._locks: dict[str, asyncio.Lock] = {}
        # What each model took when it was last loaded (weights + KV pool): the estimate for loading it again.
        self._footprints: dict[str, int] = {}
        for m in models:
            self._remember(m)

    def find(self, name: str) -> ServedModel | None:
        """A loaded model answering to `name` (exactly, or as the same registry name:tag)."""
        if name in self.models:
            return self.models[name]
        key = canonical(name)
        return next((m for m in self.models.values() if canonical(m.name) == key), None)

    def registry_names(self) -> list[str]:
        if self.store is None:
            return []
        return [str(m.ref) for m in self.store.list()]

    def available(self) -> list[str]:
        """Every name a request may use: loaded, named at start-up, or in the registry (one entry per model)."""
        names = list(self.models) + [n for n in self.sources if self.find(n) is None]
        seen = {canonical(n) for n in names}
        return names + [n for n in self.registry_names() if canonical(n) not in seen]

    def manifest(self, name: str) -> Manifest | None:
        """The registry manifest of `name`, if it is a registry model."""
        if self.store is None:
            return None
        try:
            ref = ModelRef.parse(name)
        except RegistryError:
            return None
        return self.store.get(ref) if self.store.exists(ref) else None

    async def get(self, name: str | None) -> ServedModel:
        """The model for a request, loading it first if it is known but not loaded."""
        served = self.find(name or self.default)
        if served is None:
            served = await self._load(name or self.default)
        served.last_used = time.monotonic()
        return served

    def _source(self, name: str) -> tuple[str, str, int] | None:
        """(what to load, served name, bytes it will take) for a name this server may load."""
        key = canonical(name)
        for served_name, source in self.sources.items():
            if served_name == name or canonical(served_name) == key:
                return source, served_name, self._estimate(served_name, self._stored_bytes(source))
        if self.store is None:
            return None
        try:
            ref = ModelRef.parse(name)
        except RegistryError:
            return None
        if not self.store.exists(ref):
            return None
        return str(ref), name, self._estimate(name, self.store.get(ref).size)

    def _estimate(self, served_name: str, file_bytes: int) -> int:
        """A model's footprint once loaded: what it took last time; else its files (weights load at about
        their stored size) plus a KV pool as large as the largest loaded one (every engine of this
        server has the same KV budget)."""
        known = self._footprints.get(canonical(served_name))
        if known is not None:
            return known
        pools = [m.kv_cache_bytes for m in self.models.values() if isinstance(m.engine, AsyncLLMEngine)]
        return file_bytes + max(pools, default=0)

    def _stored_bytes(self, source: str) -> int:
        size = _file_bytes(source)
        if size or self.store is None:
            return size
        with contextlib.suppress(RegistryError):
            ref = ModelRef.parse(source)
            if self.store.exists(ref):
                return self.store.get(ref).size
        return 0

    def _remember(self, served: ServedModel) -> None:
        if isinstance(served.engine, AsyncLLMEngine):  # remote engines hold no memory here
            self._footprints[canonical(served.name)] = served.memory_bytes

    async def _load(self, name: str) -> ServedModel:
        found = self._source(name) if self.loader is not None else None
        if found is None or self.loader is None:
            raise not_found(f"model {name!r} is not served here; available: {', '.join(self.available())}")
        source, served_name, needed = found
        lock = self._locks.setdefault(canonical(served_name), asyncio.Lock())
        async with lock:
            served = self.find(name)
            if served is not None:
                return served
            self._make_room(needed)
            loader = self.loader
            try:
                served = await asyncio.to_thread(loader, source, served_name)
            except (ValueError, OSError) as e:
                raise APIError(400, f"could not load {name}: {e}", "invalid_request_error", "model") from e
            served.keep_alive = self.keep_alive
            self.models[served.name] = served
            self._remember(served)
            return served

    def _make_room(self, needed: int) -> None:
        if self.memory_budget is None:
            return
        used = sum(m.memory_bytes for m in self.models.values())
        for victim in sorted(self.models.values(), key=lambda m: m.last_used):
            if used + needed <= self.memory_budget:
                return
            if self._idle(victim):
                used -= victim.memory_bytes
                self.unload(victim)
        if used + needed > self.memory_budget:
            raise APIError(
                503, f"not enough memory to load another model ({used >> 20} MiB in use by busy models, budget {self.memory_budget >> 20} MiB)",
                "server_overloaded", code="overloaded", headers={"Retry-After": "5"},
            )

    @staticmethod
    def _idle(m: ServedModel) -> bool:
        return m.active == 0 and m.engine.num_requests == 0

    def unload(self, served: ServedModel) -> None:
        """Drop a model: its engine thread stops and its memory is released."""
        self.models.pop(served.name, None)
        if self.default == served.name and self.models:
            self.default = next(iter(self.models))
        served.engine.shutdown()
        gc.collect()

    def reap(self) -> list[str]:
        """Unload models idle past their keep-alive; returns their names."""
        now = time.monotonic()
        gone = []
        for m in list(self.models.values()):
            if m.keep_alive is not None and self._idle(m) and now - m.last_used >= m.keep_alive and len(self.models) > 0:
                gone.append(m.name)
                self.unload(m)
        return gone

    async def reaper(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap()

    def stats(self) -> dict[str, EngineStats]:
        return {name: m.engine.stats() for name, m in list(self.models.items())}

    def num_requests(self) -> int:
        return sum(m.engine.num_requests for m in self.models.values())

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(*(m.engine.drain(timeout) for m in self.models.values()))

    def shutdown(self) -> None:
        for m in self.models.values():
            m.engine.shutdown()


class Generation:
    """One request's run through the engine, with its metrics recorded as it streams.

    `start` queues the request and raises an APIError at once for bad input or overload, so
    the HTTP status is right even for streaming responses; `stream`/`collect` then consume it.
    """

    def __init__(self, served: ServedModel, metrics: Metrics, retry_after: int) -> None:
        self.served = served
        self.metrics = metrics
        self.retry_after = retry_after
        self._start = time.monotonic()
        self._stream: OutputStream | None = None

    def start(self, prompt: PromptType, params: SamplingParams, request_id: str) -> Generation:
        try:
            self._stream = self.served.engine.submit(prompt, params, request_id)
        except Exception as e:
            raise from_exception(e, self.retry_after) from e
        self.served.active += 1
        self.served.last_used = time.monotonic()
        return self

    def cancel(self) -> None:
        """Abort a started generation that will never be consumed (a later prompt of its request was refused)."""
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
            self.served.active -= 1

    async def stream(self) -> AsyncIterator[RequestOutput]:
        assert self._stream is not None, "start() first"
        labels = (self.served.name,)
        last: float | None = None
        generated = prompt_len = 0
        finish = "abort"
        agen = aiter(self._stream)
        try:
            async for out in agen:
                now = time.monotonic()
                prompt_len = len(out.prompt_token_ids)
                n_new = sum(len(o.token_ids) for o in out.outputs)
                if n_new:
                    hist = self.metrics.ttft if last is None else self.metrics.itl
                    hist.labels(*labels).observe(now - (self._start if last is None else last))
                    last = now
                    generated += n_new
                if out.finished:
                    finish = next((o.finish_reason for o in reversed(out.outputs) if o.finish_reason), "stop")
                    m = out.metrics
                    if m is not None and m.first_scheduled_time is not None:
                        self.metrics.queue_time.labels(*labels).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
                yield out
        except Exception as e:
            raise from_exception(e, self.retry_after) from e
        finally:
            await agen.aclose()  # type: ignore[attr-defined]
            self._stream.abort()  # no-op once finished; frees the request if the consumer left early
            self.metrics.e2e.labels(*labels).observe(time.monotonic() - self._start)
            self.metrics.prompt_tokens.labels(*labels).inc(prompt_len)
            self.metrics.generation_tokens.labels(*labels).inc(generated)
            self.metrics.request_success.labels(*labels, finish).inc()
            self.served.active -= 1
            self.served.last_used = time.monotonic()

    async def collect(self, http: Request | None) -> RequestOutput:
        """The whole result; aborts the request if the client goes away while it runs."""
        acc = OutputAccumulator()
        task = asyncio.current_task()
        gone = asyncio.Event()
        watcher = asyncio.create_task(_cancel_on_disconnect(http, task, gone)) if http is not None else None
        try:
            async for out in self.stream():
                acc.add(out)
        except asyncio.CancelledError:
            if not gone.is_set() or task is None:
                raise  # cancelled by someone else (shutdown): let it propagate
            # Our own watcher cancelled us: the request is already aborted; answer quietly (nobody reads it).
            task.uncancel()
            raise APIError(499, "the client closed the connection before the response was ready", "client_closed_request") from None
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        if acc.first is None:
            raise APIError(500, "the engine returned no output", "server_error")
        return acc.result()


async def _cancel_on_disconnect(http: Request, task: asyncio.Task[object] | None, gone: asyncio.Event) -> None:
    while True:
        await asyncio.sleep(0.25)
        if await http.is_disconnected():
            gone.set()
            if task is not None:
                task.cancel()
            return


def _file_bytes(source: str) -> int:
    """Bytes of a local model's weight files (a GGUF file, a folder of safetensors or GGUF, a packaged
    model); 0 for anything else."""
    path = Path(source).expanduser()
    if not path.exists():
        path = packaged_model_path(source) or path
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".gguf"))
    except OSError:
        pass
    return 0
