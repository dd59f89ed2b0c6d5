"""The native CPU kernels against the portable torch ops they replace: paged decode attention (gather +
SDPA), RMSNorm, rotary embedding with the cache write, silu * up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from levante.layers.attention import AttentionMetadata, PagedAttention, PrefillChunk
from levante.layers.cpu_kernels import CpuKernels, load_cpu_kernels
from levante.layers.norm import RMSNorm
from levante.layers.rotary import RotaryEmbedding


@pytest.fixture(scope="module")
def kernel() -> CpuKernels:
    k = load_cpu_kernels()
    if k is None:
        pytest.skip("no C++ toolchain: the portable path is what runs here")
    return k


@pytest.mark.parametrize("block_size", [16, 4, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(9, 3, 64, None), (8, 2, 128, 37), (4, 4, 48, None), (32, 8, 128, 5), (10, 1, 64, None)])
def test_kernel_matches_portable_path(kernel, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None, block_size: int) -> None:  # type: ignore[no-untyped-def]
    """Decode attention: blocks narrower and wider than a score vector (16 keys), windows starting inside a
    block, 1 to 10 query heads per KV head."""
    gen = torch.Generator().manual_seed(heads * head_dim)
    num_blocks, batch = 64, 7
    attn = PagedAttention(heads, kv_heads, head_dim, window)
    attn.k_cache = torch.randn(num_blocks, kv_heads, head_dim, block_size, generator=gen).to(dtype)  # keys transposed per block
    attn.v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 2, 15, 16, 17, 60, 100])
    width = int((lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(batch)])
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), num_decode=batch, decode_block_tables=tables,
        decode_context_lens=lens, decode_max_len=int(lens.max()),
    )
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    expected = attn._decode(q, meta, block_size).float()
    attn.kernels = kernel
    got = attn._decode(q, meta, block_size).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - expected).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (5, 64), (300, 100)])
def test_rms_norm_matches_the_reference_steps(kernel: CpuKernels, dtype: torch.dtype, rows: int, dim: int) -> None:
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = (torch.randn(dim) * 0.3 + 1).to(dtype)
    x = (torch.randn(rows, dim) * 4).to(dtype)
    expected = norm(x)
    norm.kernels = kernel
    got = norm(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    else:  # the same two roundings to bfloat16; the float32 sum of squares may differ in its last bit
        assert (got.float() - expected.float()).abs().max().item() <= 2 ** -7 * expected.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(kernel: CpuKernels, dtype: torch.dtype) -> None:
    gate_up = (torch.randn(7, 2 * 200) * 6).to(dtype)  # 200: a tail after the 16-wide vectors
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = F.silu(gate) * up
    got = kernel.silu_mul(gate_up).float()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (got - expected).abs().max().item() <= tol * expected.abs().max().item()
    big = torch.tensor([[-100.0, 100.0, 0.0, -0.0, 30.0, -30.0, 1.0, 2.0]])
    assert torch.allclose(kernel.silu_mul(big), F.silu(big[:, :4]) * big[:, 4:], atol=1e-6)  # no overflow


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 48), (8, 2, 128)])
def test_rope_store_rotates_and_writes_the_cache(kernel: CpuKernels, heads: int, kv_heads: int, head_dim: int) -> None:
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None)
    rotary.build(torch.device("cpu"))
    tokens, num_blocks, block_size = 6, 8, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    positions = torch.tensor([0, 1, 7, 100, 300, 511])
    slots = torch.tensor([3, 0, 9, 31, 17, 4])
    rope = rotary.step(positions, torch.float32)
    qk = rope.rotate(qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim))
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    k_cache = torch.zeros(num_blocks, kv_heads, head_dim, block_size)  # the pool's layout: keys [block, head, dim, offset]
    v_cache = torch.zeros(num_blocks, kv_heads, block_size, head_dim)  # values [block, head, offset, dim]
    got = qkv.clone()
    kernel.rope_store(got, rotary.cos_sin, positions, slots, k_cache, v_cache, heads, kv_heads)
    assert torch.allclose(got[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim), qk, atol=1e-6)
    assert torch.equal(got[:, (heads + kv_heads) * head_dim :], qkv[:, (heads + kv_heads) * head_dim :])  # v untouched
    flat_k = k_cache.permute(0, 3, 1, 2).reshape(-1, kv_heads, head_dim)  # [slot, head, dim]
    flat_v = v_cache.transpose(1, 2).reshape(-1, kv_heads, head_dim)
    assert torch.allclose(flat_k[slots], qk[:, heads:], atol=1e-6)
    assert torch.equal(flat_v[slots], v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_rope_store_refuses_slots_outside_the_cache(kernel: CpuKernels) -> None:
    rotary = RotaryEmbedding(64, 16, 10000.0, None)
    rotary.build(torch.device("cpu"))
    keys, values = torch.zeros(2, 1, 64, 4), torch.zeros(2, 1, 4, 64)  # 2 blocks of 4 slots, 1 KV head
    qkv = torch.randn(1, 3 * 64)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.rope_store(qkv, rotary.cos_sin, torch.tensor([0]), torch.tensor([8]), keys, values, 1, 1)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.rope_store(qkv, rotary.cos_sin, torch.tensor([16]), torch.tensor([0]), keys, values, 1, 1)
    with pytest.raises(RuntimeError, match="keys must be"):  # both in the values' layout
        kernel.rope_store(qkv, rotary.cos_sin, torch.tensor([0]), torch.tensor([0]), values.clone(), values, 1, 1)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_kernel_reads_a_narrower_cache(kernel: CpuKernels, cache_dtype: torch.dtype) -> None:
    """float32 queries over a float16/bfloat16 KV pool (the default with quantised weights) against the portable path."""
    gen = torch.Generator().manual_seed(7)
    attn = PagedAttention(32, 8, 128, None)
    attn.k_cache = torch.randn(16, 8, 128, 16, generator=gen).to(cache_dtype)
    attn.v_cache = torch.randn(16, 8, 16, 128, generator=gen).to(cache_dtype)
    lens = torch.tensor([5, 70, 33])
    tables = torch.stack([torch.randperm(16, generator=gen)[:5] for _ in range(3)])
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), num_decode=3, decode_block_tables=tables,
        decode_context_lens=lens, decode_max_len=70,
    )
    q = torch.randn(3, 32, 128, generator=gen)
    expected = attn._decode(q, meta, 16)
    attn.kernels = kernel
    got = attn._decode(q, meta, 16)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-5


def test_rope_store_narrows_into_the_cache(kernel: CpuKernels) -> None:
    rotary = RotaryEmbedding(64, 32, 10000.0, None)
    rotary.build(torch.device("cpu"))
    qkv = torch.randn(3, 5 * 64)
    k_cache = torch.zeros(2, 2, 64, 4, dtype=torch.float16)
    v_cache = torch.zeros(2, 2, 4, 64, dtype=torch.float16)
    positions, slots = torch.tensor([0, 5, 9]), torch.tensor([1, 6, 2])
    expected_v = qkv[:, 3 * 64 :].view(3, 2, 64).half()
    kernel.rope_store(qkv, rotary.cos_sin, positions, slots, k_cache, v_cache, 1, 2)
    assert torch.equal(v_cache[slots // 4, :, slots % 4], expected_v)  # rounded to nearest, as torch's .half()
    assert torch.equal(k_cache[slots // 4, :, :, slots % 4], qkv[:, 64 : 3 * 64].view(3, 2, 64).half())


def _prefill_case(
    heads: int, kv_heads: int, head_dim: int, window: int | None, cache_dtype: torch.dtype, q_dtype: torch.dtype,
    chunks: list[tuple[int, int]], seed: int,
) -> tuple[PagedAttention, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step of prefill chunks, each (cached tokens, new tokens) of its own sequence, with the chunks' K/V
    already in the pool (as rope_store leaves them): the attention module, q, k, v, metadata."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks, block_size = 96, 16
    attn = PagedAttention(heads, kv_heads, head_dim, window)
    attn.k_cache = torch.randn(num_blocks, kv_heads, head_dim, block_size, generator=gen).to(cache_dtype)
    attn.v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen).to(cache_dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    prefills, rows, tables, slots = [], [], [], []
    start = 0
    for cached, n in chunks:
        nb = -(-(cached + n) // block_size)
        table, free = free[:nb], free[nb:]
        prefills.append(PrefillChunk(start, n, cached + n, torch.tensor(table)))
        rows.append((start, n, cached + n))
        tables.append(table + [0] * (8 - nb))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + n)]
        start += n
    q = torch.randn(start, heads, head_dim, generator=gen).to(q_dtype)
    slot = torch.tensor(slots)
    k = attn.k_cache[slot // block_size, :, :, slot % block_size].to(q_dtype)  # [T, Hkv, hd]: what the cache holds
    v = attn.v_cache[slot // block_size, :, slot % block_size].to(q_dtype)
    meta = AttentionMetadata(
        slot_mapping=slot, prefills=prefills, prefill_chunks=torch.tensor(rows), prefill_tables=torch.tensor(tables)
    )
    return attn, q, k, v, meta


@pytest.mark.parametrize(("q_dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(9, 3, 64, None), (8, 2, 128, 37), (4, 4, 48, None), (32, 8, 128, 5), (6, 2, 64, 20)])
def test_prefill_kernel_matches_portable_path(
    kernel: CpuKernels, q_dtype: torch.dtype, cache_dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None
) -> None:
    """Chunks with and without cached context (prefix-cache hits, later chunks of a long prompt), of lengths
    around the kernel's 16-token tiles, in one call, against gather + SDPA chunk by chunk."""
    chunks = [(0, 2), (0, 17), (16, 33), (5, 1 + 15), (40, 64), (0, 100)]
    attn, q, k, v, meta = _prefill_case(heads, kv_heads, head_dim, window, cache_dtype, q_dtype, chunks, heads * head_dim)
    expected = attn(q, k, v, meta, stored=True).float()
    attn.kernels = kernel
    got = attn(q, k, v, meta, stored=True).float()
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    assert (got - expected).abs().max().item() <= tol


def test_prefill_kernel_reads_strided_queries(kernel: CpuKernels) -> None:
    """q as the model passes it: a view of the fused qkv rows (token stride wider than the heads)."""
    attn, q, k, v, meta = _prefill_case(9, 3, 64, None, torch.float16, torch.float32, [(0, 20), (7, 9)], 3)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    view = qkv[:, : 9 * 64].view(q.shape[0], 9, 64)
    assert not view.is_contiguous()
    expected = attn(q, k, v, meta, stored=True)
    attn.kernels = kernel
    assert torch.allclose(attn(view, k, v, meta, stored=True), expected, atol=1e-5)


def test_prefill_kernel_rows_do_not_depend_on_chunking(kernel: CpuKernels) -> None:
    """A prompt's last 30 tokens give bit-identical outputs as one chunk of 50 or as the second chunk
    after 20 cached tokens (what makes chunked prefill and prefix-cache hits exact)."""
    attn, q, k, v, meta = _prefill_case(9, 3, 64, None, torch.float16, torch.float32, [(0, 50)], 11)
    attn.kernels = kernel
    whole = attn(q, k, v, meta, stored=True)[20:]
    chunk = meta.prefills[0]
    table = chunk.block_table
    second = AttentionMetadata(
        slot_mapping=meta.slot_mapping[20:], prefills=[PrefillChunk(0, 30, 50, table)],
        prefill_chunks=torch.tensor([[0, 30, 50]]), prefill_tables=table.unsqueeze(0),
    )
    assert torch.equal(attn(q[20:], k[20:], v[20:], second, stored=True), whole)


def test_prefill_kernel_refuses_bad_metadata(kernel: CpuKernels) -> None:
    attn, q, _, _, meta = _prefill_case(9, 3, 64, None, torch.float32, torch.float32, [(0, 20)], 5)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="chunk outside the step"):
        kernel.paged_prefill(q, attn.k_cache, attn.v_cache, meta.prefill_tables, torch.tensor([[10, 20, 20]]), out, 0.125, None)
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernel.paged_prefill(q, attn.k_cache, attn.v_cache, torch.full((1, 8), 500), meta.prefill_chunks, out, 0.125, None)


def test_release_openmp_threads_frees_the_calling_threads_team() -> None:
    """The engine's builder thread gives its OpenMP workers back (AsyncLLMEngine calls this before
    its step thread starts), and a later parallel region in that thread still computes correctly."""
    import os
    import time

    from levante.layers.cpu_kernels import release_openmp_threads

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    if not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2:
        pytest.skip("needs Linux /proc and at least 2 torch threads")
    x = torch.randn(2000, 2000)
    (x + x).sum()  # a parallel region: this thread now has a team of workers
    before = threads()
    assert release_openmp_threads()
    deadline = time.monotonic() + 5
    while threads() >= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() < before
    torch.testing.assert_close((x + x).sum(), 2 * x.sum())
