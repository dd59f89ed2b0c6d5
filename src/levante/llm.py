"""Offline API, as vLLM's: `LLM(model).generate(prompts, SamplingParams(...))` -> list[RequestOutput]."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

from levante.config import CacheConfig, EngineConfig, SchedulerConfig
from levante.engine.llm_engine import LLMEngine, PromptType
from levante.loaders.chat_template import ChatTemplateError, Message
from levante.outputs import OutputAccumulator, RequestOutput
from levante.sampling_params import SamplingParams


class LLM:
    """A model with an engine. Prompts given together are batched by the engine, not looped."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int | None = None,
        seed: int = 0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_chunked_prefill: bool = True,
        num_threads: int | None = None,
        attention_backend: str = "auto",
        weight_format: str = "auto",
        kv_cache_dtype: str = "auto",
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=seed,
            num_threads=num_threads,
            attention_backend=attention_backend,
            weight_format=weight_format,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_kv_blocks,
                memory_bytes=kv_cache_memory,
                enable_prefix_caching=enable_prefix_caching,
                dtype=kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_waiting=1 << 30,  # offline: everything given is accepted
                enable_chunked_prefill=enable_chunked_prefill,
            ),
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        prompt_list: list[PromptType]
        if isinstance(prompts, (str, Mapping)):
            prompt_list = [prompts]
        elif prompts and isinstance(prompts[0], int):  # a single list of token ids
            prompt_list = [{"prompt_token_ids": cast(list[int], list(prompts))}]
        else:
            prompt_list = cast(list[PromptType], list(prompts))
        params = sampling_params or SamplingParams()
        param_list = [params] * len(prompt_list) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(param_list)} sampling params")
        ids = [f"offline-{next(self._ids)}" for _ in prompt_list]
        for request_id, prompt, p in zip(ids, prompt_list, param_list, strict=True):
            self.engine.add_request(request_id, prompt, p)
        results = {rid: OutputAccumulator() for rid in ids}
        for out in self.stream_steps(set(ids)):
            results[out.request_id].add(out)
        return [results[rid].result() for rid in ids]

    def stream_steps(self, request_ids: set[str]) -> Iterator[RequestOutput]:
        """Run the engine until `request_ids` finish, yielding each delta (used by the CLI to stream)."""
        pending = set(request_ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for request_id in pending:
                self.engine.abort_request(request_id)

    def score(self, prompt: PromptType, chunk_size: int | None = None) -> Any:
        """Logits (float32 tensor [L, V]) at every prompt position: the one-pass reference for decoding and perplexity."""
        return self.engine.score(prompt, chunk_size)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat format to one conversation (or a list of them) and generate replies."""
        single = bool(messages) and isinstance(messages[0], Mapping)
        conversations = cast(list[Sequence[Message]], [messages] if single else list(messages))
        prompts: list[PromptType] = [{"prompt_token_ids": self.encode_chat(c, add_generation_prompt)} for c in conversations]
        return self.generate(prompts, sampling_params)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        chat = self.engine.loaded.chat_format
        if chat is None:
            raise ChatTemplateError(f"model {self.engine.loaded.name} has no chat format: {self.engine.loaded.chat_template_error}")
        return chat.encode(messages, add_generation_prompt=add_generation_prompt)
