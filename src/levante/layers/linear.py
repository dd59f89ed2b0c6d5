"""Linear layers without bias (Llama-family projections), plain or with quantised weights.

Weight formats (`--weight-format`):
- "native": weights in the model dtype (bfloat16 / float32), `F.linear`.
- "auto" (the default): on a CPU with AVX512-VNNI, a quantised GGUF checkpoint keeps its blocks as
  the file stores them (Q4_0/Q4_1/Q4_K in 4 bits, Q5_*/Q8_0 in 8, other types quantised to 8-bit
  blocks) and runs every projection, prefill and decode alike, on the block-quantised integer kernel
  (layers/block_quant.py: activations in int8 per block of 32, as llama.cpp does). Float checkpoints,
  and models on a GPU, stay native. On a CPU without VNNI, 4-bit checkpoints get int4 copies for
  decode steps of few rows (`_weight_int4pack_mm`) and the native GEMM on the same weights otherwise.
- "int8" / "int4": 8- / 4-bit weights (the LM head never below 8 bits): blocks of 32 on the integer
  kernel where it runs (the checkpoint's own blocks when it has them), else torch's weight-only
  kernels (`_weight_int8pack_mm` with per-row scales, `_weight_int4pack_mm_for_cpu` in groups of 32).
Whatever the format, every row of a step goes through the same arithmetic, so a request's result
does not depend on what else is in its batch.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from levante.layers.block_quant import BLOCK, BlockQuant, BlockQuantWeight, quantize_blocks
from levante.layers.cpu_kernels import CpuKernels, load_cpu_kernels

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("native", "int8", "int4", "auto")
INT4_GROUP = 32  # GGUF's block size: Q4_0/Q4_1 blocks and Q4_K sub-blocks


class QuantizedWeight:
    """A [out, in] weight in fewer bits for torch's weight-only kernels: `mm(x)` = x W^T; `dequantize(dtype)` gives W back."""

    bits: int

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class Int8Weight(QuantizedWeight):
    bits = 8

    def __init__(self, w: torch.Tensor) -> None:
        scales = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        self.qweight = (w.float() / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()  # [out, in]
        self.scales = scales.to(w.dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes


class Int4Weight(QuantizedWeight):
    """Groups of INT4_GROUP inputs: w = (q - 8) * scale + zero, q in 0..15 (the kernel's convention)."""

    bits = 4

    def __init__(self, w: torch.Tensor, group: int = INT4_GROUP) -> None:
        out, inp = w.shape
        g = w.float().view(out, inp // group, group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [out, G]
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.int32)
        zero = lo + 8 * scale
        self.group = group
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out, inp), 1)  # [out, in / 2] uint8
        self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(w.dtype)  # [G, out, 2]
        # The weights these stand for, as the kernel computes them (its packing is blocked, not plain
        # nibbles, so they are made here, once, rather than unpacked later).
        sz = self.scales_zeros.float().transpose(0, 1)  # [out, G, 2]
        self._dequantized: torch.Tensor | None = ((q.float() - 8) * sz[..., :1] + sz[..., 1:]).view(out, inp).to(w.dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights in `dtype`; available once (for "auto"'s native copy), then released."""
        if self._dequantized is None:
            raise RuntimeError("int4 weights are dequantised once, at quantisation")
        w, self._dequantized = self._dequantized, None
        return w.to(dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    @staticmethod
    def supported(w: torch.Tensor) -> bool:
        return w.device.type == "cpu" and w.dim() == 2 and w.shape[1] % INT4_GROUP == 0 and w.dtype in (torch.bfloat16, torch.float32)


class Linear(nn.Module):
    """y = x W^T with W: [out_features, in_features]. Fused projections (QKV, gate/up) are one Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.quantized: QuantizedWeight | BlockQuantWeight | None = None
        self.quant_max_rows = 0  # calls with at most this many rows use the quantised weights
        self.keep_native = True
        self.quantizable = True  # False keeps the native weights whatever the format (e.g. an MoE router)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, in] -> [T, out], plus residual [T, out] when given (fused where the kernel can)
        q = self.quantized
        if isinstance(q, BlockQuantWeight):
            return q.mm(x, residual)
        if q is not None and x.shape[0] <= self.quant_max_rows:
            y = q.mm(x)
        elif q is not None and not self.keep_native:
            y = F.linear(x, q.dequantize(x.dtype))
        elif residual is not None:
            return torch.addmm(residual, x, self.weight.t())
        else:
            return F.linear(x, self.weight)
        return y if residual is None else residual + y

    def quantize(self, fmt: str, max_rows: int, bits: int | None = None) -> None:
        """Quantise the weights: fmt "int8"/"int4" replace the native ones; "auto" makes a copy for
        calls of at most `max_rows` rows and native weights equal to it. `bits` (4 or 8) overrides
        the bits of "int4" and "auto" (default: 4 for "int4", 8 for "auto")."""
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
        if fmt == "native":
            return
        w = self.weight.detach()
        if fmt == "int8" or bits is None:
            bits = 4 if fmt == "int4" else 8
        if bits == 4 and not Int4Weight.supported(w):
            logger.debug("int4 weights need a CPU bfloat16/float32 weight with inputs divisible by %d; using int8", INT4_GROUP)
            bits = 8
        self.quantized = Int4Weight(w) if bits == 4 else Int8Weight(w)
        self.keep_native = fmt == "auto"
        if self.keep_native:  # both kernels compute with the same weights: results do not depend on the batch
            self.weight = nn.Parameter(self.quantized.dequantize(w.dtype), requires_grad=False)
        elif isinstance(self.quantized, Int4Weight):
            self.quantized.dequantize(w.dtype)  # not needed: release it
        # Without native weights, int8 dequantises for many rows (cheap: a cast and a scale);
        # int4 runs its kernel at every size (unpacking its blocked layout would cost a matmul).
        self.quant_max_rows = 1 << 62 if fmt == "int4" else max_rows
        if not self.keep_native:
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)

    def use_blocks(self, weight: BlockQuantWeight) -> None:
        """Compute with block-quantised weights at every batch size; the native weights are dropped."""
        self.quantized = weight
        self.quant_max_rows = 1 << 62
        self.keep_native = False
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device), requires_grad=False)

    def fused_operands(self) -> list[torch.Tensor] | None:
        """The weight as the fused CPU decode step takes it: [packed, scales] of block-quantised weights,
        [weight, empty] of native ones; None for torch's int4/int8 formats, which it does not run."""
        q = self.quantized
        if isinstance(q, BlockQuantWeight):
            return [q.packed, q.scales]
        if q is None:
            return [self.weight, torch.empty(0)]
        return None

    def quantized_nbytes(self) -> int:
        return self.quantized.nbytes() if self.quantized is not None else 0


FOUR_BIT_CHECKPOINTS = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")


def four_bit_checkpoint(checkpoint_quantization: str) -> bool:
    """Whether a checkpoint stores its projections in at most 4 bits per weight (GGUF type names)."""
    q = checkpoint_quantization.upper()
    return any(q.startswith(p) for p in FOUR_BIT_CHECKPOINTS)


def quantized_checkpoint(checkpoint_quantization: str) -> bool:
    """Whether a checkpoint stores its projections quantised (any GGUF quant type, not F32/F16/BF16)."""
    q = checkpoint_quantization.upper()
    return q.startswith(("Q", "IQ", "TQ"))


def uses_blocks(fmt: str, device: torch.device, checkpoint_quantization: str) -> bool:
    """Whether `quantize_linears` gives the projections block-quantised weights (so that a loader may skip
    their float copies): a CPU with the VNNI kernel, and int8/int4, or auto on a quantised checkpoint."""
    if fmt == "native" or device.type != "cpu":
        return False
    if fmt == "auto" and not quantized_checkpoint(checkpoint_quantization):
        return False
    kernels = load_cpu_kernels()
    return kernels is not None and kernels.vnni


class BlockSource(Protocol):
    def get(self, param: str) -> BlockQuant | None: ...


def quantize_linears(
    model: nn.Module, fmt: str, max_rows: int = 8, checkpoint_quantization: str = "", blocks: BlockSource | None = None
) -> None:
    """Give every projection (attention, MLP, LM head) the weight format `fmt`; embeddings and experts keep theirs.

    `blocks` gives a checkpoint's stored blocks by parameter name (a GGUF file's), used as they are where
    the format allows. See the module's docstring for what each format does where.
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
    if fmt == "native":
        return
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu"
    if uses_blocks(fmt, device, checkpoint_quantization):
        kernels = load_cpu_kernels()
        assert kernels is not None
        _use_blocks(model, fmt, kernels, blocks)
        return
    if fmt == "auto" and not (on_cpu and four_bit_checkpoint(checkpoint_quantization)):
        return  # the int4 kernel is CPU-only; elsewhere "auto" is native
    lm_head = getattr(model, "lm_head", None)
    for module in model.modules():
        if isinstance(module, Linear) and module.quantizable:
            module.quantize(fmt, max_rows, 8 if module is lm_head else 4)


def _use_blocks(model: nn.Module, fmt: str, kernels: CpuKernels, blocks: BlockSource | None) -> None:
    lm_head = getattr(model, "lm_head", None)
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or not module.quantizable:
            continue
        bits = 8 if fmt == "int8" or module is lm_head else 4  # "auto": the stored ones
        bq = blocks.get(f"{name}.weight") if blocks is not None else None
        if bq is not None and fmt == "int4" and bq.bits > bits:
            bq = None  # stored in more bits than asked for: quantise the weights anew
        if bq is None:
            if module.in_features % BLOCK or module.weight.numel() == 0:
                module.quantize("int8" if fmt == "auto" else fmt, 1 << 62)  # no blocks of 32: torch's kernels
                continue
            bq = quantize_blocks(module.weight.detach(), bits)
        if fmt == "int8" and bq.bits < 8:
            bq = BlockQuant(bq.q, bq.d, bq.m, 8)  # the same values in 8-bit storage
        module.use_blocks(BlockQuantWeight(bq, kernels))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights: its parameters (tied ones once) plus the quantised copies."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(m.quantized_nbytes() for m in model.modules() if isinstance(m, Linear))
