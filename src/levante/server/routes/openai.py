"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings.

Translation only: requests become prompt ids + SamplingParams, RequestOutputs become
OpenAI JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from levante.loaders.chat_template import Message
from levante.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from levante.sampling_params import SamplingParams
from levante.server.errors import APIError, bad_request, from_exception
from levante.server.middleware import response_id
from levante.server.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from levante.server.routes import rag as rag_routes
from levante.server.serving import Generation, ModelManager, ServedModel, canonical
from levante.server.state import AppState

router = APIRouter(tags=["OpenAI"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)
}
STREAMING = {"text/event-stream": {"schema": {"type": "string"}}}


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.levante
    return state


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _finish(o: CompletionOutput) -> str | None:
    return o.finish_reason


def _usage(out: RequestOutput) -> Usage:
    completion = sum(len(o.token_ids) for o in out.outputs)
    prompt = len(out.prompt_token_ids)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details={"cached_tokens": out.num_cached_tokens},
    )


def _token_logprobs(token_ids: list[int], entries: list[PositionLogprobs] | None, top_n: int, text: Callable[[int], str]) -> list[TokenLogprob]:
    result = []
    for token, entry in zip(token_ids, entries or [], strict=False):
        chosen = entry[token]
        tops = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_n), key=lambda x: x[1].rank or 0)
        token_str = text(token)
        result.append(
            TokenLogprob(
                token=token_str, logprob=max(chosen.logprob, -9999.0), bytes=list(token_str.encode()),
                top_logprobs=[TopLogprob(token=text(t), logprob=max(lp.logprob, -9999.0), bytes=list(text(t).encode())) for t, lp in tops],
            )
        )
    return result


def _messages(req: ChatCompletionRequest) -> list[Message]:
    out: list[Message] = []
    for m in req.messages:
        if isinstance(m.content, list):
            content = "\n".join(part.text for part in m.content)
        else:
            content = m.content or ""
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content})
    return out


def _params(build: Callable[[], SamplingParams]) -> SamplingParams:
    try:
        return build()
    except ValueError as e:
        raise bad_request(str(e)) from e


def _json_mode(req: ChatCompletionRequest, params: SamplingParams, served: ServedModel, state: AppState) -> None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return
    if fmt.type == "json_schema":
        raise bad_request("response_format json_schema is not supported; use {\"type\": \"json_object\"}", "response_format")
    if params.n > 1:
        raise bad_request("response_format json_object supports n=1 only", "n")
    params.logits_processors = [state.json_processor(served)]


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, 200: {"content": STREAMING}})
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    state = _state(request)
    served = await state.models.get(req.model)
    params = _params(req.to_sampling_params)
    _json_mode(req, params, served, state)
    sources: list[dict[str, Any]] | None = None
    if req.rag is not None:  # retrieve and put the passages into the prompt (routes/rag.py)
        prompt_ids, sources = await rag_routes.grounded_chat_prompt(
            state, served, _messages(req), req.rag, params.max_tokens, req.add_generation_prompt)
    else:
        prompt_ids = await asyncio.to_thread(served.encode_chat, _messages(req), req.add_generation_prompt)
    request_id = response_id(request, "chatcmpl")
    gen = Generation(served, state.metrics, state.config.retry_after).start({"prompt_token_ids": prompt_ids}, params, request_id)
    top_n = req.top_logprobs or 0
    text = served.loaded.tokenizer.token_text
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_chat_stream(gen, served.name, request_id, params.n, top_n, include_usage, text, sources), media_type="text/event-stream")
    out = await gen.collect(request)
    choices = [
        {
            "index": o.index,
            "message": {"role": "assistant", "content": o.text},
            "logprobs": ChoiceLogprobs(content=_token_logprobs(o.token_ids, o.logprobs, top_n, text)) if params.logprobs is not None else None,
            "finish_reason": _finish(o),
            "stop_reason": o.stop_reason,
        }
        for o in out.outputs
    ]
    prompt_lp = _prompt_logprobs(out, text) if req.prompt_logprobs is not None else None
    return ChatCompletionResponse.model_validate(
        {"id": request_id, "model": served.name, "choices": choices, "usage": _usage(out), "sources": sources, "prompt_logprobs": prompt_lp})


def _prompt_logprobs(out: RequestOutput, text: Callable[[int], str]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt position, token id -> logprob, rank and decoded text."""
    entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    return [
        None if entry is None else {
            str(t): {"logprob": max(v.logprob, -9999.0), "rank": v.rank, "decoded_token": v.decoded_token if v.decoded_token is not None else text(t)}
            for t, v in entry.items()
        }
        for entry in entries
    ]


async def _chat_stream(
    gen: Generation, model: str, request_id: str, n: int, top_n: int, include_usage: bool, text: Callable[[int], str],
    sources: list[dict[str, Any]] | None = None,
) -> AsyncIterator[str]:
    created = int(time.time())
    base: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if include_usage:
        base["usage"] = None
    if sources is not None:  # the sources come first, before any text
        yield sse({**base, "choices": [], "sources": sources})
    for i in range(n):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
    final: RequestOutput | None = None
    completion_tokens = 0
    try:
        async for out in gen.stream():
            final = out
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                if not (o.text or o.finish_reason or o.logprobs):
                    continue
                logprobs = None
                if o.logprobs is not None:
                    logprobs = {"content": [t.model_dump() for t in _token_logprobs(o.token_ids, o.logprobs, top_n, text)]}
                delta = {"content": o.text} if o.text else {}
                yield sse({**base, "choices": [{"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": _finish(o)}]})
    except APIError as e:
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    if include_usage and final is not None:
        prompt = len(final.prompt_token_ids)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens}}
        yield sse({**base, "choices": [], "usage": usage})
    yield sse("[DONE]")


def _completion_prompts(req: CompletionRequest) -> list[dict[str, Any]]:
    p = req.prompt
    if isinstance(p, str):
        return [{"prompt": p}]
    if not p:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(x, str) for x in p):
        return [{"prompt": x} for x in p]
    if all(isinstance(x, int) for x in p):
        return [{"prompt_token_ids": list(p)}]
    if all(isinstance(x, list) for x in p):
        return [{"prompt_token_ids": x} for x in p]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")


def _completion_logprobs(
    out: RequestOutput, o: CompletionOutput, echo: bool, text: Callable[[int], str], offset: int = 0
) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    ids: list[int] = []
    entries: list[PositionLogprobs | None] = []
    if echo:
        ids += out.prompt_token_ids
        entries += out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    ids += o.token_ids
    entries += o.logprobs if o.logprobs is not None else [None] * len(o.token_ids)
    pos = offset
    for token, entry in zip(ids, entries, strict=False):
        token_str = text(token)
        lp.tokens.append(token_str)
        lp.text_offset.append(pos)
        pos += len(token_str)
        if entry is None:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            continue
        lp.token_logprobs.append(max(entry[token].logprob, -9999.0))
        lp.top_logprobs.append({text(t): max(v.logprob, -9999.0) for t, v in entry.items()})
    return lp


@router.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, 200: {"content": STREAMING}})
async def completions(req: CompletionRequest, request: Request) -> Any:
    state = _state(request)
    served = await state.models.get(req.model)
    prompts = _completion_prompts(req)
    if req.stream and len(prompts) > 1:
        raise bad_request("streaming supports one prompt per request", "prompt")
    params = _params(req.to_sampling_params)
    request_id = response_id(request, "cmpl")
    text = served.loaded.tokenizer.token_text
    gens: list[Generation] = []
    try:
        for i, p in enumerate(prompts):
            gens.append(Generation(served, state.metrics, state.config.retry_after).start(p, params, f"{request_id}-{i}"))
    except Exception:  # one prompt refused: the request fails as a whole, so nothing of it may keep running
        for g in gens:
            g.cancel()
        raise
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_completion_stream(gens[0], served.name, request_id, req, include_usage, text), media_type="text/event-stream")
    try:
        outs = await asyncio.gather(*(g.collect(request) for g in gens))
    except Exception as e:
        raise from_exception(e, state.config.retry_after) from e
    choices = []
    prompt_tokens = completion_tokens = cached = 0
    for i, out in enumerate(outs):
        prompt_text = out.prompt or served.loaded.tokenizer.decode(out.prompt_token_ids)
        prompt_tokens += len(out.prompt_token_ids)
        cached += out.num_cached_tokens
        for o in out.outputs:
            completion_tokens += len(o.token_ids)
            logprobs = _completion_logprobs(out, o, req.echo, text) if req.logprobs is not None else None
            choices.append({
                "index": i * params.n + o.index,
                "text": (prompt_text if req.echo else "") + o.text,
                "logprobs": logprobs,
                "finish_reason": _finish(o),
                "stop_reason": o.stop_reason,
                "prompt_logprobs": _prompt_logprobs(out, text) if req.prompt_logprobs is not None else None,
            })
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
                  prompt_tokens_details={"cached_tokens": cached})
    return CompletionResponse.model_validate({"id": request_id, "model": served.name, "choices": choices, "usage": usage})


async def _completion_stream(
    gen: Generation, model: str, request_id: str, req: CompletionRequest, include_usage: bool, text: Callable[[int], str]
) -> AsyncIterator[str]:
    base: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}
    if include_usage:
        base["usage"] = None
    final: RequestOutput | None = None
    completion_tokens = 0
    echoed: set[int] = set()
    try:
        async for out in gen.stream():
            final = out
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                prefix = ""
                if req.echo and o.index not in echoed:
                    echoed.add(o.index)
                    prefix = out.prompt or ""
                logprobs = _completion_logprobs(out, o, False, text).model_dump() if req.logprobs is not None else None
                if prefix or o.text or o.finish_reason:
                    choice = {"index": o.index, "text": prefix + o.text, "logprobs": logprobs, "finish_reason": _finish(o)}
                    yield sse({**base, "choices": [choice]})
    except APIError as e:
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    if include_usage and final is not None:
        prompt = len(final.prompt_token_ids)
        yield sse({**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                                                     "total_tokens": prompt + completion_tokens}})
    yield sse("[DONE]")


def _model_card(manager: ModelManager, name: str) -> ModelCard:
    """A card for a loaded model, or for one that would load on first use (from its registry manifest)."""
    served = manager.find(name)
    if served is not None:
        return ModelCard(id=served.name, created=int(served.created), max_model_len=served.max_model_len)
    manifest = manager.manifest(name)
    if manifest is None:
        return ModelCard(id=name, created=int(time.time()))
    return ModelCard(id=name, created=int(manifest.imported_at), max_model_len=manifest.context_length)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Loaded models and those that load on first use (named at start-up, or in the registry)."""
    manager: ModelManager = _state(request).models
    return ModelList(data=[_model_card(manager, name) for name in manager.available()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def get_model(model_id: str, request: Request) -> ModelCard:
    manager: ModelManager = _state(request).models
    match = next((n for n in manager.available() if canonical(n) == canonical(model_id)), None)
    if match is None:
        raise APIError(404, f"model {model_id!r} is not served here", "not_found_error", "model", "model_not_found")
    return _model_card(manager, match)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    state = _state(request)
    embedder = state.models.embedder
    if req.model not in (None, "", embedder.name, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        raise APIError(404, f"embedding model {req.model!r} is not served here; available: {embedder.name}", "not_found_error", "model", "model_not_found")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts or len(texts) > 2048:
        raise bad_request("input must hold 1 to 2048 texts", "input")
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise bad_request(f"this model produces {embedder.dim}-dimensional embeddings", "dimensions")
    vectors = await asyncio.to_thread(embedder.embed, texts)
    tokens = await asyncio.to_thread(embedder.count_tokens, texts)
    data = [
        EmbeddingData(index=i, embedding=base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if req.encoding_format == "base64" else v)
        for i, v in enumerate(vectors)
    ]
    return EmbeddingResponse(data=data, model=embedder.name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
