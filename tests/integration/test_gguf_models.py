"""The GGUF path gives the same model as the HF folder path, with transformers as the oracle.

Tiny random Llama, Mistral and Mixtral HF folders (tests/conftest.py) are converted to GGUF by
our own small converter (tests/_gguf_convert.py: llama.cpp's names, q/k row permutation, `llama.*`
keys, SentencePiece vocabulary), then loaded by levante and compared with transformers on the
original folder: logits, parameters, config, greedy tokens, and the errors a bad file gives.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from _gguf_convert import convert, write_hf_folder
from levante import LLM, SamplingParams
from levante.loaders.errors import WeightsError
from levante.loaders.gguf import GGUFFile
from levante.loaders.tokenizer import load_tokenizer

F32, F16, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0
LLM_ARGS = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 8, "weight_format": "native"}  # exact, for bit-level checks


@dataclass(frozen=True)
class Converted:
    folder: Path  # the HF folder the GGUF was written from
    gguf: Path
    weights: dict[str, np.ndarray]  # what the GGUF holds, dequantised, in HF names and layout


@pytest.fixture(scope="module")
def to_gguf(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Converted]:
    cache: dict[str, Converted] = {}

    def make(kind: str, *, qtype: GGMLQuantizationType = F32, stacked: bool = False, **overrides: object) -> Converted:
        key = repr((kind, qtype, stacked, sorted(overrides.items())))
        if key not in cache:
            folder = tiny_model(kind, **overrides)
            out = tmp_path_factory.mktemp(f"gguf-{kind}") / f"tiny-{kind}.{qtype.name}.gguf"
            cache[key] = Converted(folder, out, convert(folder, out, qtype=qtype, stacked_experts=stacked))
        return cache[key]

    return make


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ F32: exact against transformers

F32_CASES = {
    "llama": ("llama", False),
    "mistral": ("mistral", False),
    "mixtral-per-expert": ("mixtral", False),
    "mixtral-stacked": ("mixtral", True),
}


@pytest.mark.parametrize("case", list(F32_CASES))
def test_f32_gguf_logits_match_transformers(to_gguf: Callable[..., Converted], case: str) -> None:
    kind, stacked = F32_CASES[case]
    conv = to_gguf(kind, stacked=stacked)
    with GGUFFile(conv.gguf) as f:  # the file really has the layout this case is about
        names = set(f.tensors)
        assert f.metadata["general.architecture"] == "llama"
    if kind == "mixtral":
        assert ("blk.1.ffn_gate_exps.weight" in names) == stacked
        assert ("blk.1.ffn_gate.3.weight" in names) == (not stacked)

    ids = prompt(40, seed=1)
    llm = LLM(str(conv.gguf), **LLM_ARGS)
    got = llm.score({"prompt_token_ids": ids})
    assert max_diff(got, reference_logits(conv.folder, ids)) <= 1e-4

    loaded = llm.engine.loaded
    assert loaded.config.model_type == kind
    assert loaded.quantization == "F32"
    if kind == "mistral":
        assert loaded.config.sliding_window == 16  # and the 40-token prompt crosses it
    if kind == "mixtral":
        assert (loaded.config.num_experts, loaded.config.num_experts_per_tok) == (4, 2)

    # Same model, bit for bit, as the HF folder path builds (fused qkv / gate_up / stacked experts).
    from_folder = LLM(str(conv.folder), **LLM_ARGS).engine.loaded.model.state_dict()
    from_gguf = loaded.model.state_dict()
    assert from_folder.keys() == from_gguf.keys()
    for name, tensor in from_folder.items():
        assert torch.equal(tensor, from_gguf[name]), name


# ------------------------------------------------------------------ F16 / Q8_0


@pytest.mark.parametrize(
    ("kind", "stacked", "qtype"), [("llama", False, F16), ("mistral", False, Q8_0), ("mixtral", True, Q8_0)]
)
def test_quantised_gguf_matches_transformers_on_dequantised_weights(
    to_gguf: Callable[..., Converted],
    tmp_path: Path,
    kind: str,
    stacked: bool,
    qtype: GGMLQuantizationType,
) -> None:
    """Exact check: transformers runs on the weights gguf-py's own dequantiser reads back from the file.

    Then the rounding itself is bounded against the unquantised model. F16 keeps 11 significant
    bits (relative error <= 2^-11 per weight); Q8_0 rounds each weight to 1/127 of its 32-block's
    largest magnitude (~1% of a Gaussian weight's spread). Through two layers that moves logits
    by ~0.05% (F16) and ~1.5% (Q8_0) of their spread on average (measured): the bounds below leave
    a margin of 3-10x. The largest single change is bounded for dense models only: in Mixtral a
    router choosing between two near-equal experts may legitimately flip at one position and move
    its logits by O(1) (measured 0.8 once); the exact check already covers the MoE path.
    """
    conv = to_gguf(kind, qtype=qtype, stacked=stacked)
    llm = LLM(str(conv.gguf), **LLM_ARGS)
    assert llm.engine.loaded.quantization == qtype.name

    ids = prompt(40, seed=2)
    got = llm.score({"prompt_token_ids": ids})
    dequantised = write_hf_folder(conv.folder, conv.weights, tmp_path / "dequantised")
    assert max_diff(got, reference_logits(dequantised, ids)) <= 1e-4

    unquantised = reference_logits(conv.folder, ids)
    rel = 0.005 if qtype == F16 else 0.05
    assert (got - unquantised).abs().mean().item() <= rel * unquantised.std().item()
    if kind != "mixtral":
        assert max_diff(got, unquantised) <= 2 * rel * unquantised.abs().max().item()
    # Random weights put near-ties among 32000 logits; Q8_0 flipped 2 of 40 argmaxes here, F16 none.
    assert (got.argmax(-1) == unquantised.argmax(-1)).float().mean().item() >= 0.9


# ------------------------------------------------------------------ config mapping


def test_config_read_from_gguf_metadata(to_gguf: Callable[..., Converted]) -> None:
    conv = to_gguf("llama", tie_word_embeddings=True, rope_theta=50000.0, rms_norm_eps=1e-6, num_key_value_heads=1)
    with GGUFFile(conv.gguf) as f:
        assert "output.weight" not in f.tensors  # a tied head is not written

    llm = LLM(str(conv.gguf), **LLM_ARGS)
    loaded = llm.engine.loaded
    cfg = loaded.config
    assert cfg.model_type == "llama"
    assert cfg.tie_word_embeddings
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    assert cfg.rope_theta == 50000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 16)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size) == (64, 128, 2, 32000)
    assert cfg.max_position_embeddings == 512
    assert cfg.sliding_window is None and cfg.num_experts == 0
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)

    ids = prompt(40, seed=3)
    assert max_diff(llm.score({"prompt_token_ids": ids}), reference_logits(conv.folder, ids)) <= 1e-4

    # The vocabulary embedded in the GGUF tokenizes as the folder's tokenizer.model does.
    folder_tok = load_tokenizer(conv.folder)
    for text in ["Hello world", " Café déjà vu\n\tdef f(x): return x ** 2", "日本語 🤖"]:
        assert llm.tokenizer.encode(text) == folder_tok.encode(text), text


# ------------------------------------------------------------------ bad files


def message(err: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    """The error's text with the file's path taken out (the path holds the test's name), checked to be there."""
    text = str(err.value)
    assert str(path) in text, text
    return text.replace(str(path), "<path>")


def bad_gguf(conv: Converted, tmp_path: Path, **kwargs: object) -> Path:
    out = tmp_path / "bad.gguf"
    convert(conv.folder, out, **kwargs)  # type: ignore[arg-type]
    return out


def test_missing_layer_tensor_is_named(to_gguf: Callable[..., Converted], tmp_path: Path) -> None:
    path = bad_gguf(to_gguf("llama"), tmp_path, drop=frozenset({"blk.1.attn_output.weight"}))
    with pytest.raises(WeightsError) as err:
        LLM(str(path), **LLM_ARGS)
    assert "layers.1.self_attn.o_proj.weight" in message(err, path)


def test_missing_part_of_fused_tensor_is_named(to_gguf: Callable[..., Converted], tmp_path: Path) -> None:
    path = bad_gguf(to_gguf("llama"), tmp_path, drop=frozenset({"blk.1.attn_v.weight"}))
    with pytest.raises(WeightsError) as err:
        LLM(str(path), **LLM_ARGS)
    text = message(err, path)
    assert "layers.1.self_attn.qkv_proj" in text and "'v'" in text


def test_missing_expert_is_named(to_gguf: Callable[..., Converted], tmp_path: Path) -> None:
    path = bad_gguf(to_gguf("mixtral"), tmp_path, drop=frozenset({"blk.0.ffn_up.2.weight"}))
    with pytest.raises(WeightsError) as err:
        LLM(str(path), **LLM_ARGS)
    assert "layers.0.mlp.w13" in message(err, path)


def test_wrong_shape_gives_both_shapes(to_gguf: Callable[..., Converted], tmp_path: Path) -> None:
    def narrow(name: str, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w[:, :96]) if name == "blk.0.ffn_down.weight" else w

    path = bad_gguf(to_gguf("llama"), tmp_path, edit=narrow)
    with pytest.raises(WeightsError) as err:
        LLM(str(path), **LLM_ARGS)
    text = message(err, path)
    assert "(64, 96)" in text and "(64, 128)" in text


def test_wrong_q_rows_give_weights_error(to_gguf: Callable[..., Converted], tmp_path: Path) -> None:
    def short(name: str, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w[:60]) if name == "blk.0.attn_q.weight" else w

    path = bad_gguf(to_gguf("llama"), tmp_path, edit=short)
    with pytest.raises(WeightsError, match=r"\(60, 64\)"):
        LLM(str(path), **LLM_ARGS)


@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
def test_too_many_experts_give_weights_error(
    to_gguf: Callable[..., Converted], tmp_path: Path, stacked: bool
) -> None:
    def extra(name: str, w: np.ndarray) -> np.ndarray:
        return np.concatenate([w, w[:1]]) if name == "blk.0.ffn_gate_exps.weight" else w

    conv = to_gguf("mixtral")
    if stacked:  # [5, ff, hidden] for a 4-expert config
        path = bad_gguf(conv, tmp_path, stacked_experts=True, edit=extra)
    else:  # a stray fifth expert
        path = bad_gguf(conv, tmp_path, extra={"blk.0.ffn_gate.4.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(WeightsError, match="expert"):
        LLM(str(path), **LLM_ARGS)


def test_unsupported_architecture_is_named(to_gguf: Callable[..., Converted], tmp_path: Path) -> None:
    path = bad_gguf(to_gguf("llama"), tmp_path, arch="gpt2")
    with pytest.raises(ValueError) as err:  # WeightsError is a ValueError
        LLM(str(path), **LLM_ARGS)
    assert "'gpt2'" in message(err, path)


def pickle_folder(tmp_path: Path, config: Path | None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        shutil.copy(config, folder / "config.json")
    # Never unpickled: the bytes only need to exist. (A real one would run code when loaded.)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95not really a pickle")
    return folder


def test_pickle_checkpoint_is_refused(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    folder = pickle_folder(tmp_path, tiny_model("llama") / "config.json")
    with pytest.raises(WeightsError) as err:
        LLM(str(folder), **LLM_ARGS)
    assert "pickle" in message(err, folder / "pytorch_model.bin")


def test_folder_holding_only_a_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = pickle_folder(tmp_path, None)
    with pytest.raises(WeightsError) as err:
        LLM(str(folder), **LLM_ARGS)
    assert "pickle" in message(err, folder)


# ------------------------------------------------------------------ greedy generation


@pytest.mark.parametrize(("kind", "stacked"), [("mistral", False), ("mixtral", True)], ids=["mistral", "mixtral"])
def test_greedy_generation_from_gguf_equals_hf_folder(
    to_gguf: Callable[..., Converted], kind: str, stacked: bool
) -> None:
    from transformers import AutoModelForCausalLM

    conv = to_gguf(kind, stacked=stacked)
    ids = prompt(20, seed=4)  # + 12 new tokens crosses Mistral's window of 16
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    from_gguf = LLM(str(conv.gguf), **LLM_ARGS).generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    from_folder = LLM(str(conv.folder), **LLM_ARGS).generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    assert len(from_gguf) == 12
    assert from_gguf == from_folder

    ref = AutoModelForCausalLM.from_pretrained(conv.folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    assert from_gguf == expected
