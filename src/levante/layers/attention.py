"""Attention over a paged KV cache.

The cache of one layer is two tensors: values `[num_blocks, num_kv_heads, block_size, head_dim]`
and keys `[num_blocks, num_kv_heads, head_dim, block_size]`, i.e. transposed within each block
(a block's keys for one dimension are contiguous: decode attention computes 16 keys' scores
per vector instruction, and each head's block is one contiguous run that it streams).
A sequence owns a list of block ids (its block table); token `i` of the sequence lives
in block `block_table[i // block_size]` at offset `i % block_size`, i.e. at flat slot
`block_table[i // block_size] * block_size + i % block_size`.

Example with block_size=4 and block_table=[7, 2]: tokens 0..3 go to slots 28..31,
tokens 4..5 to slots 8..9. Writing K/V for the step's new tokens uses `slot_mapping`
(one flat slot per new token); reading gathers the blocks of the table in order.

A step mixes decode tokens (one per sequence, batched into one SDPA call) and prefill
chunks (one SDPA call per chunk; a chunk after cached context reads that context back
from the cache, which is what makes chunked prefill and prefix caching work). On CPU the
native kernels replace both: `paged_decode` for the decodes and one `paged_prefill` call
for all the chunks of the step, each reading K/V through the block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from levante.layers.cpu_kernels import CpuKernels


@dataclass
class PrefillChunk:
    """`q_len` new tokens of one sequence, whose full context (cached + new) is `ctx_len` tokens."""

    q_start: int  # offset of the chunk in the step's flat token list
    q_len: int
    ctx_len: int
    block_table: torch.Tensor  # [num_blocks_of_seq] int64 on the model device


@dataclass
class AttentionMetadata:
    """Per-step cache metadata, built by the model runner and passed down explicitly."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    num_decode: int = 0  # the first `num_decode` tokens are single-token decodes
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor | None = None  # [B] int64, including the new token
    decode_max_len: int = 0
    prefills: list[PrefillChunk] = field(default_factory=list)
    # The same chunks as tensors, for the native prefill kernel: [C, 3] int64 rows (q_start, q_len,
    # ctx_len), and their block tables [C, max_blocks] int64 (padded with 0).
    prefill_chunks: torch.Tensor | None = None
    prefill_tables: torch.Tensor | None = None


class PagedAttention(nn.Module):
    """Scaled dot-product attention with GQA and an optional sliding window, reading K/V from the paged cache."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        # Bound by the model runner when it allocates the pool.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.kernels: CpuKernels | None = None  # the native paged attention kernels, when the runner has them

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, stored: bool = False
    ) -> torch.Tensor:
        # q: [T, H, hd]; k, v: [T, Hkv, hd] -> out: [T, H * hd]. `stored`: k and v are in the cache already.
        block_size = self.v_cache.shape[2]
        if not stored:
            blocks, offsets = meta.slot_mapping // block_size, meta.slot_mapping % block_size
            self.k_cache[blocks, :, :, offsets] = k.to(self.k_cache.dtype)  # [T, Hkv, hd] into (block, :, :, offset)
            self.v_cache[blocks, :, offsets] = v.to(self.v_cache.dtype)  # into (block, :, offset)
        if meta.num_decode == q.shape[0]:  # a decode-only step
            return self._decode(q, meta, block_size).reshape(q.shape[0], -1)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.num_decode:
            out[: meta.num_decode] = self._decode(q[: meta.num_decode], meta, block_size)
        if stored and self.kernels is not None and meta.prefill_chunks is not None and meta.prefill_tables is not None:
            self.kernels.paged_prefill(
                q, self.k_cache, self.v_cache, meta.prefill_tables, meta.prefill_chunks, out, self.scale, self.sliding_window
            )
            return out.view(q.shape[0], -1)
        for chunk in meta.prefills:
            s = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            out[s] = self._prefill(q[s], k[s], v[s], chunk, block_size)
        return out.view(q.shape[0], -1)

    def _gather(self, cache: torch.Tensor, block_table: torch.Tensor, length: int, keys: bool = False) -> torch.Tensor:
        # block_table: [nb] or [B, nb] -> [nb*bs, Hkv, hd] or [B, nb*bs, Hkv, hd], cut to `length` tokens.
        # index_select on whole blocks is a row memcpy; advanced indexing (cache[table]) is ~40x slower on CPU.
        blocks = cache.index_select(0, block_table.reshape(-1))  # [B*nb, Hkv, bs, hd] ([B*nb, Hkv, hd, bs] for keys)
        if keys:
            blocks = blocks.transpose(-2, -1)
        lead = block_table.shape[:-1]
        bs = self.v_cache.shape[2]
        tokens = blocks.reshape(*lead, -1, self.num_kv_heads, bs, self.head_dim).transpose(-3, -2)
        return tokens.reshape(*lead, -1, self.num_kv_heads, self.head_dim)[..., :length, :, :]

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata, block_size: int) -> torch.Tensor:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        if self.kernels is not None:
            return self.kernels.paged_decode(
                q, self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale, self.sliding_window
            )
        length = meta.decode_max_len
        k = self._gather(self.k_cache, meta.decode_block_tables, length, keys=True).transpose(1, 2).to(q.dtype)  # [B, Hkv, S, hd]
        v = self._gather(self.v_cache, meta.decode_block_tables, length).transpose(1, 2).to(q.dtype)
        key_pos = torch.arange(length, device=q.device)  # [S]
        ctx = meta.decode_context_lens.unsqueeze(1)  # [B, 1]
        mask = key_pos < ctx  # [B, S]
        if self.sliding_window is not None:
            mask &= key_pos > ctx - 1 - self.sliding_window
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, hd]
            k,
            v,
            attn_mask=mask[:, None, None, :],
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.squeeze(2)  # [B, H, hd]

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk, block_size: int
    ) -> torch.Tensor:
        # q: [L, H, hd]; k, v: [L, Hkv, hd] (this chunk's new tokens)
        cached = chunk.ctx_len - chunk.q_len
        if cached:
            k = self._gather(self.k_cache, chunk.block_table, chunk.ctx_len, keys=True).to(q.dtype)  # [C, Hkv, hd]
            v = self._gather(self.v_cache, chunk.block_table, chunk.ctx_len).to(q.dtype)
        elif self.k_cache.dtype != q.dtype:  # attend to K/V as the cache holds them, as later steps will
            k, v = k.to(self.k_cache.dtype).to(q.dtype), v.to(self.v_cache.dtype).to(q.dtype)
        mask = None
        causal = True
        if cached or (self.sliding_window is not None and chunk.ctx_len > self.sliding_window):
            q_pos = torch.arange(cached, chunk.ctx_len, device=q.device).unsqueeze(1)  # [L, 1]
            k_pos = torch.arange(chunk.ctx_len, device=q.device).unsqueeze(0)  # [1, C]
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask &= k_pos > q_pos - self.sliding_window
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, L, hd]
            k.transpose(0, 1).unsqueeze(0),  # [1, Hkv, C, hd]
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.squeeze(0).transpose(0, 1)  # [L, H, hd]
