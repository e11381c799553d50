"""InternViT vision encoder (300M style: LayerNorm + qkv bias; 6B style: RMSNorm + full-width q/k norm).

Module and parameter names mirror the original checkpoints (`vision_model.embeddings...`,
`vision_model.encoder.layers.{i}.attn.qkv`, ...), so the original layout loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as the reference)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rms_norm" else nn.LayerNorm(dim, eps=eps)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: drop the residual branch with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def linspace(end: float, n: int) -> list[float]:
    """Drop-path rates 0..end over n layers (plain Python: works while building on the meta device)."""
    return [end * i / (n - 1) for i in range(n)] if n > 1 else [0.0] * n


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig, image_size: int):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, cfg.hidden_size))

    def _patch_positions(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        if (h, w) == (self.grid, self.grid):
            return pos.to(dtype)
        # other image sizes: bicubic interpolation of the 2-D table in fp32, as the reference does every forward
        c = pos.shape[-1]
        pos = pos.float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.reshape(1, c, h * w).permute(0, 2, 1).to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # [B, C, h, w]
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(b, 1, c)
        pos = torch.cat([self.position_embedding[:, :1].to(dtype), self._patch_positions(h, w, dtype)], dim=1)
        return torch.cat([cls, x], dim=1) + pos


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            # normalizes over the full width, before the split into heads
            self.q_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path_rate: float):
        super().__init__()
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.norm1 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.norm2 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.ls1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.initializer_factor))
        self.ls2 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.initializer_factor))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x).to(x.dtype)) * self.ls1, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x).to(x.dtype)) * self.ls2, self.drop_path_rate, self.training)
        return x


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        rates = linspace(cfg.drop_path_rate, cfg.num_hidden_layers)
        self.layers = nn.ModuleList(VisionLayer(cfg, r) for r in rates)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        for layer in self.layers[: num_layers if num_layers is not None else len(self.layers)]:
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine position table (MAE's): half the channels encode the row,
    half the column, each at dim/4 frequencies, so a patch's (x, y) is a linear read-out of its embedding."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    ang = coords[:, None] * freqs[None]  # [grid, quarter]
    axis = torch.cat([ang.sin(), ang.cos()], dim=1)  # [grid, dim/2]
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return F.pad(table, (0, dim - table.shape[1])).float()


class InternVisionModel(nn.Module):
    """Patch embedding + CLS + position table, then pre-norm layers with layer scale; no final norm."""

    def __init__(self, cfg: VisionConfig, image_size: int | None = None):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg, image_size or cfg.image_size)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden states of `select_layer` (index into [embeddings, layer 1, ..., layer L]), CLS included."""
        total = len(self.encoder.layers) + 1
        index = select_layer if select_layer >= 0 else total + select_layer
        if not 0 <= index < total:
            raise ValueError(f"select_layer {select_layer} is out of range for {total - 1} layers")
        return self.encoder(self.embeddings(pixel_values), num_layers=index)

    def init_from_scratch(self) -> None:
        """Position table for training from random weights: the fixed 2-D sine-cosine table (zeros would
        leave the patches with no position at all, and a frozen encoder never gets one)."""
        emb = self.embeddings
        with torch.no_grad():
            emb.position_embedding.zero_()
            emb.position_embedding[0, 1:] = sincos_2d(emb.grid, emb.position_embedding.shape[-1])

    def set_drop_path_rate(self, rate: float) -> None:
        for layer, r in zip(self.encoder.layers, linspace(rate, len(self.encoder.layers))):
            layer.drop_path_rate = r
