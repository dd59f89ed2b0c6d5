"""The served models and the bridge from HTTP handlers to the engine: metrics, disconnects, accumulation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from levante.engine.async_engine import AsyncLLMEngine, RequestStream
from levante.engine.llm_engine import EngineStats, PromptType
from levante.loaders.chat_template import ChatFormat, ChatTemplateError, Message
from levante.loaders.loader import LoadedModel
from levante.outputs import OutputAccumulator, RequestOutput
from levante.rag.embeddings import Embedder
from levante.sampling_params import SamplingParams
from levante.server.errors import APIError, bad_request, from_exception, not_found
from levante.server.metrics import Metrics


@dataclass
class ServedModel:
    name: str
    engine: AsyncLLMEngine
    created: float = field(default_factory=time.time)

    @property
    def loaded(self) -> LoadedModel:
        return self.engine.engine.loaded

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

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


class ModelManager:
    """Models served by this process, by name. The first is the default for APIs that name no model."""

    def __init__(self, models: list[ServedModel], embedder: Embedder | None = None) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.embedder = embedder or Embedder()

    def get(self, name: str | None) -> ServedModel:
        if not name:
            return self.models[self.default]
        if name in self.models:
            return self.models[name]
        raise not_found(f"model {name!r} is not served here; available: {', '.join(self.models)}")

    def stats(self) -> dict[str, EngineStats]:
        return {name: m.engine.stats() for name, m in self.models.items()}

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
        self._stream: RequestStream | None = None

    def start(self, prompt: PromptType, params: SamplingParams, request_id: str) -> Generation:
        try:
            self._stream = self.served.engine.submit(prompt, params, request_id)
        except Exception as e:
            raise from_exception(e, self.retry_after) from e
        return self

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
