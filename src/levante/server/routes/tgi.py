"""Text Generation Inference routes: /generate, /generate_stream, POST / (TGI's compat route), /info, /tokenize.

What `huggingface_hub.InferenceClient(base_url=...)` and the `text-generation` client send and
parse. TGI's rules kept: sampling only when `do_sample` or one of temperature/top_k/top_p/
typical_p is given (greedy otherwise); a sampled request without a seed gets a random one,
reported in `details.seed`; stop sequences stay in the generated text; token texts are the
model's own pieces, special tokens included (`special: true`, as TGI streams `</s>`).

Differences: errors are 400 (TGI: 422) with TGI's `{"error", "error_type"}` body; `max_new_tokens`
defaults to 100; `return_full_text` defaults to false on POST / too (TGI derives that default from
the Hub's pipeline tag, which a local model does not have); `typical_p` and `watermark` are
accepted and ignored; `grammar`, adapters and `best_of` > 1 are refused.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from levante import __version__
from levante.engine.detokenizer import IncrementalDetokenizer
from levante.loaders.tokenizer import Tokenizer
from levante.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from levante.sampling_params import SamplingParams
from levante.server.errors import APIError, bad_request
from levante.server.middleware import response_id
from levante.server.protocol.tgi import (
    FinishReason,
    TGICompatRequest,
    TGIErrorResponse,
    TGIGenerateRequest,
    TGIGenerateResponse,
    TGIInfo,
    TGIParameters,
    TGISimpleToken,
    TGITokenizeRequest,
)
from levante.server.serving import Generation, ServedModel
from levante.server.state import AppState

router = APIRouter(tags=["TGI"])

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": TGIErrorResponse} for code in (400, 401, 413, 429, 503)}
# Each event is `data:` + a TGIStreamResponse object.
STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.levante
    return state


def _lp(value: float) -> float:
    return max(value, -9999.0)  # -inf is not JSON


class TokenTexts:
    """Each generated token's text as TGI reports it: decoded in context, special tokens spelled out.

    A token that ends inside a multi-byte character gets "" and the token completing it gets
    the character, so the texts of the non-special tokens join to the generated text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
        self._ids: list[int] = []

    def next(self, token_id: int) -> str:
        self._ids.append(token_id)
        self._detok.add(self._ids)
        return self._detok.take(finished=False)

    def flush(self) -> str:
        """Whatever an incomplete trailing character decodes to."""
        self._detok.flush(self._ids)
        return self._detok.take(finished=True)


def _entries(o: CompletionOutput) -> list[PositionLogprobs | None]:
    if o.logprobs is None:
        return [None] * len(o.token_ids)
    return list(o.logprobs)


def _finish_reason(o: CompletionOutput) -> FinishReason:
    if o.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(o.stop_reason, str) else "eos_token"


def _sampling(p: TGIParameters, want_logprobs: bool) -> tuple[SamplingParams, int | None]:
    """SamplingParams and the seed to report (None for greedy)."""
    if p.grammar is not None:
        raise bad_request("grammar is not supported", "grammar")
    if p.adapter_id:
        raise bad_request(f"adapter {p.adapter_id!r} is not served here: LoRA adapters are not supported", "adapter_id")
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    seed = (p.seed if p.seed is not None else secrets.randbelow(2**63)) if sampling else None
    try:
        params = SamplingParams(
            temperature=(p.temperature or 1.0) if sampling else 0.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k or -1,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            seed=seed,
            max_tokens=p.max_new_tokens,
            stop=list(p.stop),
            include_stop_str_in_output=True,
            logprobs=(p.top_n_tokens or 0) if want_logprobs else None,
            prompt_logprobs=0 if p.decoder_input_details else None,
        )
    except ValueError as e:
        raise bad_request(str(e)) from e
    return params, seed


def _prompt_ids(served: ServedModel, inputs: str, add_special_tokens: bool, p: TGIParameters) -> list[int]:
    """Tokenise, truncate from the left, and check the budget with TGI's messages."""
    ids = served.loaded.tokenizer.encode(inputs, add_special_tokens=add_special_tokens)
    total = served.max_model_len
    if p.truncate is not None:
        if p.truncate >= total:
            raise bad_request(f"`truncate` must be strictly positive and less than {total}. Given: {p.truncate}", "truncate")
        ids = ids[-p.truncate :]
    if not ids:
        raise bad_request("`inputs` cannot be empty", "inputs")
    if len(ids) >= total:
        raise bad_request(f"`inputs` must have less than {total} tokens. Given: {len(ids)}", "inputs")
    if p.max_new_tokens is not None and len(ids) + p.max_new_tokens > total:
        raise bad_request(
            f"`inputs` tokens + `max_new_tokens` must be <= {total}. Given: {len(ids)} `inputs` tokens and "
            f"{p.max_new_tokens} `max_new_tokens`",
            "max_new_tokens",
        )
    return ids


async def _start(req: TGIGenerateRequest, request: Request, stream: bool) -> tuple[Generation, ServedModel, int | None]:
    state = _state(request)
    served = await state.models.get(None)
    p = req.parameters
    if stream and p.decoder_input_details:
        raise bad_request("`decoder_input_details` == true is not supported when streaming tokens", "decoder_input_details")
    params, seed = _sampling(p, want_logprobs=stream or p.details or p.decoder_input_details)
    ids = await asyncio.to_thread(_prompt_ids, served, req.inputs, req.add_special_tokens, p)
    gen = Generation(served, state.metrics, state.config.retry_after)
    gen.start({"prompt_token_ids": ids, "prompt": req.inputs}, params, response_id(request, "tgi"))
    return gen, served, seed


def _token(tokenizer: Tokenizer, token_id: int, text: str, entry: PositionLogprobs | None) -> dict[str, Any]:
    logprob = _lp(entry[token_id].logprob) if entry is not None and token_id in entry else None
    return {"id": token_id, "text": text, "logprob": logprob, "special": tokenizer.is_special(token_id)}


def _top_tokens(tokenizer: Tokenizer, entry: PositionLogprobs | None, n: int) -> list[dict[str, Any]]:
    if entry is None:
        return []
    ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None and lp.rank <= n))
    return [{"id": t, "text": tokenizer.token_text(t), "logprob": _lp(v), "special": tokenizer.is_special(t)} for _, t, v in ranked]


def _details(out: RequestOutput, o: CompletionOutput, p: TGIParameters, seed: int | None, tokenizer: Tokenizer) -> dict[str, Any]:
    texts = TokenTexts(tokenizer)
    entries = _entries(o)
    tokens = [_token(tokenizer, t, texts.next(t), e) for t, e in zip(o.token_ids, entries, strict=False)]
    prefill = []
    if p.decoder_input_details:
        plps: list[PositionLogprobs | None] = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        for t, e in zip(out.prompt_token_ids, plps, strict=False):
            prefill.append({"id": t, "text": tokenizer.token_text(t), "logprob": _lp(e[t].logprob) if e and t in e else None})
    details: dict[str, Any] = {
        "finish_reason": _finish_reason(o), "generated_tokens": len(o.token_ids), "seed": seed,
        "prefill": prefill, "tokens": tokens,
    }
    if p.top_n_tokens:
        details["top_tokens"] = [_top_tokens(tokenizer, e, p.top_n_tokens) for e in entries]
    return details


async def _generate_json(req: TGIGenerateRequest, request: Request) -> dict[str, Any]:
    gen, served, seed = await _start(req, request, stream=False)
    out = await gen.collect(request)
    o = out.outputs[0]
    p = req.parameters
    body: dict[str, Any] = {"generated_text": (req.inputs if p.return_full_text else "") + o.text}
    if p.details or p.decoder_input_details:
        body["details"] = _details(out, o, p, seed, served.loaded.tokenizer)
    return body


def _sse(data: dict[str, Any]) -> str:
    return f"data:{json.dumps(data, ensure_ascii=False)}\n\n"


async def _event_stream(gen: Generation, tokenizer: Tokenizer, req: TGIGenerateRequest, seed: int | None) -> AsyncIterator[str]:
    p = req.parameters
    texts = TokenTexts(tokenizer)
    generated = ""
    index = 0
    done = False
    try:
        async for out in gen.stream():
            o = out.outputs[0]
            generated += o.text
            entries = _entries(o)
            for k, (token_id, entry) in enumerate(zip(o.token_ids, entries, strict=False)):
                index += 1
                last = o.finished and k == len(o.token_ids) - 1
                event: dict[str, Any] = {"index": index, "token": _token(tokenizer, token_id, texts.next(token_id), entry)}
                if p.top_n_tokens:
                    event["top_tokens"] = _top_tokens(tokenizer, entry, p.top_n_tokens)
                event["generated_text"] = ((req.inputs if p.return_full_text else "") + generated) if last else None
                event["details"] = None
                if last and p.details:
                    event["details"] = {"finish_reason": _finish_reason(o), "generated_tokens": index, "seed": seed,
                                        "input_length": len(out.prompt_token_ids)}
                done = done or last
                yield _sse(event)
    except APIError as e:
        yield _sse({"error": e.message, "error_type": "overloaded" if e.status in (429, 503) else "generation"})
        return
    if not done:
        yield _sse({"error": "Incomplete generation", "error_type": "incomplete_generation"})


async def _generate_stream(req: TGIGenerateRequest, request: Request) -> StreamingResponse:
    gen, served, seed = await _start(req, request, stream=True)
    return StreamingResponse(
        _event_stream(gen, served.loaded.tokenizer, req, seed), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
    )


@router.post("/generate", response_model=TGIGenerateResponse, responses=ERRORS)
async def generate(req: TGIGenerateRequest, request: Request) -> JSONResponse:
    """Generate text from `inputs` (no chat template)."""
    return JSONResponse(await _generate_json(req, request))


@router.post("/generate_stream", responses={**ERRORS, 200: {"content": STREAM}})
async def generate_stream(req: TGIGenerateRequest, request: Request) -> StreamingResponse:
    """Server-sent events, one per generated token; the last carries generated_text."""
    return await _generate_stream(req, request)


@router.post("/", response_model=list[TGIGenerateResponse], responses={**ERRORS, 200: {"content": STREAM}})
async def compat_generate(req: TGICompatRequest, request: Request) -> Any:
    """TGI's compat route (what `InferenceClient(base_url=...).text_generation` calls): a one-element list, or SSE with `stream`."""
    if req.stream:
        return await _generate_stream(req, request)
    return JSONResponse([await _generate_json(req, request)])


@router.get("/info", response_model=TGIInfo)
async def info(request: Request) -> TGIInfo:
    served = await _state(request).models.get(None)
    sched = served.engine_config.scheduler
    total = served.max_model_len
    return TGIInfo(
        model_id=served.name, model_dtype=str(served.loaded.dtype), model_device_type=served.loaded.device.type,
        max_concurrent_requests=sched.max_num_seqs + sched.max_waiting, max_input_tokens=total - 1,
        max_input_length=total - 1, max_total_tokens=total, version=__version__,
    )


def token_offsets(tokenizer: Tokenizer, inputs: str, add_special_tokens: bool) -> list[TGISimpleToken]:
    """Each token with the character span of `inputs` it covers.

    Spans come from decoding the tokens incrementally (special tokens spelled out) and measuring
    the text so far. Tokens the tokenizer adds (BOS) cover nothing: start == stop. A token ending
    inside a multi-byte character covers nothing either; the token completing it takes it. If the
    tokenizer does not reproduce `inputs` exactly (normalisation), text is the decoded text.
    """
    core = tokenizer.encode(inputs, add_special_tokens=False)
    full = tokenizer.encode(inputs, add_special_tokens=True) if add_special_tokens else core
    lead = next((i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core), 0)
    texts = TokenTexts(tokenizer)
    pieces = [texts.next(t) for t in core]
    if pieces:
        pieces[-1] += texts.flush()
    spans = []
    pos = 0
    for piece in pieces:
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    decoded = "".join(pieces)
    source = inputs if decoded == inputs else decoded
    result = [TGISimpleToken(id=t, text="", start=0, stop=0) for t in full[:lead]]
    result += [TGISimpleToken(id=t, text=source[a:b], start=a, stop=b) for t, (a, b) in zip(core, spans, strict=True)]
    result += [TGISimpleToken(id=t, text="", start=pos, stop=pos) for t in full[lead + len(core) :]]
    return result


@router.post("/tokenize", response_model=list[TGISimpleToken], responses=ERRORS)
async def tokenize(req: TGITokenizeRequest, request: Request) -> list[TGISimpleToken]:
    """The token ids of `inputs` with the character span each covers."""
    served = await _state(request).models.get(None)
    return await asyncio.to_thread(token_offsets, served.loaded.tokenizer, req.inputs, req.add_special_tokens)
