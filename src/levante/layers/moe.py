"""Sparse mixture of experts (Mixtral): each token runs its top-k experts, weighted by a softmax over those k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.layers.linear import Linear


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.gate = Linear(hidden_size, num_experts)
        self.gate.quantizable = False  # the router keeps its weights: quantising them would move tokens between experts
        # Experts stacked: w13 holds gate (w1) and up (w3) projections, w2 the down projection.
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # x: [T, D] (normalised), residual: [T, D] -> residual + the experts' weighted outputs
        logits = self.gate(x)  # [T, E]
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)  # [T, k]
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)  # [T, k]
        out = residual.clone()
        for e in experts.unique().tolist():
            token_idx, slot = torch.where(experts == e)  # tokens routed to expert e
            h = x[token_idx]  # [n, D]
            gate, up = F.linear(h, self.w13[e]).chunk(2, dim=-1)  # [n, I] each
            y = F.linear(F.silu(gate) * up, self.w2[e])  # [n, D]
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        return out
