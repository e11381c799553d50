"""Key/value cache for decoding: one row per sequence, each row with its own length.

Rows can be dropped (`keep`) and joined (`concat`) between steps, which is what continuous batching needs.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", capacity: int = 256):  # fmt: skip
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long)  # tokens stored per row (on the CPU)
        self._pointers: tuple | None = None  # layer_pointers(), until the per-layer tensors change

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def same_lengths(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all()) if self.batch else True

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def layer_pointers(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Addresses of every layer's key and value tensors (int64 [layers] each), for kernels that
        write the cache in place; (None, None) unless every one is contiguous [batch, heads, capacity, dim]."""
        if self._pointers is None:
            tensors = self.k + self.v
            shape = tensors[0].shape if tensors else None
            if all(t.is_contiguous() and t.shape == shape for t in tensors):
                self._pointers = (torch.tensor([t.data_ptr() for t in self.k], dtype=torch.int64),
                                  torch.tensor([t.data_ptr() for t in self.v], dtype=torch.int64))
            else:
                self._pointers = (None, None)
        return self._pointers

    def reserve(self, needed: int) -> None:
        """Grow every row to hold at least `needed` positions (in chunks, so growth is rare)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, self.capacity * 2)
        self.resize((new_cap + 255) // 256 * 256)

    def resize(self, capacity: int) -> None:
        """Set every row's capacity to exactly `capacity` positions (at least the longest row)."""
        if capacity == self.capacity:
            return
        if capacity < int(self.lengths.max()) if self.batch else False:
            raise ValueError(f"capacity {capacity} is below the longest row ({int(self.lengths.max())})")
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                new = t.new_zeros(t.shape[0], t.shape[1], capacity, t.shape[3])
                keep = min(capacity, t.shape[2])
                new[:, :, :keep] = t[:, :, :keep]
                cache[i] = new
        self._pointers = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, uniform: bool = False) -> None:
        """Store new keys/values [B, Hkv, T, D] after each row's current length (`uniform`: all rows are
        known to have the same length, which allows a plain slice copy)."""
        t = k.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        if t == 1 and uniform:
            pos = int(self.lengths[0])
            kc[:, :, pos : pos + 1] = k
            vc[:, :, pos : pos + 1] = v
            return
        if t == 1:
            rows = torch.arange(k.shape[0], device=kc.device)
            pos = self.lengths.to(kc.device)
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            return
        for b, start in enumerate(self.lengths.tolist()):
            kc[b, :, start : start + t] = k[b]
            vc[b, :, start : start + t] = v[b]

    def view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, :length], self.v[layer][:, :, :length]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.k = [t.index_select(0, idx.to(t.device)) for t in self.k]
        self.v = [t.index_select(0, idx.to(t.device)) for t in self.v]
        self.lengths = self.lengths.index_select(0, idx)
        self._pointers = None

    def concat(self, other: KVCache) -> None:
        """Append the rows of `other` (same layer count, heads and dtype) after this cache's rows."""
        cap = max(self.capacity, other.capacity)
        self.resize(cap)
        other.resize(cap)
        self.k = [torch.cat([a, b]) for a, b in zip(self.k, other.k)]
        self.v = [torch.cat([a, b]) for a, b in zip(self.v, other.v)]
        self.lengths = torch.cat([self.lengths, other.lengths])
        self._pointers = None
