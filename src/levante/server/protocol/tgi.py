"""Text Generation Inference (TGI 2.x/3.x) request and response schemas.

Field names, defaults and bounds follow TGI's router (`GenerateParameters`, `Details`,
`StreamResponse`, `Info`, `SimpleToken`). Differences are stated on the fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

FinishReason = Literal["length", "eos_token", "stop_sequence"]

MAX_STOP_SEQUENCES = 16
MAX_TOP_N_TOKENS = 5


def _utf8(value: str) -> str:
    value.encode("utf-8")  # a lone surrogate is a valid JSON escape but not text: UnicodeEncodeError -> 400
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class TGIParameters(BaseModel):
    # Clients send fields we do not use (TGI keeps adding some): accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 (or null) is supported.")
    temperature: float | None = Field(None, gt=0, le=100, description="Strictly positive; giving it turns sampling on.")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    top_k: int | None = Field(None, gt=0, le=1 << 20, description="Giving it turns sampling on.")
    top_p: float | None = Field(None, gt=0, lt=1, description="In (0, 1); giving it turns sampling on.")
    typical_p: float | None = Field(
        None, gt=0, le=1, description="Accepted for compatibility and ignored (no typical sampling); giving it turns sampling on, as in TGI."
    )
    do_sample: bool = Field(False, description="Sample; otherwise greedy unless temperature/top_k/top_p/typical_p is given (TGI's rule).")
    max_new_tokens: int | None = Field(
        100, ge=1, le=1 << 20, description="Default 100; null fills the context window (TGI 3 behaviour)."
    )
    return_full_text: bool | None = Field(None, description="Prepend the prompt to generated_text. Default false.")
    stop: list[Text] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES, description="Stop sequences, kept in the output as TGI does.")
    truncate: int | None = Field(None, ge=1, le=1 << 24, description="Keep only the last `truncate` prompt tokens.")
    watermark: bool = Field(False, description="Accepted and ignored.")
    details: bool = False
    decoder_input_details: bool = Field(False, description="Prompt tokens with their logprobs in details.prefill (not when streaming).")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Sampling seed; a random one is drawn (and reported) when sampling without one.")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    grammar: dict[str, Any] | None = Field(None, description="Not supported: a request with a grammar is refused.")
    adapter_id: str | None = Field(None, max_length=256, description="Not supported: LoRA adapters are not served.")


class TGIGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Text = Field(min_length=1, description="The prompt, used as is (no chat template).")
    parameters: TGIParameters = Field(default_factory=lambda: TGIParameters.model_validate({}))
    add_special_tokens: bool = Field(True, description="Add the model's BOS token as its tokenizer does.")


class TGICompatRequest(TGIGenerateRequest):
    stream: bool = Field(False, description="Stream server-sent events (as /generate_stream) instead of returning JSON.")


class TGITokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Text = Field(min_length=1)
    add_special_tokens: bool = True
    parameters: TGIParameters | None = Field(None, description="Accepted and ignored.")


# ---- responses ------------------------------------------------------------------------------


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class TGIPrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first prompt token.")


class TGIDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = Field(description="The seed sampling used; null for greedy decoding.")
    prefill: list[TGIPrefillToken]
    tokens: list[TGIToken]
    top_tokens: list[list[TGIToken]] | None = Field(None, description="Present when top_n_tokens > 0.")


class TGIGenerateResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = Field(None, description="Present when details or decoder_input_details is true.")


class TGIStreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class TGIStreamResponse(BaseModel):
    """One server-sent event; the last one carries generated_text (and details if asked)."""

    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None = Field(None, description="Present when top_n_tokens > 0.")
    generated_text: str | None = None
    details: TGIStreamDetails | None = None


class TGIInfo(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_input_tokens: int
    max_input_length: int = Field(description="Legacy name of max_input_tokens (TGI < 2.1).")
    max_total_tokens: int
    max_client_batch_size: int = 1
    validation_workers: int = 1
    router: str = "levante"
    version: str
    sha: str | None = None
    docker_label: str | None = None


class TGISimpleToken(BaseModel):
    id: int
    text: str
    start: int = Field(description="Character offset in inputs where the token starts.")
    stop: int = Field(description="Character offset in inputs where the token ends.")


class TGIErrorResponse(BaseModel):
    error: str
    error_type: str
