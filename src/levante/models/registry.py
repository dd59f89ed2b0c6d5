"""Architecture name -> model class."""

from __future__ import annotations

from levante.config import TransformerConfig
from levante.models.llama import LlamaForCausalLM
from levante.models.mixtral import MixtralForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,  # Mistral is Llama with GQA and a sliding window, both read from config
    "mixtral": MixtralForCausalLM,
}


def model_class(cfg: TransformerConfig) -> type[LlamaForCausalLM]:
    if cfg.num_experts:
        return MixtralForCausalLM
    return MODEL_CLASSES[cfg.model_type]
