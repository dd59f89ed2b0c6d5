"""Test helper: write a GGUF file from a tiny HF model folder the way llama.cpp lays one out.

Our own small converter, written from the GGUF conventions (not copied from llama.cpp's
``convert_hf_to_gguf.py``):

* ``general.architecture`` is ``llama`` for Llama, Mistral and Mixtral alike; hyper-parameters
  live under ``llama.*`` keys (Mixtral adds ``expert_count`` / ``expert_used_count``).
* Tensor names are GGUF's (``blk.N.attn_q.weight`` ...). Mixtral experts are written either one
  tensor per expert (``blk.N.ffn_gate.E.weight``, older converters) or stacked into
  ``blk.N.ffn_gate_exps.weight`` of numpy shape ``[n_expert, out, in]`` (current converters).
* q/k rows are permuted from HF's rotate-half layout to the interleaved pairs ggml's rope uses:
  ``w.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)``.
* The vocabulary is GGUF's ``llama`` (SentencePiece) kind, read from the folder's
  ``tokenizer.model`` with gguf-py's own ``SentencePieceVocab`` (the same three lines as
  ``write_gguf_metadata`` in ``tests/unit/test_tokenizer.py``, which writes a whole file itself and
  so cannot be reused inside this writer).

``convert`` returns the weights the GGUF *effectively* holds, in HF names and layout (dequantised
with ``gguf.quants.dequantize``, q/k rows put back), so a quantised file can be checked exactly
against transformers run on those same weights.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from safetensors.numpy import load_file, save_file

# HF name <-> GGUF name; `{0}` is the layer, `{1}` the expert.
NAMES: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{0}.input_layernorm.weight", "blk.{0}.attn_norm.weight"),
    ("model.layers.{0}.post_attention_layernorm.weight", "blk.{0}.ffn_norm.weight"),
    ("model.layers.{0}.self_attn.q_proj.weight", "blk.{0}.attn_q.weight"),
    ("model.layers.{0}.self_attn.k_proj.weight", "blk.{0}.attn_k.weight"),
    ("model.layers.{0}.self_attn.v_proj.weight", "blk.{0}.attn_v.weight"),
    ("model.layers.{0}.self_attn.o_proj.weight", "blk.{0}.attn_output.weight"),
    ("model.layers.{0}.mlp.gate_proj.weight", "blk.{0}.ffn_gate.weight"),
    ("model.layers.{0}.mlp.up_proj.weight", "blk.{0}.ffn_up.weight"),
    ("model.layers.{0}.mlp.down_proj.weight", "blk.{0}.ffn_down.weight"),
    ("model.layers.{0}.block_sparse_moe.gate.weight", "blk.{0}.ffn_gate_inp.weight"),
    ("model.layers.{0}.block_sparse_moe.experts.{1}.w1.weight", "blk.{0}.ffn_gate.{1}.weight"),
    ("model.layers.{0}.block_sparse_moe.experts.{1}.w2.weight", "blk.{0}.ffn_down.{1}.weight"),
    ("model.layers.{0}.block_sparse_moe.experts.{1}.w3.weight", "blk.{0}.ffn_up.{1}.weight"),
]
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|down|up)\.(\d+)\.weight")
_STACKED = re.compile(r"blk\.(\d+)\.ffn_(gate|down|up)_exps\.weight")


def _regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", r"(\d+)"))


_TO_GGUF = [(_regex(h), g) for h, g in NAMES]
_TO_HF = [(_regex(g), h) for h, g in NAMES]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in rules:
        m = pattern.fullmatch(name)
        if m:
            return template.format(*m.groups())
    raise KeyError(f"no mapping for tensor {name!r}")


def gguf_name(hf: str) -> str:
    return _rename(hf, _TO_GGUF)


def hf_name(gguf_tensor: str) -> str:
    return _rename(gguf_tensor, _TO_HF)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> ggml's interleaved pairs, per head."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hparams(cfg: Mapping[str, Any]) -> dict[str, Any]:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return {
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or hidden // heads),
        "rope_theta": float(rope),
    }


def _store(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """(array to write, float32 values it decodes to)."""
    if qtype == GGMLQuantizationType.F32:
        stored = np.ascontiguousarray(data, dtype=np.float32)
        return stored, stored
    stored = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
    decoded = gguf.quants.dequantize(stored, qtype).reshape(data.shape).astype(np.float32)
    return stored, decoded


def convert(
    folder: Path,
    out: Path,
    *,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    stacked_experts: bool = False,
    sliding_window: bool = True,
    arch: str = "llama",
    drop: frozenset[str] = frozenset(),
    edit: Callable[[str, np.ndarray], np.ndarray] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write ``out`` from the HF ``folder``; return the effective weights in HF names (see module doc).

    ``qtype`` applies to the matrices (2-D and stacked 3-D, except the MoE router, which llama.cpp
    keeps in F32 too); norms stay F32. ``drop`` omits GGUF tensors by name and ``edit(name, array)``
    may replace one before it is stored; ``extra`` adds F32 tensors as given (all three for the
    error tests; edited and extra tensors are left out of the returned weights).
    """
    cfg = json.loads((folder / "config.json").read_text())
    hp = _hparams(cfg)
    state = load_file(str(folder / "model.safetensors"))
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # llama.cpp writes no output.weight for a tied head

    tensors: dict[str, np.ndarray] = {}
    for name, w in state.items():
        g = gguf_name(name)
        if g.endswith("attn_q.weight"):
            w = permute_rotary(w, hp["heads"])
        elif g.endswith("attn_k.weight"):
            w = permute_rotary(w, hp["kv_heads"])
        tensors[g] = w
    if stacked_experts:
        tensors = _stack_experts(tensors, int(cfg["num_local_experts"]))

    writer = gguf.GGUFWriter(str(out), arch=arch)
    _write_hparams(writer, cfg, hp, sliding_window)
    _write_vocab(writer, folder)
    effective: dict[str, np.ndarray] = {}
    for name, w in sorted(tensors.items()):
        if name in drop:
            continue
        original = w
        if edit is not None:
            w = edit(name, w)
        matrix = w.ndim >= 2 and "ffn_gate_inp" not in name
        stored, decoded = _store(w, qtype if matrix else GGMLQuantizationType.F32)
        raw = qtype if matrix and qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None
        writer.add_tensor(name, stored, raw_dtype=raw)
        if w is original:  # an edited tensor may no longer have a shape HF could hold
            effective.update(_back_to_hf(name, decoded, hp))
    for name, w in (extra or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return effective


def _stack_experts(tensors: dict[str, np.ndarray], n_expert: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    groups: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, w in tensors.items():
        m = _PER_EXPERT.fullmatch(name)
        if m:
            groups.setdefault((m[1], m[2]), {})[int(m[3])] = w
        else:
            out[name] = w
    for (layer, kind), experts in groups.items():
        out[f"blk.{layer}.ffn_{kind}_exps.weight"] = np.stack([experts[e] for e in range(n_expert)])
    return out


def _back_to_hf(name: str, w: np.ndarray, hp: Mapping[str, Any]) -> dict[str, np.ndarray]:
    m = _STACKED.fullmatch(name)
    if m:
        w_name = {"gate": "w1", "down": "w2", "up": "w3"}[m[2]]
        return {
            f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{w_name}.weight": np.ascontiguousarray(w[e])
            for e in range(w.shape[0])
        }
    if name.endswith("attn_q.weight"):
        w = unpermute_rotary(w, hp["heads"])
    elif name.endswith("attn_k.weight"):
        w = unpermute_rotary(w, hp["kv_heads"])
    return {hf_name(name): np.ascontiguousarray(w)}


def _write_hparams(writer: gguf.GGUFWriter, cfg: Mapping[str, Any], hp: Mapping[str, Any], window: bool) -> None:
    writer.add_name("tiny")
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_vocab_size(int(cfg["vocab_size"]))
    if cfg.get("num_local_experts"):
        writer.add_expert_count(int(cfg["num_local_experts"]))
        writer.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    if window and cfg.get("sliding_window"):
        writer.add_sliding_window(int(cfg["sliding_window"]))


def _write_vocab(writer: gguf.GGUFWriter, folder: Path) -> None:
    vocab = gguf.vocab.SentencePieceVocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write_hf_folder(src: Path, weights: Mapping[str, np.ndarray], out: Path) -> Path:
    """A copy of the HF folder ``src`` holding ``weights`` instead (transformers' reference for a quantised GGUF)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(src / name, out / name)
    save_file(dict(weights), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
