"""The Llama-family decoder: Llama 2/3, SmolLM2, Mistral (GQA, sliding window). Mixtral reuses it with an MoE MLP.

Tokens of all sequences in a step are flattened into one `[T]` batch; attention metadata
says which belong together and where their K/V live in the paged cache.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import TransformerConfig
from levante.layers.attention import AttentionMetadata, PagedAttention
from levante.layers.cpu_kernels import CpuKernels
from levante.layers.linear import Linear
from levante.layers.norm import RMSNorm
from levante.layers.rotary import RotaryEmbedding, StepRope


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window)
        self.kernels: CpuKernels | None = None  # fused rotary + cache write on CPU, bound by the model runner

    def forward(self, x: torch.Tensor, rope: StepRope, meta: AttentionMetadata, residual: torch.Tensor) -> torch.Tensor:
        # x: [T, D] (normalised), residual: [T, D] -> residual + attention output
        qkv = self.qkv_proj(x)  # [T, q + 2 kv]
        T = qkv.shape[0]
        if self.kernels is not None:  # rotates q and k in place and writes k, v into their cache slots
            attn = self.attn
            self.kernels.rope_store(
                qkv, rope.table, rope.positions, meta.slot_mapping, attn.k_cache, attn.v_cache, self.num_heads, self.num_kv_heads
            )
            q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim)
            qk = rope.rotate(qk)  # q and k heads side by side: one rotation for both
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, H, hd], [T, Hkv, hd]
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta, stored=self.kernels is not None), residual)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.kernels: CpuKernels | None = None  # fused silu * up on CPU, bound by the model runner

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # x: [T, D] (normalised), residual: [T, D] -> residual + MLP output
        gate_up = self.gate_up_proj(x)  # [T, 2 I]
        if self.kernels is not None:
            return self.down_proj(self.kernels.silu_mul(gate_up), residual)
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, rope: StepRope, meta: AttentionMetadata) -> torch.Tensor:
        # The residual adds happen in the output projections (fused into the GEMM where it can).
        x = self.self_attn(self.input_layernorm(x), rope, meta, residual=x)
        return cast(torch.Tensor, self.mlp(self.post_attention_layernorm(x), residual=x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.make_mlp(cfg)) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = cast(nn.Parameter, self.embed_tokens.weight)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.kernels: CpuKernels | None = None
        self.decode_plan: list[list[torch.Tensor]] | None = None  # see use_cpu_kernels

    def make_mlp(self, cfg: TransformerConfig) -> nn.Module:
        return MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, D]
        x = self.embed_tokens(input_ids)
        if self.decode_plan is not None and self.kernels is not None and meta.num_decode == x.shape[0]:
            return self.norm(self._fused_decode(x, positions, meta))
        rope = self.rotary.step(positions, x.dtype, lookup=self.kernels is None)  # once per step, for every layer
        for layer in self.layers:
            x = layer(x, rope, meta)
        return self.norm(x)

    def _fused_decode(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # A decode-only step on the CPU: every layer in one native call, the same ops as the modules run.
        assert self.kernels is not None and self.decode_plan is not None
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        cfg = self.config
        return self.kernels.decode_layers(
            x, self.decode_plan, meta.decode_block_tables, meta.decode_context_lens, positions, meta.slot_mapping,
            self.rotary.cos_sin, cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.head_dim**-0.5, cfg.sliding_window,
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, D] -> logits: [N, V] in float32 for the sampler
        return self.lm_head(hidden).float()

    def use_cpu_kernels(self, kernels: CpuKernels | None, attention: bool = True) -> None:
        """Run norms, rotary + cache writes, silu * up (and, with `attention`, paged attention) on the
        fused CPU kernels; None returns every layer to the portable torch ops."""
        self.kernels = kernels
        for module in self.modules():
            if isinstance(module, RMSNorm | Attention | MLP):
                module.kernels = kernels
            elif isinstance(module, PagedAttention):
                module.kernels = kernels if attention else None
        self.decode_plan = self._decode_plan() if kernels is not None and attention else None

    def _decode_plan(self) -> list[list[torch.Tensor]] | None:
        """Each layer's tensors for `CpuKernels.decode_layers` (call after the weights and caches are final);
        None when a layer has something the fused step does not run (an MoE MLP, torch's int4/int8 weights)."""
        plan = []
        for layer in self.layers:
            layer = cast(DecoderLayer, layer)
            if not isinstance(layer.mlp, MLP):
                return None
            attn = layer.self_attn
            tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight, attn.attn.k_cache, attn.attn.v_cache]
            for linear in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                parts = linear.fused_operands()
                if parts is None:
                    return None
                tensors.extend(parts)
            plan.append(tensors)
        return plan

    def attention_layers(self) -> list[PagedAttention]:
        return [cast(DecoderLayer, layer).self_attn.attn for layer in self.layers]
