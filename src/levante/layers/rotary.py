"""Rotary position embeddings (HF "rotate half" layout) with the scaling schemes Llama-family configs use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], after the config's scaling (linear, llama3, dynamic at base length)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", "default")
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling, factor)
    if kind in ("default", "dynamic"):
        # dynamic NTK only changes frequencies beyond the trained length; we serve within it.
        return inv_freq
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, dynamic)")


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any], factor: float) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, scaled)


@dataclass
class StepRope:
    """A step's rotary inputs, computed once and shared by every layer.

    positions [T] and the model's cos | sin table [P, 2 hd] (float32) for the fused CPU kernel;
    cos and sign-folded sin [T, 1, hd] in the model dtype for the portable path (None when unused).
    """

    positions: torch.Tensor
    table: torch.Tensor
    cos: torch.Tensor | None = None
    signed_sin: torch.Tensor | None = None

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        assert self.cos is not None and self.signed_sin is not None, "built without lookup tables"
        return rotate(x, self.cos, self.signed_sin)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin table indexed by absolute position."""

    cos_sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_sin", torch.empty(max_positions, head_dim * 2), persistent=False)

    def build(self, device: torch.device) -> None:
        """Fill the table on `device` (the model is built on the meta device first)."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, hd]
        self.cos_sin = torch.cat([emb.cos(), emb.sin()], dim=-1).to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for a step's positions, once per step: [T, 1, hd] each.

        Rotate-half is x * cos + cat(-x2, x1) * sin = x * cos + roll(x, hd/2) * cat(-sin1, sin2):
        the sign moves from x onto sin, which is exact, and saves three ops per rotation.
        """
        cos, sin = self.cos_sin[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        half = self.head_dim // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    def step(self, positions: torch.Tensor, dtype: torch.dtype, lookup: bool = True) -> StepRope:
        """The step's rotary inputs; `lookup=False` when a fused kernel reads the table itself."""
        if not lookup:
            return StepRope(positions, self.cos_sin)
        return StepRope(positions, self.cos_sin, *self.lookup(positions, dtype))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, hd]; k: [T, Hkv, hd]
        cos, sin = self.lookup(positions, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, hd] with tables from `RotaryEmbedding.lookup`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
