"""AsyncLLMEngine: one background thread steps the engine; each request reads its deltas from an asyncio queue.

The step loop owns the engine. Coroutines never touch it directly: new requests and aborts
are posted to a thread-safe inbox that the loop drains between steps, so a request can be
added or aborted while a step runs, and an abort frees its blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from levante.engine.llm_engine import EngineStats, LLMEngine, PromptType
from levante.engine.scheduler import EngineOverloadedError
from levante.layers.cpu_kernels import release_openmp_threads
from levante.outputs import RequestOutput
from levante.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop stopped (a bug or a device failure); requests cannot be served."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    prompt: str | None
    params: SamplingParams
    queue: asyncio.Queue[RequestOutput | BaseException]
    loop: asyncio.AbstractEventLoop


class QueuedOutputStream:
    """One request's deltas, read from a queue its producer fills (an exception ends it with that
    error). Leaving the iteration before the last delta calls `abort`."""

    def __init__(self, queue: asyncio.Queue[RequestOutput | BaseException]) -> None:
        self._queue = queue
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if not self.finished:
                self.abort()

    def abort(self) -> None:
        raise NotImplementedError


class RequestStream(QueuedOutputStream):
    """The deltas of one request submitted to this process's engine."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, queue: asyncio.Queue[RequestOutput | BaseException]) -> None:
        super().__init__(queue)
        self.engine = engine
        self.request_id = request_id

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: list[_Add | str] = []  # additions and request ids to abort
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, _Add] = {}
        self._stopping = False
        self._error: BaseException | None = None
        # From now on only the step thread runs the model: the OpenMP team this thread used to
        # build it would otherwise stop libgomp spinning at the barriers of every step.
        release_openmp_threads()
        self._thread = threading.Thread(target=self._loop, name="levante-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]  # re-exported for the server
        return self.engine.tokenizer

    def submit(self, prompt: PromptType, params: SamplingParams, request_id: str) -> RequestStream:
        """Queue a request now; validation and back-pressure errors raise here, before anything streams.

        Must be called from a running event loop: the deltas are delivered to it.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error}")
        text, ids = self.engine.encode_prompt(prompt)
        self.engine.check_request(ids, params)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in use")
            # Counted in sequences, as the scheduler's queue is (n > 1 asks for n); once admitted here,
            # the request is queued whatever happens before the step loop takes it in.
            pending = sum(item.params.n for item in self._inbox if isinstance(item, _Add))
            limit = self.engine.config.scheduler.max_waiting
            if len(self.engine.scheduler.waiting) + pending + params.n > limit:
                raise EngineOverloadedError(f"server is at capacity: {limit} sequences already waiting; retry shortly")
            add = _Add(request_id, ids, text, params, queue, asyncio.get_running_loop())
            self._queues[request_id] = add
            self._inbox.append(add)
            self._wake.notify()
        return RequestStream(self, request_id, queue)

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas until it finishes; closing the iterator early aborts the request."""
        async for out in self.submit(prompt, params, request_id):
            yield out

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(request_id)
            self._wake.notify()

    @property
    def error(self) -> BaseException | None:
        """Why the step loop died, or None while it lives."""
        return self._error

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_requests(self) -> int:
        with self._lock:
            return len(self._queues)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    async def drain(self, timeout: float) -> None:
        """Wait (up to `timeout` s) for in-flight requests to finish: used for graceful shutdown."""
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):
                while self.num_requests:
                    await asyncio.sleep(0.05)

    # ---- the step thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._inbox and not self.engine.has_unfinished_requests() and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                self._apply(inbox)
                if self.engine.has_unfinished_requests():
                    self._deliver_all(self.engine.step())
        except BaseException as e:  # the loop must never die silently: fail every waiting request
            logger.exception("engine step loop failed")
            self._error = e
            with self._lock:
                adds = list(self._queues.values())
                self._queues.clear()
            for add in adds:
                _post(add, EngineDeadError(f"engine failed: {e}"))

    def _apply(self, inbox: list[_Add | str]) -> None:
        for item in inbox:
            if isinstance(item, str):
                out = self.engine.abort_request(item)
                if out is not None:
                    self._deliver(out)
                continue
            try:
                self.engine.add_request(
                    item.request_id, {"prompt": item.prompt, "prompt_token_ids": item.prompt_ids}, item.params, admitted=True
                )
            except Exception as e:  # checked before queueing, so only a race (e.g. queue filled) lands here
                with self._lock:
                    self._queues.pop(item.request_id, None)
                _post(item, e)

    def _deliver(self, out: RequestOutput) -> None:
        self._deliver_all([out])

    def _deliver_all(self, outs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their requests: one wake-up per event loop, not one per request
        (a step of 32 sequences would otherwise wake the loop 32 times, each contending for the GIL)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Add, RequestOutput]]] = {}
        with self._lock:
            for out in outs:
                add = self._queues.get(out.request_id)
                if add is None:
                    continue
                if out.finished:
                    del self._queues[out.request_id]
                by_loop.setdefault(add.loop, []).append((add, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[_Add, RequestOutput]]) -> None:
    for add, out in items:
        add.queue.put_nowait(out)


def _post(add: _Add, item: RequestOutput | BaseException) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's event loop is closed: nobody is listening any more
        add.loop.call_soon_threadsafe(add.queue.put_nowait, item)
