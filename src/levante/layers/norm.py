"""RMSNorm, computed in float32 as the reference implementations do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.layers.cpu_kernels import CpuKernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels: CpuKernels | None = None  # the fused CPU kernel, bound by the model runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]. Normalise in float32 so bfloat16 activations keep their precision.
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        # F.rms_norm on float32 is x * rsqrt(mean(x^2) + eps), bit for bit the reference's steps, in one op.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
