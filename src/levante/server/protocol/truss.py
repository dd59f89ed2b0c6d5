"""Truss / Baseten `/predict` and the Ray Serve example's `/infer`: request and response schemas."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

DEFAULT_PREDICT_MAX_TOKENS = 512  # the Mistral/Mixtral Truss examples' default
DEFAULT_INFER_MAX_TOKENS = 512  # the Ray Serve example's sequence_length (it counted the prompt too)


def _utf8(value: str) -> str:
    value.encode("utf-8")  # a lone surrogate is a valid JSON escape but not text: UnicodeEncodeError -> 400
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class TrussMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class PredictRequest(BaseModel):
    """What the Truss examples take. vLLM-style names, plus the transformers-style aliases some Trusses use."""

    # Trusses forward whatever the client sends to their engine; unknown fields are ignored here.
    model_config = ConfigDict(extra="ignore")

    prompt: Text | None = Field(None, description="Sent as a user message through the model's chat format unless raw is true.")
    messages: list[TrussMessage] | None = Field(None, min_length=1, description="A conversation instead of prompt.")
    raw: bool = Field(False, description="Use prompt as is, without the chat format.")
    stream: bool = Field(False, description="Stream the generated text as plain text chunks.")
    model: Text | None = Field(None, max_length=256, description="Served model name; the default model when omitted.")
    max_tokens: int | None = Field(None, ge=1, le=1 << 20, description=f"New tokens; default {DEFAULT_PREDICT_MAX_TOKENS}.")
    max_new_tokens: int | None = Field(None, ge=1, le=1 << 20, description="Alias of max_tokens.")
    temperature: float = Field(1.0, ge=0, le=100, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 20)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    do_sample: bool | None = Field(None, description="false is greedy (transformers-style Trusses).")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Text | list[Text] | None = Field(None, description="Up to 16 stop strings, not included in the output.")


class PredictResponse(BaseModel):
    output: str

