"""The ingress's side of a model deployment: an engine client whose engines are its replicas.

`RemoteEngine.submit` starts a `RemoteStream`: a task that calls the deployment with
`handle.options(stream=True).generate.remote(...)` (Ray routes it to a replica with fewer
requests in flight) and pumps the replica's items into a queue from the start, so that the
replica's id, or its refusal, is known before the response's headers leave (replicas.py).

A call whose replica fails (its actor died, its engine stopped) before any output is sent
again, twice at most, to whichever replica Ray picks; one that fails after output ends with a
503 "replica failed, retry the request". Replica states (from Serve's controller) and engine
stats (from every replica) are polled every few seconds for /health and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from levante.engine.async_engine import EngineDeadError, QueuedOutputStream
from levante.engine.llm_engine import EngineStats, PromptType
from levante.outputs import RequestOutput
from levante.sampling_params import SamplingParams
from levante.scale.remote import Accepted, Refused, ReplicaReport, aggregate, portable
from levante.scale.replicas import track_call
from levante.server.errors import APIError, overloaded

logger = logging.getLogger("ray.serve")  # Serve tags these lines with the replica and request ids

RETRIES = 2  # resubmissions of a request whose replica failed before any output
POLL_INTERVAL_S = 2.0  # replica states and engine stats, for /health and /metrics


class RemoteEngine:
    """An engine client whose engines are the replicas of a model deployment."""

    def __init__(self, handle: DeploymentHandle, model: str, app_name: str, min_replicas: int) -> None:
        self.handle = handle
        self.model = model
        self.app_name = app_name
        self.deployment = handle.deployment_name
        self.min_replicas = min_replicas
        self.streams: set[RemoteStream] = set()
        self.reports: dict[str, ReplicaReport] = {}
        self.replica_states: dict[str, int] = {}
        self._unavailable: BaseException | None = None
        self._poller: asyncio.Task[None] | None = None

    def submit(self, prompt: PromptType, params: SamplingParams, request_id: str) -> RemoteStream:
        self._ensure_poller()
        stream = RemoteStream(self, prompt, params, request_id)
        self.streams.add(stream)
        return stream

    @property
    def error(self) -> BaseException | None:
        """Set while the deployment has no running replica (and should have one)."""
        self._ensure_poller()
        return self._unavailable

    @property
    def num_requests(self) -> int:
        return len(self.streams)

    def stats(self) -> EngineStats:
        self._ensure_poller()
        return aggregate(list(self.reports.values()))

    def memory_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.reports.values())

    async def drain(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):
                while self.streams:
                    await asyncio.sleep(0.05)

    def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for stream in list(self.streams):
            stream.abort()

    # ---- replica state, polled ----

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the next call from one starts it
                self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await self._poll_once()
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _poll_once(self) -> None:
        try:
            if hasattr(self.handle, "broadcast"):  # Ray >= 2.5x: every replica answers
                results = await self.handle.broadcast("report").results_async(timeout_s=5, return_exceptions=True)
            else:
                results = [await self.handle.report.remote()]
            self.reports = {r.replica: r for r in results if isinstance(r, ReplicaReport)}
        except Exception as e:  # stats are best effort; health comes from the controller below
            logger.debug("replica reports of %s failed: %r", self.deployment, e)
        try:
            status = await asyncio.to_thread(serve.status)
            overview = status.applications[self.app_name].deployments[self.deployment]
        except Exception as e:  # KeyError: the application is being deleted
            logger.log(logging.DEBUG if isinstance(e, KeyError) else logging.WARNING, "no status of deployment %s: %r", self.deployment, e)
            return
        self.replica_states = {str(getattr(k, "value", k)): int(v) for k, v in overview.replica_states.items()}
        running = self.replica_states.get("RUNNING", 0)
        state = str(getattr(overview.status, "value", overview.status))
        if running == 0 and (self.min_replicas > 0 or state in ("UNHEALTHY", "DEPLOY_FAILED")):
            self._unavailable = EngineDeadError(
                f"no running replica of model {self.model!r} (deployment {self.deployment} {state}, replicas {self.replica_states})"
            )
        else:
            self._unavailable = None


class RemoteStream(QueuedOutputStream):
    """One request on a replica. A task pumps the replica's stream into a queue from the start, so
    the replica id (and a refusal) is known before the response's headers go out."""

    def __init__(self, engine: RemoteEngine, prompt: PromptType, params: SamplingParams, request_id: str) -> None:
        super().__init__(asyncio.Queue())
        self.engine = engine
        self.request_id = request_id
        self.accepted = track_call()
        self._task = asyncio.get_running_loop().create_task(self._pump(prompt, params))

    def abort(self) -> None:
        """Stop the call: Serve cancels the replica's generator, which aborts the engine request."""
        self.finished = True
        self._task.cancel()

    async def _pump(self, prompt: PromptType, params: SamplingParams) -> None:
        call = self.engine.handle.options(method_name="generate", stream=True)
        params = portable(params)
        try:
            for attempt in range(RETRIES + 1):
                delivered = 0
                gen: DeploymentResponseGenerator[Accepted | Refused | RequestOutput] = call.remote(prompt, params, self.request_id)  # type: ignore[assignment]
                try:
                    async for item in gen:
                        if isinstance(item, Accepted):
                            if not self.accepted.done():
                                self.accepted.set_result(item.replica)
                            logger.info("request %s: model %s, replica %s", self.request_id, self.engine.model, item.replica)
                            continue
                        if isinstance(item, Refused):
                            self._fail(item.error)
                            return
                        delivered += 1
                        self._queue.put_nowait(item)
                    return
                except asyncio.CancelledError:
                    gen.cancel()
                    raise
                except Exception as e:
                    error, replica_failed = classify(e)
                    if replica_failed and not delivered and attempt < RETRIES:
                        logger.warning("request %s: replica failed before any output (%s); sending it again", self.request_id, _brief(error))
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    if replica_failed:
                        error = replica_failed_error(error)
                    self._fail(error)
                    return
        finally:
            if not self.accepted.done():
                self.accepted.cancel()
            self.engine.streams.discard(self)

    def _fail(self, error: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # marked as seen: the stream raises it anyway, tracked or not
        self._queue.put_nowait(error)


def classify(e: BaseException) -> tuple[BaseException, bool]:
    """(the error to report, whether the replica failed so that another one may serve the request)."""
    cause = e.cause if isinstance(e, RayTaskError) and isinstance(e.cause, BaseException) else e
    if isinstance(cause, (RayActorError, EngineDeadError)):
        return cause, True
    from ray.serve import exceptions as serve_errors

    if isinstance(cause, serve_errors.BackPressureError):
        return overloaded(f"model replicas are at capacity: {_brief(cause)}", 1), False
    unavailable = getattr(serve_errors, "DeploymentUnavailableError", None)
    if unavailable is not None and isinstance(cause, unavailable):
        return APIError(503, f"the model deployment is unavailable: {_brief(cause)}", "server_error", code="unavailable",
                        headers={"Retry-After": "5"}), False
    return cause, False


def replica_failed_error(cause: BaseException) -> APIError:
    return APIError(
        503, f"the model replica serving this request failed ({type(cause).__name__}: {_brief(cause)}); retry the request",
        "server_error", code="replica_failed", headers={"Retry-After": "1"},
    )


def _brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
