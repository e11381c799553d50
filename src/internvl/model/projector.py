"""Pixel shuffle (2x2 token merge) and the `mlp1` projector from vision width to language width."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ProjectorConfig


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """[n, a, b, c] -> [n, a*s, b*s, c/s^2] with the reference view/permute order.

    With v2, output token (i, j) is the concatenation of input tokens (2i,2j), (2i,2j+1), (2i+1,2j),
    (2i+1,2j+1). v1 packs the channels the same way but leaves the token grid transposed.
    """
    n, a, b, c = x.shape
    x = x.reshape(n, a, int(b * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(b * scale), int(a * scale), int(c / (scale * scale)))
    if version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class Projector(nn.Sequential):
    """mlp1: LayerNorm(4C, eps 1e-5) -> Linear(4C, H) -> GELU -> Linear(H, H); keys mlp1.{0,1,3}."""

    def __init__(self, vision_width: int, llm_width: int, cfg: ProjectorConfig):
        merged = vision_width * int(round(1 / cfg.downsample_ratio)) ** 2
        super().__init__(
            nn.LayerNorm(merged, eps=cfg.layer_norm_eps),
            nn.Linear(merged, llm_width),
            nn.GELU(),
            nn.Linear(llm_width, llm_width),
        )


def merge_and_project(vit_tokens: torch.Tensor, mlp1: nn.Module, cfg: ProjectorConfig) -> torch.Tensor:
    """ViT output with CLS [N, 1+h*w, C] -> image embeddings [N, h*w*r^2, H]."""
    x = vit_tokens[:, 1:, :]
    n, t, c = x.shape
    side = int(t**0.5)
    if side * side != t:
        raise ValueError(f"vision tokens do not form a square grid: {t} tokens")
    x = pixel_shuffle(x.reshape(n, side, side, c), cfg.downsample_ratio, cfg.ps_version)
    return mlp1(x.reshape(n, -1, x.shape[-1]))

