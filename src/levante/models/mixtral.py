"""Mixtral: the Llama/Mistral decoder with a sparse mixture-of-experts MLP."""

from __future__ import annotations

from torch import nn

from levante.config import TransformerConfig
from levante.layers.moe import SparseMoE
from levante.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, cfg: TransformerConfig) -> nn.Module:
        return SparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok)
