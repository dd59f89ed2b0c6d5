"""Our forward pass against transformers' reference implementation on the same weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from levante import LLM, SamplingParams


def _reference_logits(path: Path, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
    with torch.no_grad():
        return ref(ids.unsqueeze(0)).logits[0].float()


@pytest.mark.parametrize("kind", ["llama", "mistral", "mixtral"])
def test_tiny_model_logits_match_transformers(tiny_model: Callable[..., Path], kind: str) -> None:
    path = tiny_model(kind)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (48,), generator=gen)  # 48 > the Mistral sliding window of 16
    expected = _reference_logits(path, ids)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=8)
    got = llm.score({"prompt_token_ids": ids.tolist()})
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    # Chunked prefill reads earlier chunks back from the paged cache: same logits.
    chunked = llm.score({"prompt_token_ids": ids.tolist()}, chunk_size=7)
    assert (chunked - expected).abs().max().item() <= 1e-4
    assert llm.engine.block_manager.num_free_blocks == 32


def test_sharded_checkpoint_matches_transformers(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """A folder saved in several safetensors shards with their index (as Mistral 7B ships) loads like one file."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    source = tiny_model("mistral")
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(sharded, max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really split
    ids = torch.randint(3, 32000, (24,), generator=torch.Generator().manual_seed(5))
    expected = _reference_logits(source, ids)
    got = LLM(str(sharded), dtype="float32", num_kv_blocks=32, block_size=8).score({"prompt_token_ids": ids.tolist()})
    assert (got - expected).abs().max().item() <= 1e-4


def test_rope_scaling_and_tied_embeddings_match_transformers(tiny_model: Callable[..., Path]) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    path = tiny_model("llama", rope_scaling=scaling, rope_theta=500000.0, tie_word_embeddings=True)
    ids = torch.randint(3, 32000, (40,), generator=torch.Generator().manual_seed(2))
    expected = _reference_logits(path, ids)
    got = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=8).score({"prompt_token_ids": ids.tolist()})
    assert (got - expected).abs().max().item() <= 1e-4


def test_bfloat16_tracks_float32(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("mistral")
    ids = torch.randint(3, 32000, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = LLM(str(path), dtype="float32", num_kv_blocks=16, block_size=8).score({"prompt_token_ids": ids})
    got = LLM(str(path), dtype="bfloat16", num_kv_blocks=16, block_size=8).score({"prompt_token_ids": ids})
    # bfloat16 keeps 8 bits of mantissa: compare relative to the logit scale.
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf: Path) -> object:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_gguf: Path) -> LLM:
    # "native": the exact path (the default "auto" runs this Q4_1 file's decode on int4/int8 kernels; see below)
    return LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory=256 << 20, max_model_len=2048, weight_format="native")


def test_smollm2_logits_match_transformers_on_same_gguf(smollm2_reference: object, smollm2_llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = smollm2_llm.encode_chat(messages)
    with torch.no_grad():
        expected = smollm2_reference(torch.tensor([ids])).logits[0].float()  # type: ignore[operator]
    got = smollm2_llm.score({"prompt_token_ids": ids})
    assert (got - expected).abs().max().item() <= 1e-3  # 30 layers of float32 accumulate ~1e-4 per layer at most


def test_smollm2_greedy_reply_matches_transformers(smollm2_reference: object, smollm2_llm: LLM) -> None:
    messages = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a storm."}]
    ids = smollm2_llm.encode_chat(messages)
    with torch.no_grad():
        expected = smollm2_reference.generate(  # type: ignore[attr-defined]
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),  # pad id == <|im_end|>: HF would mask it out
            max_new_tokens=64,
            do_sample=False,
        )[0, len(ids) :].tolist()
    out = smollm2_llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=64))
    assert len(expected) == 64  # the story is longer than 64 tokens: no early EOS on either side
    assert out[0].outputs[0].token_ids == expected
    assert out[0].outputs[0].text == smollm2_llm.tokenizer.decode(expected)


def test_smollm2_auto_weights_stay_close_to_the_exact_path(smollm2_llm: LLM, smollm2_gguf: Path) -> None:
    """The default weight format on a Q4_1 file (int4 projections reproducing the file, an int8 LM head) against
    the exact path, on the text the benchmark measures perplexity on: its log-likelihood within 1%, and both
    decode kernels (int4 for one row, the GEMM for many) give the same next-token choices."""
    auto = LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory=256 << 20, max_model_len=2048)
    assert auto.engine.config.weight_format == "auto"
    text = (Path(__file__).parents[2] / "bench" / "data" / "perplexity.txt").read_text()
    ids = auto.tokenizer.encode(text)[:512]
    target = torch.tensor(ids[1:])[:, None]

    def mean_logprob(llm: LLM) -> float:
        logprobs = torch.log_softmax(llm.score({"prompt_token_ids": ids})[:-1], dim=-1)
        return logprobs.gather(1, target).mean().item()

    exact, quantised = mean_logprob(smollm2_llm), mean_logprob(auto)
    print(f"mean log-prob: native {exact:.4f}, auto {quantised:.4f}")
    assert abs(quantised - exact) <= 0.01 * abs(exact)
    prompt = {"prompt_token_ids": ids[:40]}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = auto.generate(prompt, params)[0].outputs[0].token_ids  # one row per step: int4 kernels
    batched = auto.generate([prompt] * 12, params)[0].outputs[0].token_ids  # 12 rows per step: the GEMM
    assert alone == batched
