"""Prompt prefix caching: the keys and values of recent prompts, reused by later prompts that start alike.

The K/V of a position depend only on the tokens up to it, so a new prompt can take the first L positions
of any stored prompt it shares L tokens with (the system message, the template head, an earlier turn of
the conversation) and prefill only the rest. Stored prompts stop before their first image token: what
follows depends on the pixels, not on the ids. A small LRU bounded in entries and bytes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..model.cache import KVCache


@dataclass
class _Entry:
    ids: torch.Tensor  # int64 [n]
    k: torch.Tensor  # [layers, kv_heads, n, head_dim]
    v: torch.Tensor
    key: int = field(default_factory=itertools.count().__next__)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class Hit:
    """`length` leading positions of `entry` serve the prompt."""

    entry: _Entry
    length: int


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids two int64 vectors share."""
    n = min(a.shape[0], b.shape[0])
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


class PrefixCache:
    def __init__(self, max_bytes: int = 256 << 20, max_entries: int = 16, min_tokens: int = 16,
                 stop_token: int | None = None):  # fmt: skip
        self.max_bytes, self.max_entries, self.min_tokens = max_bytes, max_entries, min_tokens
        self.stop_token = stop_token  # the image context id: prefixes end before it
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # by key, least recently used first
        self.nbytes = 0
        self.hits = self.misses = self.tokens_reused = 0

    def _cacheable(self, prompt_ids: list[int]) -> int:
        """How many leading ids may be stored: up to the first image token."""
        if self.stop_token is not None:
            try:
                return prompt_ids.index(self.stop_token)
            except ValueError:
                pass
        return len(prompt_ids)

    def _best(self, prompt_ids: list[int]) -> Hit | None:
        if not self.entries:
            return None
        ids = torch.tensor(prompt_ids[: len(prompt_ids) - 1], dtype=torch.long)
        best: Hit | None = None
        for entry in self.entries.values():
            n = common_prefix(ids, entry.ids)
            if best is None or n > best.length:
                best = Hit(entry, n)
        return best if best is not None and best.length >= self.min_tokens else None

    def peek(self, prompt_ids: list[int]) -> int:
        """How many leading positions lookup() would serve now."""
        hit = self._best(prompt_ids)
        return hit.length if hit else 0

    def lookup(self, prompt_ids: list[int]) -> Hit | None:
        """The longest stored prefix of the prompt, leaving at least its last token to compute (the
        logits of the next token come from it); None below min_tokens."""
        hit = self._best(prompt_ids)
        if hit is None:
            self.misses += 1
            return None
        self.entries.move_to_end(hit.entry.key)
        self.hits += 1
        self.tokens_reused += hit.length
        return hit

    def load(self, hit: Hit, cache: KVCache, row: int) -> None:
        """Write the hit's positions into a row of `cache` (its length becomes hit.length)."""
        cache.write_prefix(row, hit.entry.k, hit.entry.v, hit.length)

    def store(self, prompt_ids: list[int], cache: KVCache, row: int) -> None:
        """Remember a prefilled prompt (row `row` of `cache` holds its K/V). A stored prompt that it extends
        is replaced; one that already covers it is only marked as used."""
        n = self._cacheable(prompt_ids)
        if n < self.min_tokens or self.max_entries < 1:
            return
        ids = torch.tensor(prompt_ids[:n], dtype=torch.long)
        for key, entry in list(self.entries.items()):
            shared = common_prefix(ids, entry.ids)
            if shared == n:  # nothing new
                self.entries.move_to_end(key)
                return
            if shared == entry.ids.shape[0]:  # the new prompt extends this one
                self._drop(key)
        k, v = cache.read_prefix(row, n)
        entry = _Entry(ids, k, v)
        if entry.nbytes > self.max_bytes:
            return
        self.entries[entry.key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes or len(self.entries) > self.max_entries:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0
