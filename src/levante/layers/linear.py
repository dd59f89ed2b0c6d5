"""Linear layers without bias (Llama-family projections), plain or with quantised weights.

Weight formats (`--weight-format`):
- "native": weights in the model dtype (bfloat16 / float32), `F.linear`.
- "int8": int8 weights with one scale per output row (symmetric, round to nearest). Few rows
  (decode of a small batch: memory-bound) run `_weight_int8pack_mm` on activations in the model
  dtype, reading half the bytes of bfloat16; many rows (prefill, large batches: compute-bound)
  dequantise the weights for the call. (Quantising activations too, for an int8 x int8 GEMM, cost
  SmolLM2 about 5% of mean token log-probability: not kept.)
- "int4": 4-bit weights (the LM head int8) in groups of 32 along the input, each group with its own scale and
  zero point (asymmetric), run by `_weight_int4pack_mm_for_cpu` (CPU only; elsewhere int8).
  A quarter of bfloat16's bytes. It is the layout of GGUF's Q4_0/Q4_1/Q4_K blocks, so weights
  that came from such a file are reproduced up to the rounding of scales to the model dtype.
- "auto" (the default): on CPU, for checkpoints stored in 4 bits (GGUF Q4_0/Q4_1/Q4_K, ...), int4
  copies of the projections (which reproduce them) and an int8 copy of the LM head (GGUF keeps it
  in 6 or 8 bits); other checkpoints, and models on a GPU, stay native. Calls of few rows (decode
  of small batches: memory-bound) run the quantised kernels, the others (prefill, large batches:
  compute-bound) the native GEMM on the same weights, dequantised once: a request's result does
  not depend on its batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("native", "int8", "int4", "auto")
INT4_GROUP = 32  # GGUF's block size: Q4_0/Q4_1 blocks and Q4_K sub-blocks


class QuantizedWeight:
    """A [out, in] weight in fewer bits: `mm(x)` = x W^T; `dequantize(dtype)` gives W back."""

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
        self.quantized: QuantizedWeight | None = None
        self.quant_max_rows = 0  # calls with at most this many rows use the quantised weights
        self.keep_native = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        q = self.quantized
        if q is not None:
            if x.shape[0] <= self.quant_max_rows:
                return q.mm(x)
            if not self.keep_native:
                return F.linear(x, q.dequantize(x.dtype))
        return F.linear(x, self.weight)

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

    def quantized_nbytes(self) -> int:
        return self.quantized.nbytes() if self.quantized is not None else 0


FOUR_BIT_CHECKPOINTS = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")


def four_bit_checkpoint(checkpoint_quantization: str) -> bool:
    """Whether a checkpoint stores its projections in at most 4 bits per weight (GGUF type names)."""
    q = checkpoint_quantization.upper()
    return any(q.startswith(p) for p in FOUR_BIT_CHECKPOINTS)


def quantize_linears(model: nn.Module, fmt: str, max_rows: int = 8, checkpoint_quantization: str = "") -> None:
    """Give every projection (attention, MLP, LM head) the weight format `fmt`; embeddings and experts keep theirs.

    "auto" quantises only 4-bit checkpoints on CPU (see the module's docstring); the others keep native weights.
    The LM head is never taken below 8 bits (GGUF files keep it in 6 or 8; 4 bits cost SmolLM2 5% perplexity).
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if fmt == "auto" and not (on_cpu and four_bit_checkpoint(checkpoint_quantization)):
        return  # the int4 kernel is CPU-only; elsewhere "auto" is native
    lm_head = getattr(model, "lm_head", None)
    for module in model.modules():
        if isinstance(module, Linear):
            module.quantize(fmt, max_rows, 8 if module is lm_head else 4)

def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights: its parameters (tied ones once) plus the quantised copies."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(m.quantized_nbytes() for m in model.modules() if isinstance(m, Linear))
