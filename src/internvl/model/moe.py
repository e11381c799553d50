"""Mixture-of-experts feed-forward: a top-k softmax router and a dispatch that runs each expert only on the
tokens routed to it. The expert module is pluggable (`make_expert`), so other MoE families reuse the routing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (in fp32), the `top_k` best; weights renormalized to sum to 1 when `normalize`.
    Returns weights [N, k] (in the logits' dtype) and expert indices [N, k]."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


def dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    run_expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k weights[n, k] * expert_{indices[n, k]}(x[n]) for tokens x [N, H]: the (token, slot) pairs are
    sorted by expert and each expert that got tokens runs once on just those rows. Differentiable in x,
    the weights and the experts' parameters."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    token_of = order // indices.shape[1]  # the token of each sorted pair
    rows = x.index_select(0, token_of)
    outs = []
    start = 0
    for expert, n in enumerate(counts):
        if n:
            outs.append(run_expert(expert, rows[start : start + n]))
        start += n
    y = torch.cat(outs) * weights.flatten().index_select(0, order)[:, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token_of, y.to(x.dtype))


class SparseMoE(nn.Module):
    """`gate` (router, no bias) over `experts` (a ModuleList built by `make_expert`); keys
    `mlp.gate.weight`, `mlp.experts.{e}.*` as in the Qwen3-MoE checkpoints."""

    def __init__(
        self, hidden: int, num_experts: int, top_k: int, normalize: bool, make_expert: Callable[[], nn.Module]
    ):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))

    def fuse(self) -> None:
        """Inference only: fuse each expert's projections where the expert can."""
        for expert in self.experts:
            if hasattr(expert, "fuse"):
                expert.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = route(self.gate(flat), self.top_k, self.normalize)
        out = dispatch(flat, weights, indices, lambda e, rows: self.experts[e](rows))
        return out.reshape(shape)
