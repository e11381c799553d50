"""InternVL3.5-Flash's Visual Resolution Router (ViR): each tile gives either its 256 tokens (mlp1) or 64 tokens
(a second pixel shuffle, `mlp2`), chosen per tile by a router (cross-attention pooling + gating) over its ViT tokens.

The modules and their names are the Flash remote code's (`modeling_internvl_chat.py` of an InternVL3_5-*-Flash
repo): `mlp2.{0,1,4,7}`, `pooling_before_gating.{query_token,attn1..4,norm1..4}`, `gating.{block1..4,gate}`.
The pooling's quirk is kept: it runs attn1/norm1, then attn2/norm2 three times (attn3/attn4 are loaded, unused).
A tile is compressed when its router probability p = softmax[:, 0] is above the `flash_relative_threshold`
quantile of the call's tiles and at least `flash_absolute_threshold`. The original deletes the compressed tiles'
context tokens 64..255 from a 256-per-tile prompt; here the prompt is built with the per-tile counts
(processing/prompt.py `tile_tokens`), which gives the same token sequence and contiguous positions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .projector import pixel_shuffle

FULL, COMPRESSED = 256, 64  # the `vir` switch: force every tile to its full or its compressed tokens


class Mlp2(nn.Sequential):
    """LayerNorm(16C) -> Linear(16C, 2H) -> GELU -> Dropout -> Linear(2H, 2H) -> GELU -> Dropout -> Linear(2H, H)."""

    def __init__(self, vision_width: int, llm_width: int, downsample_ratio: float):
        merged = vision_width * round(1 / downsample_ratio) ** 4
        super().__init__(
            nn.LayerNorm(merged), nn.Linear(merged, 2 * llm_width), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(2 * llm_width, 2 * llm_width), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * llm_width, llm_width),
        )  # fmt: skip


class CrossAttentionPooling(nn.Module):
    """A learned query attends over a tile's ViT tokens: [T, L, C] -> [T, C]."""

    def __init__(self, dim: int, num_heads: int = 16):
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, dim))
        for k in range(1, 5):
            self.add_module(f"attn{k}", nn.MultiheadAttention(dim, num_heads, batch_first=True))
            self.add_module(f"norm{k}", nn.LayerNorm(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = tokens.to(self.query_token.dtype)
        out = self.query_token.unsqueeze(0).expand(kv.shape[0], -1, -1)
        for attn, norm in ((self.attn1, self.norm1), (self.attn2, self.norm2), (self.attn2, self.norm2),
                           (self.attn2, self.norm2)):  # fmt: skip  # the original's reuse of attn2/norm2
            out = norm(attn(out, kv, kv, need_weights=False)[0])
        return out.squeeze(1)


def _block(dim: int, mid: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, mid), nn.GELU(), nn.Dropout(0.1), nn.Linear(mid, dim), nn.Dropout(0.1),
                         nn.LayerNorm(dim))  # fmt: skip


class Gating(nn.Module):
    """Four residual MLP blocks, then LayerNorm + Linear(C, 2): probabilities [T, 2] (column 0: compress)."""

    def __init__(self, hidden_size: int, expansion_factor: int = 4):
        super().__init__()
        for k in range(1, 5):
            self.add_module(f"block{k}", _block(hidden_size, hidden_size * expansion_factor))
        self.gate = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = x + block(x)
        return torch.softmax(self.gate(x), dim=-1)


def compress_decision(probs: torch.Tensor, relative: float, absolute: float) -> torch.Tensor:
    """Bool [T]: p > quantile(p, relative) and p >= absolute, p = probs[:, 0] (as `generate_flash`)."""
    p = probs[:, 0].float()
    return (p > torch.quantile(p, relative)) & (p >= absolute)


def route(model: nn.Module, vit_tokens: torch.Tensor, force: int | None = None) -> torch.Tensor:
    """Bool [T], True where a tile gives its compressed tokens, from the ViT output with CLS [T, 1+h*w, C].
    `model` holds pooling_before_gating, gating and config; `force` FULL or COMPRESSED skips the router."""
    if force is not None:
        return torch.full((vit_tokens.shape[0],), force == COMPRESSED, dtype=torch.bool)
    cfg: ModelConfig = model.config
    probs = model.gating(model.pooling_before_gating(vit_tokens[:, 1:, :]))
    return compress_decision(probs, cfg.flash_relative_threshold, cfg.flash_absolute_threshold).cpu()


def token_counts(config: ModelConfig, compress: torch.Tensor) -> list[int]:
    """Context tokens of each tile: a quarter of num_image_token (64 of 256) where compressed, else all."""
    n = config.num_image_token
    return [n // 4 if c else n for c in compress.tolist()]


def vir_embeddings(model: nn.Module, vit_tokens: torch.Tensor, force: int | None = None) -> torch.Tensor:
    """ViT output with CLS [T, 1+h*w, C] -> the tiles' embeddings concatenated [sum(tile_tokens), H]: mlp1 of
    the usual pixel shuffle for a full tile, mlp2 of a second one (each token a 4x4 block) for a compressed one."""
    cfg: ModelConfig = model.config
    compress = route(model, vit_tokens, force)
    x = vit_tokens[:, 1:, :]
    t, n, c = x.shape
    side = int(n**0.5)
    grid = x.reshape(t, side, side, c)
    r, ps = cfg.projector.downsample_ratio, cfg.projector.ps_version
    out: list[torch.Tensor] = [None] * t  # type: ignore[list-item]
    small, full = compress.nonzero().flatten().tolist(), (~compress).nonzero().flatten().tolist()
    if small:
        g = pixel_shuffle(grid[small], r * r, ps)
        for i, e in zip(small, model.mlp2(g.reshape(len(small), -1, g.shape[-1]))):
            out[i] = e
    if full:
        g = pixel_shuffle(grid[full], r, ps)
        for i, e in zip(full, model.mlp1(g.reshape(len(full), -1, g.shape[-1]))):
            out[i] = e
    return torch.cat(out)
