"""LLMEngine: requests in, one `step()` at a time, RequestOutput deltas out."""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from levante.config import EngineConfig
from levante.engine.block_manager import BlockManager
from levante.engine.detokenizer import IncrementalDetokenizer
from levante.engine.model_runner import ModelRunner, StepResult, kv_cache_dtype, num_kv_blocks
from levante.engine.scheduler import Scheduler
from levante.engine.sequence import FinishReason
from levante.engine.sequence import Sequence as Seq
from levante.layers.linear import quantize_linears, uses_blocks
from levante.layers.sampler import TokenLogprobs
from levante.loaders.loader import LoadedModel, gguf_blocks, load_model
from levante.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from levante.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | Mapping[str, Any]


class PromptTooLongError(ValueError):
    """The prompt (plus the requested tokens) does not fit the context window."""


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Seq]
    metrics: RequestMetrics
    prompt_logprobs_sent: bool = False


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    kv_usage: float  # fraction of blocks held by sequences
    kv_waste: float  # fraction of held slots not holding a token (internal fragmentation)
    prefix_cache_hit_rate: float
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads or config.device == "cpu":
            torch.set_num_threads(config.num_threads or ModelRunner.default_threads())
        device = torch.device(config.device)
        self.loaded = loaded or load_model(
            config.model, dtype=config.dtype, device=device,
            blocks_for=lambda quantization: uses_blocks(config.weight_format, device, quantization),
        )
        # The file's blocks, read again only when the projections will run on them.
        use_blocks = uses_blocks(config.weight_format, self.loaded.device, self.loaded.quantization)
        stored = gguf_blocks(self.loaded) if use_blocks else None
        try:
            quantize_linears(self.loaded.model, config.weight_format, config.quant_max_rows, self.loaded.quantization, stored)
        finally:
            if stored is not None:
                stored.close()
        self.tokenizer = self.loaded.tokenizer
        cfg = self.loaded.config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        cache = config.cache
        self.kv_dtype = kv_cache_dtype(cache.dtype, self.loaded.model, self.loaded.dtype, self.loaded.device)
        blocks = num_kv_blocks(cache, cfg, self.kv_dtype, self.loaded.device)
        if blocks * cache.block_size < self.max_model_len:
            if config.max_model_len is not None:
                raise ValueError(
                    f"the KV cache holds {blocks * cache.block_size} tokens, fewer than one sequence of max_model_len "
                    f"{self.max_model_len}: raise the KV memory budget or lower max_model_len"
                )
            logger.warning("KV cache holds %d tokens: limiting the context window to that", blocks * cache.block_size)
            self.max_model_len = blocks * cache.block_size
        if not config.scheduler.enable_chunked_prefill and config.scheduler.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be at least max_model_len")
        self.block_manager = BlockManager(blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len)
        self.runner = ModelRunner(
            self.loaded.model, blocks, cache.block_size, self.loaded.device, config.seed, config.attention_backend,
            self.kv_dtype,
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        # The model's many long-lived objects need no cycle collection: move them out of the collector's
        # generations, so that the collections serving triggers (it allocates per token) stay cheap.
        gc.collect()
        gc.freeze()
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens (%s), max_model_len %d",
            self.loaded.name, blocks, cache.block_size, str(self.kv_dtype).removeprefix("torch."), self.max_model_len,
        )

    # ---- requests -------------------------------------------------------------------------

    def encode_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A string is tokenised (with BOS as the model expects); `{"prompt_token_ids": [...]}` is taken as is."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self.encode_prompt(str(prompt["prompt"]))
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return None, [int(t) for t in prompt]

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError / PromptTooLongError for a request the engine cannot serve."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        params.validate_vocab(vocab)
        n_prompt = len(prompt_ids)
        wanted = n_prompt + (params.max_tokens or 1)
        if n_prompt >= self.max_model_len or (params.max_tokens is not None and wanted > self.max_model_len):
            raise PromptTooLongError(
                f"this model's context window is {self.max_model_len} tokens; the prompt has {n_prompt} tokens"
                + (f" and max_tokens asks for {params.max_tokens} more" if params.max_tokens else "")
                + f" ({wanted} in total)"
            )

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_time: float | None = None,
        admitted: bool = False,
    ) -> None:
        """Queue a request; `admitted`: its room in the waiting queue was checked already (AsyncLLMEngine.submit)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.encode_prompt(prompt)
        self.check_request(ids, params)
        now = arrival_time if arrival_time is not None else time.time()
        seqs = [self._new_seq(request_id, i, ids, params, now) for i in range(params.n)]
        self.scheduler.add(seqs, check_capacity=not admitted)
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, RequestMetrics(arrival_time=now))

    def _new_seq(self, request_id: str, index: int, ids: list[int], params: SamplingParams, now: float) -> Seq:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.loaded.device).manual_seed(params.seed + index)
        detok = IncrementalDetokenizer(
            self.tokenizer, params.stop_strings, params.include_stop_str_in_output, params.skip_special_tokens
        )
        return Seq(next(self._seq_ids), request_id, index, list(ids), len(ids), params, detok, generator, now)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final (abort) output, if it was live."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        deltas = []
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = FinishReason.ABORT
                deltas.append(CompletionOutput(seq.index, "", [], seq.cumulative_logprob, None, "abort"))
        request.metrics.finished_time = time.time()
        return RequestOutput(request_id, request.prompt, request.prompt_token_ids, deltas, True, metrics=request.metrics)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.time()
        for seq in batch.seqs:
            request = self.requests[seq.request_id]
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
                request.metrics.num_cached_tokens = seq.num_cached_tokens
        computed_before = {seq.seq_id: seq.num_computed_tokens for seq in batch.seqs}
        result = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq, computed_before[seq.seq_id])
        return self._process(result)

    def _process(self, result: StepResult) -> list[RequestOutput]:
        now = time.time()
        changed: dict[str, list[CompletionOutput]] = {}
        for seq, token, lp in zip(result.seqs, result.tokens, result.logprobs, strict=True):
            if seq.seq_id in result.prompt_logprobs:
                self._add_prompt_logprobs(seq, result.prompt_logprobs[seq.seq_id])
            if token is None:
                continue
            request = self.requests[seq.request_id]
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            delta = self._append_token(seq, token, lp)
            changed.setdefault(seq.request_id, []).append(delta)
        outputs = []
        for request_id, deltas in changed.items():
            request = self.requests[request_id]
            finished = all(s.is_finished for s in request.seqs)
            plp = None
            if request.params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
                plp = request.seqs[0].prompt_logprobs
                request.prompt_logprobs_sent = True
            if finished:
                request.metrics.finished_time = now
                del self.requests[request_id]
            outputs.append(
                RequestOutput(
                    request_id, request.prompt, request.prompt_token_ids, deltas, finished,
                    prompt_logprobs=plp, metrics=request.metrics, num_cached_tokens=request.metrics.num_cached_tokens,
                )
            )
        return outputs

    def _append_token(self, seq: Seq, token: int, lp: TokenLogprobs | None) -> CompletionOutput:
        seq.token_ids.append(token)
        delta_lp: list[PositionLogprobs] | None = None
        if lp is not None:
            seq.cumulative_logprob += lp.logprob
            delta_lp = [self._position_logprobs(token, lp)]
            seq.output_logprobs.extend(delta_lp)
        reason, stop = self._check_stop(seq, token)
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop
            self.scheduler.finish(seq)
        text = seq.detokenizer.take(finished=seq.is_finished)
        return CompletionOutput(
            seq.index, text, [token], seq.cumulative_logprob if lp is not None else None, delta_lp,
            seq.finish_reason.value if seq.finish_reason else None, seq.stop_reason,
        )

    def _check_stop(self, seq: Seq, token: int) -> tuple[FinishReason | None, int | str | None]:
        p = seq.params
        out_ids = seq.output_token_ids
        min_reached = len(out_ids) >= p.min_tokens
        is_eos = not p.ignore_eos and token in self.tokenizer.eos_token_ids
        if min_reached and (is_eos or token in (p.stop_token_ids or ())):
            seq.detokenizer.flush(out_ids[:-1])
            return FinishReason.STOP, (None if is_eos else token)
        stop_str = seq.detokenizer.add(out_ids, match_stop=min_reached)
        if stop_str is not None:
            return FinishReason.STOP, stop_str
        if (p.max_tokens is not None and len(out_ids) >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.detokenizer.flush(out_ids)
            return FinishReason.LENGTH, None
        return None, None

    def _position_logprobs(self, token: int, lp: TokenLogprobs) -> PositionLogprobs:
        decode = self.tokenizer.token_text
        entry = {token: Logprob(lp.logprob, lp.rank, decode(token))}
        for rank, (tid, val) in enumerate(lp.top, start=1):
            entry.setdefault(tid, Logprob(val, rank, decode(tid)))
        return entry


    def _add_prompt_logprobs(self, seq: Seq, values: list[TokenLogprobs]) -> None:
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        start = len(seq.prompt_logprobs)
        for offset, lp in enumerate(values):
            token = seq.token_ids[start + offset]
            seq.prompt_logprobs.append(self._position_logprobs(token, lp))

    def score(self, prompt: PromptType, chunk_size: int | None = None) -> torch.Tensor:
        """Logits [L, V] (float32) the model gives at every position of `prompt`, in one pass (chunked prefill).

        Not for use while another thread steps the engine.
        """
        _, ids = self.encode_prompt(prompt)
        self.check_request(ids, SamplingParams(max_tokens=1))
        seq = self._new_seq("score", 0, ids, SamplingParams(max_tokens=1), time.time())
        if not self.block_manager.can_grow(seq, len(ids)):
            raise RuntimeError("not enough free KV blocks to score this prompt now")
        self.block_manager.grow(seq, len(ids))
        try:
            return self.runner.score(seq, chunk_size or self.config.scheduler.max_num_batched_tokens)
        finally:
            self.block_manager.free_seq(seq)

    # ---- introspection --------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.block_manager
        held = [s for s in self.scheduler.running]
        held_blocks = sum(len(s.block_table) for s in held)
        slots = held_blocks * bm.block_size
        used_slots = sum(min(s.num_tokens, len(s.block_table) * bm.block_size) for s in held)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_usage=1 - bm.num_free_blocks / bm.num_blocks,
            kv_waste=(1 - used_slots / slots) if slots else 0.0,
            prefix_cache_hit_rate=bm.hits / bm.queries if bm.queries else 0.0,
            num_preemptions=self.scheduler.num_preemptions,
        )
