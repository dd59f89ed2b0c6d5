"""Truss / Baseten `POST /predict` and the Ray Serve example's `GET /infer`.

`/predict` takes what the Mistral/Mixtral Truss examples take (`prompt`, `stream`, `max_tokens`,
vLLM sampling fields). The prompt goes through the model's chat format as one user message, as
those Trusses wrap it in `[INST] ... [/INST]`; `"raw": true` sends it as is, and `messages` sends
a whole conversation. With `stream` the body is the generated text in plain-text chunks, nothing
else, as the Mixtral vLLM Truss yields it; without, it is `{"output": text}`. Baseten's URL forms
(`/production/predict`, `/model_versions/{id}/predict`, ...) are accepted as aliases, and its
`Authorization: Api-Key <key>` header works like any other key header.

`GET /infer?sentence=...` is the data-on-eks Mistral Ray Serve ingress: the sentence as a user
message through the chat format, the reply as a one-element JSON list of strings (the example
returned a list of decoded sequences; here the element holds only the reply, without the prompt
or special tokens, so the example's Gradio client shows it unchanged). Greedy by default; up to
512 new tokens (the example's `sequence_length`), capped by the context window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from levante.loaders.chat_template import Message
from levante.sampling_params import SamplingParams
from levante.server.errors import bad_request
from levante.server.middleware import response_id
from levante.server.protocol.openai import ErrorResponse
from levante.server.protocol.truss import (
    DEFAULT_INFER_MAX_TOKENS,
    DEFAULT_PREDICT_MAX_TOKENS,
    PredictRequest,
    PredictResponse,
    Text,
)
from levante.server.serving import Generation, ServedModel
from levante.server.state import AppState

logger = logging.getLogger("levante.server")

router = APIRouter(tags=["Truss / Ray Serve"])

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}
TEXT_STREAM = {"text/plain": {"schema": {"type": "string"}}}
BASETEN_ALIASES = (
    "/production/predict",
    "/development/predict",
    "/environments/{environment}/predict",
    "/deployment/{deployment_id}/predict",
    "/model_versions/{version_id}/predict",
    "/models/{model_id}/predict",
)


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.levante
    return state


def _prompt_ids(served: ServedModel, req: PredictRequest) -> list[int]:
    if req.messages is not None:
        if req.prompt is not None:
            raise bad_request("give either prompt or messages, not both", "messages")
        if req.raw:
            raise bad_request("raw applies to prompt only; messages always go through the chat format", "raw")
        messages: list[Message] = [{"role": m.role, "content": m.content} for m in req.messages]
        return served.encode_chat(messages)
    if req.prompt is None:
        raise bad_request("prompt is required (or messages)", "prompt")
    if req.raw:
        return served.loaded.tokenizer.encode(req.prompt, add_special_tokens=True)
    return served.encode_chat([{"role": "user", "content": req.prompt}])


def _sampling(req: PredictRequest) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise bad_request("stop: at most 16 stop strings", "stop")
    try:
        return SamplingParams(
            temperature=0.0 if req.do_sample is False else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k or -1,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            max_tokens=req.max_tokens or req.max_new_tokens or DEFAULT_PREDICT_MAX_TOKENS,
            stop=stop,
        )
    except ValueError as e:
        raise bad_request(str(e)) from e


async def _text_chunks(gen: Generation) -> AsyncIterator[str]:
    """Only the generated text: a failure mid-stream aborts the connection, so a cut-off text is never taken for a whole one."""
    try:
        async for out in gen.stream():
            text = out.outputs[0].text
            if text:
                yield text
    except Exception as e:
        logger.warning("predict stream failed: %s", e)
        raise


async def predict(req: PredictRequest, request: Request) -> Any:
    """Generate a reply to `prompt` (through the chat format unless `raw`) or to `messages`."""
    state = _state(request)
    served = await state.models.get(req.model)
    params = _sampling(req)
    ids = await asyncio.to_thread(_prompt_ids, served, req)
    gen = Generation(served, state.metrics, state.config.retry_after)
    gen.start({"prompt_token_ids": ids}, params, response_id(request, "predict"))
    if req.stream:
        return StreamingResponse(_text_chunks(gen), media_type="text/plain; charset=utf-8", headers={"X-Accel-Buffering": "no"})
    out = await gen.collect(request)
    return PredictResponse(output=out.outputs[0].text)


router.add_api_route(
    "/predict", predict, methods=["POST"], response_model=PredictResponse, responses={**ERRORS, 200: {"content": TEXT_STREAM}}
)
for _path in BASETEN_ALIASES:
    router.add_api_route(_path, predict, methods=["POST"], response_model=PredictResponse, include_in_schema=False)


@router.get("/infer", response_model=list[str], responses=ERRORS)
async def infer(
    request: Request,
    sentence: Annotated[Text, Query(min_length=1, description="The user's message.")],
    max_tokens: Annotated[int | None, Query(ge=1, le=1 << 20, description=f"New tokens; default {DEFAULT_INFER_MAX_TOKENS}.")] = None,
    temperature: Annotated[float, Query(ge=0, le=100, description="0 (the default) is greedy.")] = 0.0,
    seed: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
) -> list[str]:
    """The Ray Serve example's ingress: a reply to `sentence`, as a one-element list."""
    state = _state(request)
    served = await state.models.get(None)
    ids = await asyncio.to_thread(served.encode_chat, [{"role": "user", "content": sentence}])
    limit = max_tokens or max(1, min(DEFAULT_INFER_MAX_TOKENS, served.max_model_len - len(ids)))
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=limit)
    gen = Generation(served, state.metrics, state.config.retry_after)
    out = await gen.start({"prompt_token_ids": ids}, params, response_id(request, "infer")).collect(request)
    return [out.outputs[0].text]
