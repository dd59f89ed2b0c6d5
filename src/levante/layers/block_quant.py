"""Block-quantised weights (GGUF's layout) and the CPU kernel that multiplies by them.

A weight [N, K] is stored in blocks of 32 inputs per output row: w = d * q + m with q unsigned
(4 bits: 0..15, 8 bits: 0..255) and one (d, m) pair per block. GGUF's Q4_0, Q4_1, Q4_K (4-bit) and
Q5_0, Q5_1, Q5_K, Q8_0 (8-bit storage) blocks are all of this form, so their weights are used as the
file stores them; other weights are quantised here (min/max per block).

`BlockQuantWeight.mm(x)` quantises each row of x to int8 per block of 32 (as llama.cpp does for its
dot products) and runs the integer products on AVX512-VNNI (`block_gemm` in csrc/cpu_ops.cpp).
`reference_mm` is the same arithmetic in plain torch, for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from levante.layers.cpu_kernels import CpuKernels

BLOCK = 32  # inputs per block
TILE = 16  # output columns per packed tile (one AVX-512 register of int32 lanes)


@dataclass
class BlockQuant:
    """Unpacked blocks of one weight: w[n, k] = d[n, k // 32] * q[n, k] + m[n, k // 32]."""

    q: torch.Tensor  # [N, K] uint8
    d: torch.Tensor  # [N, K / 32] float32
    m: torch.Tensor  # [N, K / 32] float32
    bits: int  # 4 (q <= 15) or 8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        g = self.q.view(n, k // BLOCK, BLOCK).float()
        # fp16 scales, as the packed weights keep them
        d, m = self.d.half().float(), self.m.half().float()
        return (g * d[..., None] + m[..., None]).view(n, k).to(dtype)

    @staticmethod
    def cat(parts: list[BlockQuant]) -> BlockQuant:
        bits = max(p.bits for p in parts)
        return BlockQuant(
            torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), torch.cat([p.m for p in parts]), bits
        )


def quantize_blocks(w: torch.Tensor, bits: int) -> BlockQuant:
    """Asymmetric min/max quantisation of a float weight [N, K] in blocks of 32 (K divisible by 32)."""
    n, k = w.shape
    levels = (1 << bits) - 1
    g = w.float().reshape(n, k // BLOCK, BLOCK)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    # Scales are stored in fp16: round them first so that q is computed against the stored grid.
    d = ((hi - lo) / levels).half().float()
    m = lo.half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = ((g - m[..., None]) / safe[..., None]).round_().clamp_(0, levels).to(torch.uint8)
    return BlockQuant(q.view(n, k), d, m, bits)


def pack(bq: BlockQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout: packed uint8 [N/16, K/32, steps * 64] and fp16 scales [N/16, K/32, 2, 16].

    4-bit: step s of block b holds, for column j, bytes q[k0 + i] | q[k0 + 4 + i] << 4 (i < 4, k0 = 32b + 8s);
    8-bit: bytes q[k0 + i] with k0 = 32b + 4s. Rows are padded to a multiple of 16 with zeros.
    """
    n, k = bq.q.shape
    nt, kb = -(-n // TILE), k // BLOCK
    pad = nt * TILE - n
    q, d, m = bq.q, bq.d, bq.m
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        d = torch.cat([d, d.new_zeros(pad, kb)])
        m = torch.cat([m, m.new_zeros(pad, kb)])
    if bq.bits == 4:
        g = q.view(nt, TILE, kb, 4, 2, 4)  # [tile, col, block, step, half, byte]
        g = g.permute(0, 2, 3, 1, 5, 4)  # [tile, block, step, col, byte, half]
        packed = (g[..., 0] | (g[..., 1] << 4)).reshape(nt, kb, 4 * 64)
    else:
        g = q.view(nt, TILE, kb, 8, 4).permute(0, 2, 3, 1, 4)  # [tile, block, step, col, byte]
        packed = g.reshape(nt, kb, 8 * 64)
    scales = torch.stack([d, m]).view(2, nt, TILE, kb).permute(1, 3, 0, 2).to(torch.float16)
    return packed.contiguous(), scales.contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of x [M, K] in int8 per block of 32: qx (float holding integers), dx [M, K/32], sx = dx * sum(qx)."""
    m, k = x.shape
    g = x.float().view(m, k // BLOCK, BLOCK)
    amax = g.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    qx = (g * inv[..., None]).round()
    dx = amax / 127.0
    return qx.view(m, k), dx, dx * qx.sum(dim=-1)


def reference_mm(x: torch.Tensor, bq: BlockQuant) -> torch.Tensor:
    """What the kernel computes, in float64: sum over blocks of d dx (q . qx) + m dx sum(qx)."""
    qx, dx, sx = quantize_activations(x)
    n, k = bq.q.shape
    kb = k // BLOCK
    d, m = bq.d.half().double(), bq.m.half().double()
    qxb = qx.double().view(-1, kb, BLOCK)
    dots = torch.einsum("mbi,nbi->mnb", qxb, bq.q.double().view(n, kb, BLOCK))  # exact integers
    out = (dots * (d[None] * dx.double()[:, None, :])).sum(-1) + (m[None] * sx.double()[:, None, :]).sum(-1)
    return out.to(x.dtype)


class BlockQuantWeight:
    """A packed block-quantised weight; `mm(x)` = x W^T (+ residual) on the CPU kernel."""

    def __init__(self, bq: BlockQuant, kernels: CpuKernels) -> None:
        self.bits = bq.bits
        self.out_features, self.in_features = bq.q.shape
        self.packed, self.scales = pack(bq)
        self._kernels = kernels

    def mm(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._kernels.block_gemm(x, self.packed, self.scales, self.out_features, self.bits, residual)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return unpack(self.packed, self.scales, self.bits, self.out_features).dequantize(dtype)

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes


def unpack(packed: torch.Tensor, scales: torch.Tensor, bits: int, n: int) -> BlockQuant:
    """Inverse of `pack` (the tests check the round trip; dequantize uses it)."""
    nt, kb, _ = packed.shape
    if bits == 4:
        g = packed.view(nt, kb, 4, TILE, 4)
        both = torch.stack([g & 0x0F, g >> 4], dim=-1)  # [tile, block, step, col, byte, half]
        q = both.permute(0, 3, 1, 2, 5, 4).reshape(nt * TILE, kb * BLOCK)
    else:
        q = packed.view(nt, kb, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(nt * TILE, kb * BLOCK)
    dm = scales.float().permute(2, 0, 3, 1).reshape(2, nt * TILE, kb)
    return BlockQuant(q[:n].contiguous(), dm[0, :n], dm[1, :n], bits)
