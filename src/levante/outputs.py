"""What the engine returns, with vLLM's names: RequestOutput holding one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely token
    decoded_token: str | None = None


# Per position: token id -> Logprob (the chosen/prompt token plus the top-N alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One sample of a request. In streaming deltas `text`, `token_ids` and `logprobs` hold only what is new."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    extra: dict[str, object] = field(default_factory=dict)


class OutputAccumulator:
    """Folds streaming deltas into the final RequestOutput."""

    def __init__(self) -> None:
        self.first: RequestOutput | None = None
        self.outputs: dict[int, CompletionOutput] = {}

    def add(self, out: RequestOutput) -> None:
        if self.first is None:
            self.first = out
        if out.prompt_logprobs is not None:
            self.first.prompt_logprobs = out.prompt_logprobs
        self.first.finished = out.finished
        self.first.metrics = out.metrics
        for delta in out.outputs:
            acc = self.outputs.setdefault(delta.index, CompletionOutput(delta.index, "", [], None, None))
            acc.text += delta.text
            acc.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + delta.logprobs
            acc.cumulative_logprob = delta.cumulative_logprob
            acc.finish_reason, acc.stop_reason = delta.finish_reason, delta.stop_reason

    def result(self) -> RequestOutput:
        assert self.first is not None
        self.first.outputs = [self.outputs[i] for i in sorted(self.outputs)]
        return self.first
