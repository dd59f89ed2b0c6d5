"""Ollama's native API: /api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show, /api/ps, /api/version.

What the `ollama` Python client, LlamaIndex's Ollama LLM and Open WebUI send and parse. Chat and
generate stream NDJSON by default (`"stream": false` gives one object); the last object has
`done: true`, `done_reason` and Ollama's timings in nanoseconds (prompt_eval_* is the prefill,
eval_* the decode, load_duration the time spent preparing the prompt, as models load at start-up).

Model names: Ollama clients use `name:tag`. A served model `smollm2` is listed as
`smollm2:latest`, and requests may name it either way; an unknown name is a 404
`{"error": "model 'x' not found"}`. The embedding model answers to `all-minilm` (and
`all-minilm:l6-v2`, `all-minilm-l6-v2`). Pull, copy and delete work on the registry; push and create are not served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from levante.config import TransformerConfig
from levante.loaders.chat_template import ChatTemplateError, Message
from levante.outputs import RequestOutput
from levante.rag.embeddings import Embedder
from levante.registry import catalog
from levante.registry.store import Manifest, ModelRef, RegistryError
from levante.sampling_params import SamplingParams
from levante.server.errors import APIError, bad_request
from levante.server.middleware import response_id
from levante.server.protocol.ollama import (
    OLLAMA_VERSION,
    FormatType,
    KeepAlive,
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaCopyRequest,
    OllamaDeleteRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbeddingsResponse,
    OllamaEmbedRequest,
    OllamaEmbedResponse,
    OllamaErrorResponse,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaModelDetails,
    OllamaModelTag,
    OllamaOptions,
    OllamaPsResponse,
    OllamaPullRequest,
    OllamaRunningModel,
    OllamaShowRequest,
    OllamaShowResponse,
    OllamaStatus,
    OllamaTagsResponse,
    OllamaVersionResponse,
)
from levante.server.serving import Generation, ModelManager, ServedModel, canonical
from levante.server.state import AppState

router = APIRouter(tags=["Ollama"])

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OllamaErrorResponse} for code in (400, 401, 404, 413, 503)}
NDJSON = {"application/x-ndjson": {"schema": {"type": "string"}}}
EMBEDDING_NAMES = frozenset({"all-minilm", "all-minilm-l6-v2", "all-minilm-l6", "sentence-transformers/all-minilm-l6-v2"})
EMBEDDING_TAGS = frozenset({"", "latest", "l6-v2", "22m"})
NEVER_EXPIRES = "9999-12-31T23:59:59Z"  # models stay loaded while the server runs
MAX_STOP = 16


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.levante
    return state


def _rfc3339(ts: float | None = None) -> str:
    moment = datetime.fromtimestamp(ts, UTC) if ts is not None else datetime.now(UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


# ---- model names and metadata ----------------------------------------------------------------


def ollama_name(served_name: str) -> str:
    return served_name if ":" in served_name else f"{served_name}:latest"


def not_found(name: str) -> APIError:
    return APIError(404, f"model '{name}' not found", "not_found_error", "model", "model_not_found")


async def resolve(models: ModelManager, name: str) -> ServedModel:
    """`smollm2` and `smollm2:latest` both name the served model `smollm2`; registry models load on first use."""
    try:
        return await models.get(name)
    except APIError as e:
        if e.status == 404:
            raise not_found(name) from e
        raise


def keep_alive_seconds(value: str | float) -> float | None:
    """Ollama's keep_alive: seconds (number), a duration ('30s', '5m', '1h'), negative: forever."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        try:
            seconds = float(text[: len(text) - len(unit)] if unit else text) * units.get(unit, 1.0)
        except ValueError:
            raise bad_request(f"keep_alive {value!r} is not a duration such as 30s, 5m or -1", "keep_alive") from None
    return None if seconds < 0 else seconds


def _apply_keep_alive(models: ModelManager, served: ServedModel, value: KeepAlive) -> None:
    """A request's keep_alive sets how long its model stays loaded once idle (never for the default model)."""
    if value is None or value == "" or served.name == models.default:
        return
    served.keep_alive = keep_alive_seconds(value)


def parameter_count(cfg: TransformerConfig) -> int:
    """Weights of a Llama-family decoder, from its hyper-parameters (embeddings, attention, MLP or experts, norms)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    attn = 2 * h * cfg.num_heads * cfg.head_dim + 2 * h * cfg.num_kv_heads * cfg.head_dim
    mlp = cfg.num_experts * (3 * h * i) + h * cfg.num_experts if cfg.num_experts else 3 * h * i
    per_layer = attn + mlp + 2 * h
    return v * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_layers * per_layer + h


def human_count(n: int) -> str:
    """Ollama's parameter_size spelling: 7B, 7.2B, 134.52M, 22M, 500K."""
    for unit, size, digits in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    return str(n)


def _quantization(source: str) -> str:
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(source.lower(), source.upper())


def _file_facts(path: Path) -> tuple[int, float, str]:
    """Size, modification time and a digest naming this version of the weights (of path, size and mtime, not of the bytes)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [f.stat() for f in files]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime for s in stats), default=0.0)
    key = f"{path.resolve()}:{size}:{max((s.st_mtime_ns for s in stats), default=0)}"
    return size, mtime, hashlib.sha256(key.encode()).hexdigest()


def _details(served: ServedModel) -> OllamaModelDetails:
    loaded = served.loaded
    family = loaded.config.model_type
    return OllamaModelDetails(
        format="gguf" if loaded.path.suffix.lower() == ".gguf" else "safetensors",
        family=family, families=[family], parameter_size=human_count(parameter_count(loaded.config)),
        quantization_level=_quantization(loaded.quantization),
    )


def _tag(served: ServedModel) -> OllamaModelTag:
    size, mtime, digest = _file_facts(served.loaded.path)
    name = ollama_name(served.name)
    return OllamaModelTag(name=name, model=name, modified_at=_rfc3339(mtime), size=size, digest=digest, details=_details(served))


def _template(served: ServedModel) -> str:
    """The chat format shown with Ollama's placeholders (Levante renders the model's own template; this is for reading)."""
    chat = served.loaded.chat_format
    if chat is None:
        return "{{ .Prompt }}"
    for messages in (
        [{"role": "system", "content": "{{ .System }}"}, {"role": "user", "content": "{{ .Prompt }}"}],
        [{"role": "user", "content": "{{ .Prompt }}"}],
    ):
        try:
            return chat.render(messages)
        except ChatTemplateError:
            continue
    return ""


def _parameters(served: ServedModel) -> str:
    tokenizer = served.loaded.tokenizer
    stops = sorted({tokenizer.decode([t], skip_special_tokens=False) for t in tokenizer.eos_token_ids})
    return "\n".join(f"stop {json.dumps(s, ensure_ascii=False)}" for s in stops if s)


def _model_info(served: ServedModel) -> dict[str, Any]:
    cfg = served.loaded.config
    arch = cfg.model_type
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": served.name,
        "general.parameter_count": parameter_count(cfg),
        f"{arch}.context_length": served.max_model_len,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_layers,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_heads,
        f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{arch}.rope.freq_base": cfg.rope_theta,
        f"{arch}.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.bos_token_id": served.loaded.tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": served.loaded.tokenizer.eos_token_id,
    }
    if cfg.num_experts:
        info[f"{arch}.expert_count"] = cfg.num_experts
        info[f"{arch}.expert_used_count"] = cfg.num_experts_per_tok
    if cfg.sliding_window:
        info[f"{arch}.attention.sliding_window"] = cfg.sliding_window
    return info


def _show(served: ServedModel) -> OllamaShowResponse:
    template, parameters = _template(served), _parameters(served)
    _, mtime, _ = _file_facts(served.loaded.path)
    lines = ["# Modelfile generated by levante", f"FROM {served.loaded.path}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER {p}" for p in parameters.splitlines()]
    return OllamaShowResponse(
        modelfile="\n".join(lines) + "\n", parameters=parameters, template=template, details=_details(served),
        model_info=_model_info(served), capabilities=["completion"], modified_at=_rfc3339(mtime),
    )


# ---- request translation ---------------------------------------------------------------------


def _sampling(options: OllamaOptions | None, n_prompt: int, served: ServedModel) -> SamplingParams:
    o = options or OllamaOptions.model_validate({})
    context = served.max_model_len
    if o.num_ctx is not None and o.num_ctx > context:
        raise bad_request(f"num_ctx {o.num_ctx} is larger than this model's context window of {context} tokens", "options.num_ctx")
    if o.num_predict == 0:
        raise bad_request("num_predict must be positive, -1 (no limit) or -2 (fill the context)", "options.num_predict")
    window = o.num_ctx or context
    if o.num_ctx is not None and n_prompt >= window:
        raise bad_request(f"the prompt has {n_prompt} tokens, which does not fit num_ctx {window}", "options.num_ctx")
    room = window - n_prompt
    max_tokens: int | None = room if o.num_predict is None or o.num_predict < 0 else min(o.num_predict, room)
    if room <= 0:
        max_tokens = None  # the engine refuses the prompt with the numbers
    stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request(f"options.stop: at most {MAX_STOP} stop strings", "options.stop")
    try:
        return SamplingParams(
            temperature=0.8 if o.temperature is None else o.temperature,
            top_p=0.9 if o.top_p is None else o.top_p,
            top_k=40 if o.top_k is None else (o.top_k or -1),
            min_p=o.min_p or 0.0,
            repetition_penalty=o.repeat_penalty or 1.0,
            presence_penalty=o.presence_penalty or 0.0,
            frequency_penalty=o.frequency_penalty or 0.0,
            seed=o.seed if o.seed is not None and o.seed >= 0 else None,
            max_tokens=max_tokens,
            stop=stop,
        )
    except ValueError as e:
        raise bad_request(str(e)) from e


def _json_format(fmt: FormatType, params: SamplingParams, served: ServedModel, state: AppState) -> None:
    if fmt is None or fmt == "":
        return
    if fmt != "json":
        raise bad_request('format must be "json"; structured outputs with a JSON schema are not supported', "format")
    try:
        params.logits_processors = [state.json_processor(served)]
    except ImportError as e:
        raise bad_request("format json is not available", "format") from e


def _refuse(name: str, *, think: bool | str | None, tools: list[dict[str, Any]] | None = None, logprobs: bool | None = None,
            images: bool = False) -> None:
    if think not in (None, False, ""):
        raise bad_request(f"model '{name}' does not support thinking", "think")
    if tools:
        raise bad_request(f"model '{name}' does not support tools", "tools")
    if logprobs:
        raise bad_request("logprobs are not served on the Ollama API; use /v1/chat/completions or /v1/completions", "logprobs")
    if images:
        raise bad_request(f"model '{name}' does not support images", "images")


def _nothing_to_do(model: str, keep_alive: KeepAlive, body: dict[str, Any]) -> JSONResponse:
    """Ollama answers an empty request by loading (or with keep_alive 0, unloading) the model."""
    unload = keep_alive in (0, "0", "0s", "0m")
    return JSONResponse({"model": model, "created_at": _rfc3339(), **body, "done": True, "done_reason": "unload" if unload else "load"})


def _timings(out: RequestOutput, n_generated: int, started: float) -> dict[str, Any]:
    m = out.metrics
    now = time.time()
    arrival = m.arrival_time if m is not None else started
    scheduled = m.first_scheduled_time if m is not None and m.first_scheduled_time else arrival
    first = m.first_token_time if m is not None and m.first_token_time else now
    finished = m.finished_time if m is not None and m.finished_time else now
    return {
        "total_duration": _ns(now - started), "load_duration": _ns(arrival - started),
        "prompt_eval_count": len(out.prompt_token_ids), "prompt_eval_duration": _ns(first - scheduled),
        "eval_count": n_generated, "eval_duration": _ns(finished - first),
    }


def _done_reason(out: RequestOutput) -> str:
    return "length" if out.outputs[0].finish_reason == "length" else "stop"


def _line(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"


async def _ndjson(
    gen: Generation, model: str, started: float, piece: Callable[[str], dict[str, Any]],
    final: Callable[[RequestOutput, list[int]], dict[str, Any]],
) -> AsyncIterator[str]:
    """Partial objects as text arrives, then the final one; an error mid-stream is an `{"error"}` line."""
    generated: list[int] = []
    last: RequestOutput | None = None
    try:
        async for out in gen.stream():
            o = out.outputs[0]
            generated += o.token_ids
            if o.text:
                yield _line({"model": model, "created_at": _rfc3339(), **piece(o.text), "done": False})
            last = out
    except APIError as e:
        yield _line({"error": e.message})
        return
    if last is None or not last.finished:
        yield _line({"error": "generation ended early"})
        return
    yield _line({"model": model, "created_at": _rfc3339(), **piece(""), "done": True, "done_reason": _done_reason(last),
                 **_timings(last, len(generated), started), **final(last, generated)})


# ---- routes ------------------------------------------------------------------------------------


@router.post("/api/chat", response_model=OllamaChatResponse, responses={**ERRORS, 200: {"content": NDJSON}})
async def chat(req: OllamaChatRequest, request: Request) -> Any:
    """A reply to `messages` through the model's chat format; NDJSON unless `stream` is false."""
    started = time.time()
    state = _state(request)
    served = await resolve(state.models, req.model)
    _apply_keep_alive(state.models, served, req.keep_alive)
    _refuse(req.model, think=req.think, tools=req.tools, logprobs=req.logprobs, images=any(m.images for m in req.messages or []))
    if not req.messages:
        return _nothing_to_do(req.model, req.keep_alive, {"message": {"role": "assistant", "content": ""}})
    messages: list[Message] = [{"role": m.role, "content": m.content or ""} for m in req.messages]
    ids = await asyncio.to_thread(served.encode_chat, messages)
    params = _sampling(req.options, len(ids), served)
    _json_format(req.format, params, served, state)
    gen = Generation(served, state.metrics, state.config.retry_after).start({"prompt_token_ids": ids}, params, response_id(request, "chat"))

    def piece(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    if req.stream:
        return StreamingResponse(_ndjson(gen, req.model, started, piece, lambda out, generated: {}), media_type="application/x-ndjson")
    out = await gen.collect(request)
    o = out.outputs[0]
    return JSONResponse({"model": req.model, "created_at": _rfc3339(), **piece(o.text), "done": True,
                         "done_reason": _done_reason(out), **_timings(out, len(o.token_ids), started)})


def _generate_ids(served: ServedModel, req: OllamaGenerateRequest) -> list[int]:
    tokenizer = served.loaded.tokenizer
    prompt = req.prompt or ""
    if req.raw or served.loaded.chat_format is None:  # Ollama's template for a model without one is "{{ .Prompt }}"
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        messages: list[Message] = [{"role": "system", "content": req.system}] if req.system else []
        ids = served.encode_chat([*messages, {"role": "user", "content": prompt}])
    if req.context and ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]  # the context already starts with BOS
    return list(req.context or []) + ids


@router.post("/api/generate", response_model=OllamaGenerateResponse, responses={**ERRORS, 200: {"content": NDJSON}})
async def generate(req: OllamaGenerateRequest, request: Request) -> Any:
    """A response to `prompt` (through the chat format, with `system`, unless `raw`); the final object has `context`."""
    started = time.time()
    state = _state(request)
    served = await resolve(state.models, req.model)
    _apply_keep_alive(state.models, served, req.keep_alive)
    _refuse(req.model, think=req.think, logprobs=req.logprobs, images=bool(req.images))
    if req.template:
        raise bad_request("template is not supported: the model's own chat format is used (or raw: true)", "template")
    if req.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")
    if not req.prompt:
        return _nothing_to_do(req.model, req.keep_alive, {"response": ""})
    ids = await asyncio.to_thread(_generate_ids, served, req)
    params = _sampling(req.options, len(ids), served)
    _json_format(req.format, params, served, state)
    gen = Generation(served, state.metrics, state.config.retry_after).start({"prompt_token_ids": ids}, params, response_id(request, "generate"))

    def final(out: RequestOutput, generated: list[int]) -> dict[str, Any]:
        return {"context": list(out.prompt_token_ids) + generated}

    if req.stream:
        return StreamingResponse(_ndjson(gen, req.model, started, lambda text: {"response": text}, final), media_type="application/x-ndjson")
    out = await gen.collect(request)
    o = out.outputs[0]
    return JSONResponse({"model": req.model, "created_at": _rfc3339(), "response": o.text, "done": True,
                         "done_reason": _done_reason(out), **_timings(out, len(o.token_ids), started), **final(out, o.token_ids)})


def _manifest_tag(m: Manifest) -> OllamaModelTag:
    name = str(m.ref)
    details = OllamaModelDetails(
        format=m.format, family=m.architecture, families=[m.architecture], parameter_size=human_count(m.parameters),
        quantization_level=_quantization(m.quantization),
    )
    return OllamaModelTag(name=name, model=name, modified_at=_rfc3339(m.imported_at), size=m.size, digest=m.digest[7:], details=details)


def _all_tags(models: ModelManager) -> list[OllamaModelTag]:
    """Registry models (loaded or not), then loaded models that are not in the registry."""
    tags = [_manifest_tag(m) for m in (models.store.list() if models.store else [])]
    listed = {canonical(t.name) for t in tags}
    return tags + [_tag(m) for m in list(models.models.values()) if canonical(m.name) not in listed]


@router.get("/api/tags", response_model=OllamaTagsResponse)
async def tags(request: Request) -> OllamaTagsResponse:
    """The models this server can serve, named `name:tag`: the registry's, plus those named at start-up."""
    models = _state(request).models
    return OllamaTagsResponse(models=await asyncio.to_thread(_all_tags, models))


@router.post("/api/show", response_model=OllamaShowResponse, responses=ERRORS)
async def show(req: OllamaShowRequest, request: Request) -> OllamaShowResponse:
    """Template, parameters, architecture details and context length of a model."""
    name = req.model or req.name
    if not name:
        raise bad_request("model is required", "model")
    served = await resolve(_state(request).models, name)
    return await asyncio.to_thread(_show, served)


@router.get("/api/ps", response_model=OllamaPsResponse)
async def ps(request: Request) -> OllamaPsResponse:
    """Loaded models, with when each unloads if it stays idle (the default model never does)."""
    running = []
    for served in list(_state(request).models.models.values()):
        tag = await asyncio.to_thread(_tag, served)
        tag.size = served.memory_bytes
        vram = tag.size if served.loaded.device.type != "cpu" else 0
        expires = served.expires_at
        running.append(OllamaRunningModel(
            **tag.model_dump(), expires_at=NEVER_EXPIRES if expires is None else _rfc3339(expires), size_vram=vram,
            context_length=served.max_model_len,
        ))
    return OllamaPsResponse(models=running)


@router.post("/api/pull", response_model=OllamaStatus, responses={**ERRORS, 200: {"content": NDJSON}})
async def pull(req: OllamaPullRequest, request: Request) -> Any:
    """Fetch a known model into the registry; streams progress lines as Ollama does unless `stream` is false."""
    store = _state(request).models.store
    if store is None:
        raise bad_request("this server has no model registry")
    try:
        ref = ModelRef.parse(req.model)
    except RegistryError as e:
        raise bad_request(str(e), "model") from e
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

    def progress(label: str, total: int) -> Callable[[int], None]:
        done = 0
        last = 0.0

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            if time.monotonic() - last > 0.2 or done >= total:
                last = time.monotonic()
                loop.call_soon_threadsafe(queue.put_nowait, {"status": f"pulling {label}", "digest": label, "total": total, "completed": done})

        return advance

    def work() -> None:
        try:
            manifest = catalog.pull(store, ref, progress)
            loop.call_soon_threadsafe(queue.put_nowait, {"status": "verifying sha256 digest"})
            loop.call_soon_threadsafe(queue.put_nowait, {"status": "writing manifest", "digest": manifest.digest[7:]})
            loop.call_soon_threadsafe(queue.put_nowait, {"status": "success"})
        except BaseException as e:
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.create_task(asyncio.to_thread(work))

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        await task

    if req.stream:
        async def lines() -> AsyncIterator[str]:
            try:
                async for event in events():
                    yield _line(event)
            except (RegistryError, ValueError, OSError) as e:
                yield _line({"error": str(e)})
        return StreamingResponse(lines(), media_type="application/x-ndjson")
    last: dict[str, Any] = {}
    try:
        async for event in events():
            last = event
    except (RegistryError, ValueError, OSError) as e:
        raise (not_found(req.model) if "not a known model" in str(e) else bad_request(str(e), "model")) from e
    return JSONResponse(last)


@router.delete("/api/delete", responses=ERRORS)
async def delete(req: OllamaDeleteRequest, request: Request) -> Response:
    """Remove a registry model (unloading it first when idle)."""
    models = _state(request).models
    ref = _registry_ref(models, req.model)
    served = models.find(req.model)
    if served is not None:
        if served.name == models.default or served.active or served.engine.num_requests:
            raise bad_request(f"model '{req.model}' is in use; it cannot be deleted now", "model")
        models.unload(served)
    assert models.store is not None
    await asyncio.to_thread(models.store.remove, ref)
    return Response(status_code=200)


@router.post("/api/copy", responses=ERRORS)
async def copy(req: OllamaCopyRequest, request: Request) -> Response:
    """Give a registry model a second name (no data is copied)."""
    models = _state(request).models
    src = _registry_ref(models, req.source)
    try:
        dst = ModelRef.parse(req.destination)
    except RegistryError as e:
        raise bad_request(str(e), "destination") from e
    assert models.store is not None
    try:
        await asyncio.to_thread(models.store.copy, src, dst)
    except RegistryError as e:
        raise bad_request(str(e), "destination") from e
    return Response(status_code=200)


def _registry_ref(models: ModelManager, name: str) -> ModelRef:
    if models.store is None:
        raise bad_request("this server has no model registry")
    try:
        ref = ModelRef.parse(name)
    except RegistryError as e:
        raise bad_request(str(e), "model") from e
    if not models.store.exists(ref):
        raise not_found(name)
    return ref


@router.get("/api/version", response_model=OllamaVersionResponse)
async def version() -> OllamaVersionResponse:
    """The Ollama API version this server speaks (public, like Ollama's)."""
    return OllamaVersionResponse(version=OLLAMA_VERSION)


async def _embedder(state: AppState, name: str) -> Embedder:
    base, _, tag = name.lower().partition(":")
    if base in EMBEDDING_NAMES and tag in EMBEDDING_TAGS:
        return state.models.embedder
    await resolve(state.models, name)  # 404 for a name served nowhere
    raise bad_request(f"model '{name}' does not support embeddings; use all-minilm", "model")


@router.post("/api/embed", response_model=OllamaEmbedResponse, responses=ERRORS)
async def embed(req: OllamaEmbedRequest, request: Request) -> OllamaEmbedResponse:
    """Unit-length all-MiniLM-L6-v2 vectors (384 dimensions) for one text or many."""
    started = time.time()
    embedder = await _embedder(_state(request), req.model)
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if len(texts) > 2048:
        raise bad_request("input holds more than 2048 texts", "input")
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise bad_request(f"this model produces {embedder.dim}-dimensional embeddings", "dimensions")
    vectors: list[list[float]] = []
    tokens = 0
    if texts:
        if not req.truncate:
            limit = await asyncio.to_thread(lambda: embedder.max_tokens)
            # count_tokens caps at the limit, so a text that reaches it may be longer: refuse it
            counts = await asyncio.to_thread(lambda: [embedder.count_tokens([t]) for t in texts])
            if any(c >= limit for c in counts):
                raise bad_request(f"input length exceeds the context length ({limit} tokens); send truncate: true to cut it", "input")
        vectors = await asyncio.to_thread(embedder.embed, texts)
        tokens = await asyncio.to_thread(embedder.count_tokens, texts)
    return OllamaEmbedResponse(model=req.model, embeddings=vectors, total_duration=_ns(time.time() - started), load_duration=0,
                               prompt_eval_count=tokens)


@router.post("/api/embeddings", response_model=OllamaEmbeddingsResponse, responses=ERRORS)
async def embeddings(req: OllamaEmbeddingsRequest, request: Request) -> OllamaEmbeddingsResponse:
    """The older single-text endpoint: `{"embedding": [...]}` (empty for an empty prompt)."""
    embedder = await _embedder(_state(request), req.model)
    if not req.prompt:
        return OllamaEmbeddingsResponse(embedding=[])
    vectors = await asyncio.to_thread(embedder.embed, [req.prompt])
    return OllamaEmbeddingsResponse(embedding=vectors[0])
