"""The native CPU decode kernel against the portable gather + SDPA path, on random paged caches."""

from __future__ import annotations

import pytest
import torch

from levante.layers.attention import AttentionMetadata, PagedAttention
from levante.layers.paged_attention_cpu import load_paged_decode


@pytest.fixture(scope="module")
def kernel():  # type: ignore[no-untyped-def]
    k = load_paged_decode()
    if k is None:
        pytest.skip("no C++ toolchain: the portable path is what runs here")
    return k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(9, 3, 64, None), (8, 2, 128, 37), (4, 4, 48, None), (32, 8, 128, 5)])
def test_kernel_matches_portable_path(kernel, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(heads * head_dim)
    num_blocks, block_size, batch = 64, 16, 7
    attn = PagedAttention(heads, kv_heads, head_dim, window)
    attn.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    attn.v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 2, 15, 16, 17, 60, 100])
    width = int((lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(batch)])
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), num_decode=batch, decode_block_tables=tables,
        decode_context_lens=lens, decode_max_len=int(lens.max()),
    )
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    expected = attn._decode(q, meta, block_size).float()
    attn.decode_kernel = kernel
    got = attn._decode(q, meta, block_size).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - expected).abs().max().item() <= tol
