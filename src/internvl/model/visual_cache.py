"""A KV cache whose layers may hold fewer tokens than the sequence has: visual tokens pruned after some decoder
layer (FastV, a keep schedule, YOPO's layer dropping; model/prune.py) are absent from the later layers' keys.

`lengths` still counts every token of a row (the next token's position); `dropped[layer, row]` counts the
tokens that layer does not hold, so the layer's next key goes to `lengths - dropped`. Kept tokens keep the
RoPE positions they had, since their keys were rotated before they were stored.
"""

from __future__ import annotations

import torch

from .cache import KVCache


class LayeredCache(KVCache):
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", capacity: int = 256):  # fmt: skip
        super().__init__(num_layers, batch, num_kv_heads, head_dim, dtype, device, capacity)
        self.dropped = torch.zeros(num_layers, batch, dtype=torch.long)
        # per row, per layer: which held prompt positions are visual (bool [held]); None: none are
        self.visual: list[list[torch.Tensor | None]] = [[None] * num_layers for _ in range(batch)]

    def held(self, layer: int) -> torch.Tensor:
        """Tokens layer `layer` holds, per row [B] (CPU)."""
        return self.lengths - self.dropped[layer]

    @property
    def pristine(self) -> bool:
        """Every layer holds every token and none is visual: the plain decoder path may run on it."""
        return not bool(self.dropped.any()) and all(v is None for row in self.visual for v in row)

    def visual_keys(self, layer: int, length: int) -> torch.Tensor | None:
        """[B, length] bool: which of the first `length` held positions of `layer` are visual; None if none."""
        maps = [row[layer] for row in self.visual]
        if all(m is None for m in maps):
            return None
        out = torch.zeros(self.batch, length, dtype=torch.bool)
        for b, m in enumerate(maps):
            if m is not None:
                n = min(length, m.shape[0])
                out[b, :n] = m[:n]
        return out.to(self.device)

    def keep(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long)
        dropped = self.dropped[:, idx] if rows else self.dropped[:, :0]
        visual = [self.visual[r] for r in rows]
        super().keep(rows)
        self.dropped, self.visual = dropped, visual

    def concat(self, other: KVCache) -> None:
        if isinstance(other, LayeredCache):
            dropped, visual = other.dropped, other.visual
        else:
            dropped = torch.zeros(self.num_layers, other.batch, dtype=torch.long)
            visual = [[None] * self.num_layers for _ in range(other.batch)]
        super().concat(other)
        self.dropped = torch.cat([self.dropped, dropped], dim=1)
        self.visual = self.visual + [list(v) for v in visual]

    def write_prefix(self, row: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        super().write_prefix(row, k, v, n)
        self.dropped[:, row] = 0  # stored prefixes are text before the first image: every layer holds them
        self.visual[row] = [None] * self.num_layers
