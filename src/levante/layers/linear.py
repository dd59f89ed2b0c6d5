"""Linear layers without bias (Llama-family projections), plain or with int8 weights.

Weight formats (`--weight-format`):
- "native": weights in the model dtype (bfloat16 / float32), `F.linear`.
- "int8": int8 weights with one scale per output row (symmetric, round to nearest). Few rows
  (decode of a small batch: memory-bound) run `_weight_int8pack_mm` on activations in the model
  dtype, reading half the bytes of bfloat16; many rows (prefill, large batches: compute-bound)
  dequantise the weights for the call. (Quantising activations too, for an int8 x int8 GEMM, cost
  SmolLM2 about 5% of mean token log-probability: not kept.)
- "auto": both copies; each call picks int8 for few rows and the native weights otherwise:
  the fastest kernel per step, at 1.5x the weight memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMATS = ("native", "int8", "auto")


class Linear(nn.Module):
    """y = x W^T with W: [out_features, in_features]. Fused projections (QKV, gate/up) are one Linear."""

    qweight: torch.Tensor | None  # [out, in] int8
    scales: torch.Tensor | None  # [out], in the activation dtype

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.qweight = self.scales = None
        self.int8_max_rows = 0  # use the int8 weights for calls with at most this many rows (0: never)
        self.keep_native = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if self.qweight is not None and self.scales is not None:
            if x.shape[0] <= self.int8_max_rows:
                return torch._weight_int8pack_mm(x, self.qweight, self.scales)
            if not self.keep_native:
                return F.linear(x, self.qweight.to(x.dtype) * self.scales[:, None])
        return F.linear(x, self.weight)

    def quantize(self, fmt: str, max_rows: int) -> None:
        """Add int8 weights (per-row scales); with fmt "int8" drop the native ones."""
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
        if fmt == "native":
            return
        w = self.weight.detach()
        scales = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        self.qweight = (w.float() / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(w.dtype)
        self.int8_max_rows = max_rows
        self.keep_native = fmt == "auto"
        if not self.keep_native:
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)


def quantize_linears(model: nn.Module, fmt: str, max_rows: int = 16) -> None:
    """Give every projection (attention, MLP, LM head) the weight format `fmt`; embeddings and experts keep theirs."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.quantize(fmt, max_rows)
