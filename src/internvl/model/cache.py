"""Key/value cache for decoding: one row per sequence, each row with its own length.

Rows can be dropped (`keep`) and joined (`concat`) between steps, which is what continuous batching needs.
The rows live in slots of a larger allocation: joining fills free slots and leaving moves only the rows
that change slot, so neither copies the whole batch (the per-layer tensors stay contiguous views of the
first `batch` slots, which compiled code may write in place).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", capacity: int = 256):  # fmt: skip
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.lengths = torch.zeros(batch, dtype=torch.long)  # tokens stored per row (on the CPU)
        # per row, the next token's RoPE position minus its length; None: 0 (V2PE sets it, model/v2pe.py)
        self.offsets: torch.Tensor | None = None
        self._alloc(batch, capacity, batch)

    def _alloc(self, slots: int, capacity: int, batch: int) -> None:
        """Fresh zeroed slots (the rows of the old ones kept); `k`/`v` view the first `batch` of them."""
        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        old = getattr(self, "_slots", None)
        self._slots = ([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)],
                       [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)])
        if old is not None:
            n, keep = min(batch, old[0][0].shape[0] if old[0] else 0), min(capacity, old[0][0].shape[2] if old[0] else 0)
            for new_list, old_list in zip(self._slots, old):
                for new, o in zip(new_list, old_list):
                    new[:n, :, :keep] = o[:n, :, :keep]
        self._view(batch)

    def _view(self, batch: int) -> None:
        self.k = [_first_rows(t, batch) for t in self._slots[0]]
        self.v = [_first_rows(t, batch) for t in self._slots[1]]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def slots(self) -> int:
        return self._slots[0][0].shape[0] if self.num_layers else 0

    @property
    def same_lengths(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all()) if self.batch else True

    @property
    def capacity(self) -> int:
        return self._slots[0][0].shape[2] if self.num_layers else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

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
        self._alloc(self.slots, capacity, self.batch)

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
        """Keep only these rows, in this order. Where no row moves to a later slot (rows[i] >= i, as when
        the last rows fill the holes left by finished ones), only the moved rows are copied, in place."""
        lengths = self.lengths[torch.tensor(rows, dtype=torch.long)] if rows else self.lengths[:0]
        if self.offsets is not None:
            self.offsets = self.offsets[torch.tensor(rows, dtype=torch.long)] if rows else self.offsets[:0]
        if all(src >= i for i, src in enumerate(rows)) and len(set(rows)) == len(rows):
            for i, src in enumerate(rows):  # ascending: a source is never a slot already overwritten
                if src != i:
                    n = int(self.lengths[src])
                    for t in self._slots[0] + self._slots[1]:
                        t[i, :, :n] = t[src, :, :n]
            self.lengths = lengths
            self._view(len(rows))
            return
        idx = torch.tensor(rows, dtype=torch.long)
        self._slots = tuple([t.index_select(0, idx.to(t.device)) for t in ts] for ts in self._slots)
        self.lengths = lengths
        self._view(len(rows))

    def concat(self, other: KVCache) -> None:
        """Append the rows of `other` (same layer count, heads and dtype) after this cache's rows, in free
        slots (more slots, twice as many, when they run out)."""
        if other.capacity > self.capacity:
            self.resize(other.capacity)
        b0, b1 = self.batch, self.batch + other.batch
        if b1 > self.slots:
            self._alloc(max(b1, 2 * self.slots), self.capacity, b0)
        for mine, theirs in zip(self._slots[0] + self._slots[1], other.k + other.v):
            n = min(theirs.shape[2], self.capacity)
            mine[b0:b1, :, :n] = theirs[:, :, :n]
        if self.offsets is not None or other.offsets is not None:
            self.offsets = torch.cat([torch.zeros_like(x.lengths) if x.offsets is None else x.offsets
                                      for x in (self, other)])  # fmt: skip
        self.lengths = torch.cat([self.lengths, other.lengths])
        self._view(b1)

    # ---- prompt prefixes (engine.prefix_cache) ----

    def read_prefix(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first n positions of one row, keys and values [layers, heads, n, dim] each."""
        return (torch.stack([t[row, :, :n] for t in self.k]), torch.stack([t[row, :, :n] for t in self.v]))

    def write_prefix(self, row: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Fill positions [0, n) of one row from read_prefix() tensors and set its length to n."""
        self.reserve(n)
        for layer in range(self.num_layers):
            self.k[layer][row, :, :n] = k[layer, :, :n]
            self.v[layer][row, :, :n] = v[layer, :, :n]
        self.lengths[row] = n
        if self.offsets is not None:
            self.offsets[row] = 0  # stored prefixes are text (they stop before the first image)


def _first_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t[:n] sharing t's memory, but not an autograd view: a cache made under no_grad may be written under
    grad mode, which autograd forbids for views."""
    if n == t.shape[0]:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (n, *t.shape[1:]), t.stride())
