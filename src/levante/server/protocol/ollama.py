"""Ollama API request and response schemas (docs/api.md; what the `ollama` Python client 0.6 sends and parses).

Durations are nanoseconds; times are RFC 3339. Unknown fields and options are accepted and
ignored, as Ollama does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

OLLAMA_VERSION = "0.6.8"  # the Ollama server version this API matches


def _utf8(value: str) -> str:
    value.encode("utf-8")  # a lone surrogate is a valid JSON escape but not text: UnicodeEncodeError -> 400
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OllamaOptions(_Request):
    """Runtime options. Defaults when absent are Ollama's: temperature 0.8, top_k 40, top_p 0.9.

    `repeat_penalty` applies to the whole prompt and output (`repeat_last_n` is ignored), so it
    defaults to 1.0 (off) rather than Ollama's 1.1 over the last 64 tokens. Other llama.cpp
    options (num_keep, num_batch, num_gpu, num_thread, mirostat, tfs_z, typical_p, ...) are ignored.
    """

    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1 << 20, description="0 disables top-k.")
    min_p: float | None = Field(None, ge=0, le=1)
    num_predict: int | None = Field(None, ge=-2, le=1 << 20, description="-1: no limit, -2: fill the context; 0 is refused.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="A negative seed means random.")
    stop: Text | list[Text] | None = Field(None, description="Up to 16 stop strings.")
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    num_ctx: int | None = Field(None, ge=1, le=1 << 24, description="Context window for this request; at most the served model's.")


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = ""
    images: list[str] | None = Field(None, description="Not supported: a message with images is refused.")


FormatType = str | dict[str, Any] | None
KeepAlive = str | float | None


class _Generating(_Request):
    model: Text = Field(
        min_length=1, max_length=256, examples=["smollm2:latest"], description="'name' or 'name:tag'; 'name' means 'name:latest'."
    )
    stream: bool = Field(True, description="NDJSON stream of partial responses (the default) or one JSON object.")
    format: FormatType = Field(None, description='"json" constrains the output to a JSON object; JSON schemas are refused.')
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = Field(
        None, description="How long the model stays loaded when idle: seconds, or '5m', '1h'; 0 unloads after this request; "
        "-1 keeps it loaded. The server's default model never unloads."
    )
    think: bool | str | None = Field(None, description="Not supported: thinking is refused.")


class OllamaChatRequest(_Generating):
    messages: list[OllamaMessage] | None = Field(None, description="Empty or absent: just report the model loaded.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: a non-empty list is refused.")
    logprobs: bool | None = Field(None, description="Not supported on this API (use /v1/chat/completions).")


class OllamaGenerateRequest(_Generating):
    prompt: Text | None = Field(None, description="Empty or absent: just report the model loaded.")
    system: Text | None = None
    template: str | None = Field(None, description="Not supported: the model's own chat format is used.")
    context: list[int] | None = Field(None, max_length=1 << 20, description="Token ids from a previous response, prepended to the prompt.")
    raw: bool = Field(False, description="Send the prompt as is, without the chat format.")
    suffix: str | None = Field(None, description="Not supported (fill-in-the-middle).")
    images: list[str] | None = Field(None, description="Not supported.")
    logprobs: bool | None = Field(None, description="Not supported on this API (use /v1/completions).")


class OllamaShowRequest(_Request):
    model: Text | None = Field(None, max_length=256, examples=["smollm2:latest"], description="Required unless name is given.")
    name: Text | None = Field(None, max_length=256, description="Older clients' name for model.")
    verbose: bool = False


class OllamaEmbedRequest(_Request):
    model: Text = Field(min_length=1, max_length=256, examples=["all-minilm"], description="all-minilm (all-MiniLM-L6-v2).")
    input: Text | list[Text] = Field(description="Text or texts (up to 2048).")
    truncate: bool = Field(True, description="Cut inputs to the model's 256 tokens; false refuses longer inputs.")
    dimensions: int | None = Field(None, ge=1, le=1 << 16)
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class OllamaEmbeddingsRequest(_Request):
    model: Text = Field(min_length=1, max_length=256, examples=["all-minilm"])
    prompt: Text = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


# ---- responses ------------------------------------------------------------------------------


class OllamaModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModelTag(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTagsResponse(BaseModel):
    models: list[OllamaModelTag]


class OllamaRunningModel(OllamaModelTag):
    expires_at: str
    size_vram: int
    context_length: int


class OllamaPullRequest(_Request):
    model: Text = Field(min_length=1, max_length=256, examples=["smollm2"])
    insecure: bool = False
    stream: bool = True


class OllamaDeleteRequest(_Request):
    model: Text = Field(min_length=1, max_length=256)


class OllamaCopyRequest(_Request):
    source: Text = Field(min_length=1, max_length=256)
    destination: Text = Field(min_length=1, max_length=256)


class OllamaStatus(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class OllamaPsResponse(BaseModel):
    models: list[OllamaRunningModel]


class OllamaShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaAssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Timings(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = Field(None, description='"stop", "length", or "load"/"unload" for a request with no input.')
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(_Timings):
    """One NDJSON line when streaming (done false, then a final done true with timings), or the whole reply."""

    message: OllamaAssistantMessage


class OllamaGenerateResponse(_Timings):
    response: str
    context: list[int] | None = Field(None, description="On the final object: prompt and output token ids, to continue from.")


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(BaseModel):
    embedding: list[float]


class OllamaVersionResponse(BaseModel):
    version: str


class OllamaErrorResponse(BaseModel):
    error: str
