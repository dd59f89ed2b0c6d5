"""Levante: self-hosted inference for Mistral-family language models."""

from levante.llm import LLM
from levante.outputs import CompletionOutput, Logprob, RequestOutput
from levante.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "__version__"]
