"""GPT-OSS decoder pieces (the LLM of InternVL3.5-GPT-OSS), used by llm.py: attention with a learned sink logit
per head over alternating sliding-window / full layers, and the mixture of experts (top-k router with bias, softmax
over the chosen logits, experts with the clamped SwiGLU). Names and shapes are transformers' `GptOss*` ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .cache import KVCache
from .moe import dispatch

QUERY_CHUNK = 512  # queries per score block: the [B, H, chunk, S] scores bound the memory of a long prefill


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                   sinks: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """softmax([q.k * scale, sink_h]) over the allowed keys plus one sink logit per head, the sink's share
    dropped: q [B, Hq, T, D], k/v [B, Hkv, S, D], allowed [B, 1, T, S] boolean. Query heads are grouped
    over their KV head ([B, Hkv, g, T, D]), so the cache is never copied per query head."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    q = q.reshape(b, hk, g, t, d)
    k, v = k[:, :, None], v[:, :, None]  # [B, Hkv, 1, S, D]
    sink = sinks.float().reshape(1, hk, g, 1, 1)
    outs = []
    for i in range(0, t, QUERY_CHUNK):
        scores = (q[:, :, :, i : i + QUERY_CHUNK] @ k.transpose(-1, -2)).float() * scale  # [B, Hkv, g, t, S]
        scores = scores.masked_fill(~allowed[:, :, None, i : i + QUERY_CHUNK], float("-inf"))
        logits = torch.cat([scores, sink.expand(b, hk, g, scores.shape[3], 1)], dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        outs.append(probs.to(v.dtype) @ v)
    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    return out.reshape(b, hq, t, d)


def _span_mask(lengths: list[list[int]], device: torch.device) -> torch.Tensor:
    """Packed rows (the lengths of each row's samples) as one boolean [B, 1, T, T] mask: causal inside each sample."""
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in lengths]).to(device)
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, cache: KVCache | None,
                     sinks: torch.Tensor, window: int | None) -> torch.Tensor:  # fmt: skip
    """A GPT-OSS layer's attention over the keys llm.Attention gathered (the cache's whole rows when decoding):
    `mask` as llm.CausalLM.forward makes it (None: causal; a boolean [B, 1, T, S]; packed `Spans`), narrowed
    to the last `window` keys of each query on sliding layers. The cache keeps every key and the window is a
    mask, which gives the reference's results (without its memory saving)."""
    b, _, t, _ = q.shape
    start = cache.lengths.to(q.device) if cache is not None else torch.zeros(b, dtype=torch.long, device=q.device)
    q_idx = start[:, None] + torch.arange(t, device=q.device)  # [B, T]: each query's slot among the keys
    k_idx = torch.arange(k.shape[2], device=q.device)
    if hasattr(mask, "lengths"):  # llm.Spans (imported by name it would be a cycle)
        allowed = _span_mask(mask.lengths, q.device)
    elif mask is None:  # plain causal (no cache), or one new token per row of equal lengths
        allowed = (k_idx[None, None, :] <= q_idx[:, :, None])[:, None]
    else:
        allowed = mask.expand(b, 1, t, k.shape[2])
    if window is not None:
        allowed = allowed & (k_idx[None, None, :] > q_idx[:, :, None] - window)[:, None]
    return sink_attention(q, k, v, allowed, sinks, q.shape[-1] ** -0.5)


class Experts(nn.Module):
    """`num_experts` clamped-SwiGLU MLPs stored stacked as transformers does: gate_up_proj [E, H, 2I] with
    gate and up interleaved along the last axis (gate at even, up at odd columns), down_proj [E, I, H]."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        # normal(0, 0.02) as the reference initializes them (plain tensor ops: free on the meta device)
        self.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * i) * 0.02)
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj = nn.Parameter(torch.randn(e, i, h) * 0.02)
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit

    def run(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert` on rows x [N, H]."""
        gate_up = x @ self.gate_up_proj[expert] + self.gate_up_proj_bias[expert]
        gate = gate_up[..., ::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ self.down_proj[expert] + self.down_proj_bias[expert]


class GptOssMoE(nn.Module):
    """`router` (a biased linear) picks the top-k experts per token; their weights are the softmax of the
    chosen logits only. Each expert runs on just the tokens routed to it (moe.dispatch)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=True)
        self.experts = Experts(cfg)

    def fuse(self) -> None:
        """Nothing to fuse: the experts are already one stacked gate/up projection each."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        top, indices = torch.topk(self.router(flat), self.top_k, dim=-1)
        weights = F.softmax(top, dim=-1, dtype=torch.float32).to(flat.dtype)
        return dispatch(flat, weights, indices, self.experts.run).reshape(shape)
