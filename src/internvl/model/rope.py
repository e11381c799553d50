"""Rotary position embeddings from explicit positions (integer or fractional) with the checkpoint's scaling:
linear, dynamic NTK, LongRoPE (Phi-3) and YaRN (GPT-OSS), as transformers computes them."""

from __future__ import annotations

import math

import torch

from ..config import LLMConfig, rope_kind
from .yarn import yarn_frequencies


class Rotary:
    """RoPE tables from explicit positions (integer or fractional), with the checkpoint's scaling, as transformers
    computes it: linear; dynamic NTK (the base recomputed from the current length past max_position_embeddings);
    LongRoPE (`longrope`, Phi-3's older name `su`: per-frequency short or long factors, chosen by whether the
    length passes original_max_position_embeddings, and cos/sin times the attention factor)."""

    def __init__(self, cfg: LLMConfig):
        self.dim = cfg.head_dim
        self.base = cfg.rope_theta
        self.max_pos = cfg.max_position_embeddings
        scaling = cfg.rope_scaling or {}
        self.kind = rope_kind(scaling)
        self.factor = float(scaling.get("factor") or 1.0)
        self.attention_scaling = 1.0
        if self.kind == "longrope":
            self.original_max = int(scaling.get("original_max_position_embeddings") or self.max_pos)
            self.short, self.long = list(scaling["short_factor"]), list(scaling["long_factor"])
            factor = scaling.get("factor") or self.max_pos / self.original_max
            attention = scaling.get("attention_factor")
            if attention is None:
                attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
            self.attention_scaling = float(attention)
        if self.kind == "yarn":  # GPT-OSS
            self.yarn_inv, self.attention_scaling = yarn_frequencies(scaling, self.base, self.dim, self.max_pos)
        self._cache: dict = {}

    def inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if self.kind == "yarn":
            return self.yarn_inv.to(device)
        exps = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        if self.kind == "dynamic" and seq_len > self.max_pos:  # float32 as transformers, not cached
            grown = torch.tensor(self.factor * seq_len / self.max_pos - (self.factor - 1), dtype=torch.float32)
            base = self.base * grown ** (self.dim / (self.dim - 2))
            return 1.0 / (base.to(device) ** exps)
        long = self.kind == "longrope" and seq_len > self.original_max
        key = (long, device)
        if key not in self._cache:
            inv = 1.0 / (self.base**exps)
            if self.kind == "longrope":
                ext = torch.tensor(self.long if long else self.short, dtype=torch.float32, device=device)
                inv = 1.0 / (ext * self.base**exps)
            self._cache[key] = inv
        return self._cache[key]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, D] for positions [B, T]."""
        pos = positions.float()
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 0
        if self.kind == "linear":
            pos = pos / self.factor
        freqs = pos[..., None] * self.inv_freq(seq_len, positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        if self.attention_scaling != 1.0:
            return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin
