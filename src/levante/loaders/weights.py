"""Weight-name mapping (declarative tables) and loading into a model built on the meta device.

Every source is first expressed in HF names (`model.layers.0.self_attn.q_proj.weight`);
one table then maps HF names onto our parameters, several of which are fused
(`qkv_proj` = q|k|v rows, `gate_up_proj` = gate|up rows, Mixtral experts stacked).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from levante.config import TransformerConfig
from levante.layers.block_quant import BlockQuant, quantize_blocks
from levante.loaders.errors import WeightsError
from levante.loaders.gguf import GGUFFile

# GGUF tensor name -> HF tensor name. `{0}`, `{1}` are the regex groups.
GGUF_TO_HF: list[tuple[str, str]] = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{0}.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{0}.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{0}.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", "model.layers.{0}.block_sparse_moe.gate.weight"),
    # Mixtral experts, one tensor per expert (older converters)...
    (r"blk\.(\d+)\.ffn_gate\.(\d+)\.weight", "model.layers.{0}.block_sparse_moe.experts.{1}.w1.weight"),
    (r"blk\.(\d+)\.ffn_down\.(\d+)\.weight", "model.layers.{0}.block_sparse_moe.experts.{1}.w2.weight"),
    (r"blk\.(\d+)\.ffn_up\.(\d+)\.weight", "model.layers.{0}.block_sparse_moe.experts.{1}.w3.weight"),
    # ... or stacked [n_expert, out, in] (current converters); split per expert with `{e}`.
    (r"blk\.(\d+)\.ffn_gate_exps\.weight", "model.layers.{0}.block_sparse_moe.experts.{e}.w1.weight"),
    (r"blk\.(\d+)\.ffn_down_exps\.weight", "model.layers.{0}.block_sparse_moe.experts.{e}.w2.weight"),
    (r"blk\.(\d+)\.ffn_up_exps\.weight", "model.layers.{0}.block_sparse_moe.experts.{e}.w3.weight"),
]

# Tensors some files carry that the model derives itself.
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|rope_freqs\.weight)$")


@dataclass(frozen=True)
class Target:
    """Where an HF tensor goes: a parameter, optionally one expert of a stacked parameter, optionally a row block."""

    param: str
    expert: int | None = None
    rows: str | None = None  # "q", "k", "v" of qkv_proj; "gate", "up" of gate_up_proj or w13


# HF tensor name -> Target. `{0}` is the layer, `{1}` the expert.
HF_TO_PARAM: list[tuple[str, Target]] = [
    (r"model\.embed_tokens\.weight", Target("embed_tokens.weight")),
    (r"model\.norm\.weight", Target("norm.weight")),
    (r"lm_head\.weight", Target("lm_head.weight")),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", Target("layers.{0}.input_layernorm.weight")),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", Target("layers.{0}.post_attention_layernorm.weight")),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", Target("layers.{0}.self_attn.qkv_proj.weight", rows="q")),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", Target("layers.{0}.self_attn.qkv_proj.weight", rows="k")),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", Target("layers.{0}.self_attn.qkv_proj.weight", rows="v")),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", Target("layers.{0}.self_attn.o_proj.weight")),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", Target("layers.{0}.mlp.gate_up_proj.weight", rows="gate")),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", Target("layers.{0}.mlp.gate_up_proj.weight", rows="up")),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", Target("layers.{0}.mlp.down_proj.weight")),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", Target("layers.{0}.mlp.gate.weight")),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", Target("layers.{0}.mlp.w13", rows="gate")),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", Target("layers.{0}.mlp.w13", rows="up")),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", Target("layers.{0}.mlp.w2")),
]

_GGUF_RULES = [(re.compile(p), t) for p, t in GGUF_TO_HF]
_HF_RULES = [(re.compile(p), t) for p, t in HF_TO_PARAM]


def hf_target(name: str) -> Target | None:
    """Map an HF tensor name to our parameter; None for tensors we derive or do not use."""
    for pattern, target in _HF_RULES:
        m = pattern.fullmatch(name)
        if m:
            groups = m.groups()
            expert = int(groups[1]) if len(groups) > 1 else None
            return Target(target.param.format(*groups), expert, target.rows)
    return None


def _row_slice(target: Target, cfg: TransformerConfig) -> slice:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size
    return {
        None: slice(None),
        "q": slice(0, q),
        "k": slice(q, q + kv),
        "v": slice(q + kv, q + 2 * kv),
        "gate": slice(0, inter),
        "up": slice(inter, 2 * inter),
    }[target.rows]


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the q/k row permutation llama.cpp's converter applies (interleaved pairs -> HF's rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


PROJECTIONS = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight")


def is_projection(param: str) -> bool:
    """A Linear weight the block-quantised kernels can take from the file's blocks (not the MoE router, not experts)."""
    return param.endswith(PROJECTIONS) or param == "lm_head.weight"


def iter_gguf_weights(
    gguf: GGUFFile, cfg: TransformerConfig, dtype: torch.dtype, skip_projections: bool = False
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield (HF name, tensor dequantised to `dtype`) for every tensor of a GGUF file, q/k rows un-permuted.

    `skip_projections`: projections come as (name, None), not dequantised: the block-quantised kernels
    read them from the file (GGUFBlocks), and a 7B model's float copy would not fit next to them."""
    for name in gguf.tensors:
        hf = _gguf_to_hf(name)
        if hf is None:
            if IGNORED.fullmatch(name):
                continue
            raise WeightsError(f"{gguf.path}: unexpected tensor {name!r} for a {cfg.model_type} model")
        target = hf_target(hf) if "{e}" not in hf else None
        if skip_projections and target is not None and target.expert is None and is_projection(target.param):
            yield hf, None
            continue
        tensor = gguf.load(name, dtype)
        heads = cfg.num_heads if hf.endswith("q_proj.weight") else cfg.num_kv_heads if hf.endswith("k_proj.weight") else 0
        if heads:
            expected = (heads * cfg.head_dim, cfg.hidden_size)
            if tuple(tensor.shape) != expected:
                raise WeightsError(f"{gguf.path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected} from the config")
            tensor = unpermute_rotary(tensor, heads)
        if "{e}" in hf:
            for e in range(tensor.shape[0]):
                yield hf.replace("{e}", str(e)), tensor[e]
        else:
            yield hf, tensor


def _gguf_to_hf(name: str) -> str | None:
    for pattern, template in _GGUF_RULES:
        m = pattern.fullmatch(name)
        if m:
            return template.replace("{e}", "\0").format(*m.groups()).replace("\0", "{e}")
    return None


def load_weights(
    model: nn.Module,
    cfg: TransformerConfig,
    weights: Iterable[tuple[str, torch.Tensor | None]],
    dtype: torch.dtype,
    device: torch.device,
    source: str,
) -> None:
    """Materialise the meta-device `model` from HF-named tensors.

    A tensor that fills a whole parameter and already has the right dtype and device is
    adopted as is (no copy); fused and stacked parameters are allocated once and filled
    slice by slice.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, set[tuple[int | None, str | None]]] = {}
    tied = cfg.tie_word_embeddings
    for hf_name, tensor in weights:
        target = hf_target(hf_name)
        if target is None:
            if IGNORED.fullmatch(hf_name):
                continue
            raise WeightsError(f"{source}: unexpected tensor {hf_name!r} for a {cfg.model_type} model")
        if tied and target.param == "lm_head.weight":
            continue  # some checkpoints store the tied head too; the embedding is the one we use
        if target.param not in params:
            raise WeightsError(f"{source}: tensor {hf_name!r} has no matching parameter {target.param!r}")
        param = params[target.param]
        if tensor is None:  # left in the file (a projection its blocks will replace): an empty placeholder
            if param.is_meta:
                params[target.param] = _set_param(model, target.param, torch.empty(0, dtype=dtype, device=device))
            filled.setdefault(target.param, set()).add((target.expert, target.rows))
            continue
        view_shape = param.shape[1:] if target.expert is not None else param.shape
        rows = _row_slice(target, cfg)
        expected = torch.Size([len(range(*rows.indices(view_shape[0]))), *view_shape[1:]])
        if tensor.shape != expected:
            raise WeightsError(
                f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)} from the config"
            )
        if target.expert is not None and not 0 <= target.expert < param.shape[0]:
            raise WeightsError(f"{source}: tensor {hf_name!r} is expert {target.expert}, but the config has {param.shape[0]} experts")
        whole = target.expert is None and target.rows is None
        if param.is_meta:
            if whole and tensor.dtype == dtype and tensor.device == device and tensor.is_contiguous():
                param = _set_param(model, target.param, tensor)
            else:
                param = _set_param(model, target.param, torch.empty(param.shape, dtype=dtype, device=device))
            params[target.param] = param
        if not whole or param.data_ptr() != tensor.data_ptr():
            dest = param.data[target.expert] if target.expert is not None else param.data
            dest[rows].copy_(tensor)
        filled.setdefault(target.param, set()).add((target.expert, target.rows))
    if tied:
        model.get_submodule("lm_head").weight = model.get_submodule("embed_tokens").weight
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise WeightsError(f"{source}: missing weights for {len(missing)} parameters, e.g. {missing[:3]}")
    _check_parts_complete(filled, cfg, source)


def _set_param(model: nn.Module, name: str, data: torch.Tensor) -> nn.Parameter:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = nn.Parameter(data, requires_grad=False)
    setattr(module, leaf, param)
    return param


def _check_parts_complete(filled: dict[str, set[tuple[int | None, str | None]]], cfg: TransformerConfig, source: str) -> None:
    """A fused parameter allocated but only partly written would hold garbage: refuse it."""
    for name, parts in filled.items():
        rows: tuple[str | None, ...] = (None,)
        if "qkv_proj" in name:
            rows = ("q", "k", "v")
        elif "gate_up_proj" in name or name.endswith("w13"):
            rows = ("gate", "up")
        experts: Iterable[int | None] = range(cfg.num_experts) if name.endswith(("w13", "w2")) else (None,)
        missing = {(e, r) for e in experts for r in rows} - parts
        if missing:
            raise WeightsError(f"{source}: parameter {name} is only partly present in the checkpoint (missing {sorted(missing, key=str)[:3]})")


class GGUFBlocks:
    """The stored blocks (w = d * q + m per 32 inputs) of a GGUF file's projections, by our parameter name.

    Fused parameters (qkv_proj, gate_up_proj) are assembled from their parts, q/k rows un-permuted as
    for the float weights; a tied LM head is the embedding's blocks. A part of a type without such blocks
    (Q6_K, Q2_K, F16, ...) is quantised here to 8-bit blocks; `get` gives None for a parameter without a
    GGUF source of its own (Mixtral experts).
    """

    def __init__(self, path: str | Path, cfg: TransformerConfig) -> None:
        self.gguf = GGUFFile(path)
        self.cfg = cfg
        self.sources: dict[str, list[tuple[str | None, str]]] = {}  # param -> [(rows, gguf tensor)]
        for name in self.gguf.tensors:
            hf = _gguf_to_hf(name)
            target = hf_target(hf) if hf is not None and "{e}" not in hf else None
            if target is None or target.expert is not None:
                continue
            params = [target.param]
            if target.param == "embed_tokens.weight" and cfg.tie_word_embeddings:
                params = ["lm_head.weight"]
            elif target.param == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            for param in params:
                self.sources.setdefault(param, []).append((target.rows, name))

    def get(self, param: str) -> BlockQuant | None:
        parts = self.sources.get(param)
        if not parts:
            return None
        order = {None: 0, "q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}
        loaded = []
        for rows, name in sorted(parts, key=lambda p: order[p[0]]):
            bq = self.gguf.load_blocks(name)
            if bq is None:  # Q6_K, Q2_K, F16, ...: quantised here, in 8 bits
                bq = quantize_blocks(self.gguf.load(name, torch.float32), 8)
            heads = self.cfg.num_heads if rows == "q" else self.cfg.num_kv_heads if rows == "k" else 0
            if heads:
                bq = BlockQuant(unpermute_rotary(bq.q, heads), unpermute_rotary(bq.d, heads), unpermute_rotary(bq.m, heads), bq.bits)
            loaded.append(bq)
        return loaded[0] if len(loaded) == 1 else BlockQuant.cat(loaded)

    def close(self) -> None:
        self.gguf.close()
