"""Samples -> model batches: right padding (one sample per row) or packing (several samples per row).

Targets are next-token labels shifted inside each sample, so a packed row never learns across a sample
boundary. Packed rows restart positions at 0 for every sample and carry `seq_ids`, which keeps attention
inside each sample (the reference passes cu_seqlens to flash-attention for the same effect). Padded rows need
no mask at all: padding is on the right and attention is causal.

Every batch runs at least one tile through the vision encoder (a dummy with image flag 0 when it has no
image, pitfall 15), so all ranks run the same modules and every parameter gets a gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from .data import BadRow

IGNORE = -100


@dataclass
class Sample:
    """One tokenized conversation and its tiles (a pure-text sample carries one dummy tile, flag 0)."""

    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, -100 where nothing is learned
    pixel_values: torch.Tensor  # [N, 3, S, S] float32
    image_flags: torch.Tensor  # [N] int64, 1 = real tile
    source: str = ""  # "file:line"
    # the binding loss's queries: (position, its keys (the image's tokens; a HOP query's: the question's), which
    # keys are targets (the named objects, or the words naming them), kind: WORD, ANSWER or HOP in train/binding.py)
    binding: list[tuple[int, list[int], list[bool], int]] = field(default_factory=list)
    # the place loss's rows: (a scene question's answer position, centres (x1, y1, x2, y2) of its first and last
    # mention's objects in [-1, 1], ANSWER) and (a mention's query, its objects' centre twice, WORD)
    places: list[tuple[int, list[float], int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return int(self.image_flags.sum())


@dataclass
class Batch:
    """A micro-batch ready for the model. `sup_index` lists the flat [B*T] positions that have a target and
    `sup_sample` the sample each belongs to; `sample_tokens[s]` is the number of supervised tokens of
    sample s (the n_i of the loss reductions)."""

    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor  # [N, 3, S, S]
    image_flags: torch.Tensor  # [N]
    sup_index: torch.Tensor  # [K]
    sup_sample: torch.Tensor  # [K]
    seq_ids: torch.Tensor | None = None  # [B, T], packed rows only
    sample_tokens: list[int] = field(default_factory=list)
    num_tokens: int = 0  # real (non-pad) tokens
    sources: list[str] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    # the binding loss (train/binding.py), None when no sample has a query: query rows [Q] and their keys
    # [Q, K] as flat [B*T] indices, which keys are real (not padding) and which are targets, and each query's
    # kind [Q] (WORD, ANSWER or HOP)
    bind_query: torch.Tensor | None = None
    bind_kind: torch.Tensor | None = None
    bind_keys: torch.Tensor | None = None
    bind_valid: torch.Tensor | None = None
    bind_target: torch.Tensor | None = None
    # the place loss: its rows [P] (flat [B*T] indices), their objects' centres [P, 4] and kinds [P] (ANSWER or
    # WORD); None without any
    place_query: torch.Tensor | None = None
    place_xy: torch.Tensor | None = None
    place_kind: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return len(self.sample_tokens)

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """target[t] = labels[t + 1]; the last position of the sample predicts nothing."""
    out = torch.full_like(labels, IGNORE)
    out[:-1] = labels[1:]
    return out


class Collator:
    """Builds a `Batch` from rows of samples. Picklable, so data-loader workers can run it."""

    def __init__(self, pad_id: int, dummy: torch.Tensor, packed: bool = False):
        self.pad_id = pad_id
        self.dummy = dummy  # [1, 3, S, S]
        self.packed = packed

    def __call__(self, items: Sequence[Sample | BadRow]) -> Batch:
        """Padded mode: one row per sample (the data-loader collate function)."""
        samples = [s for s in items if isinstance(s, Sample)]
        bad = [s for s in items if isinstance(s, BadRow)]
        return self.rows([[s] for s in samples], bad)

    def rows(self, rows: Sequence[Sequence[Sample]], bad: Sequence[BadRow] = ()) -> Batch:
        rows = [r for r in rows if r]
        width = max((sum(s.num_tokens for s in r) for r in rows), default=1)
        n_rows = max(len(rows), 1)
        input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        targets = torch.full((n_rows, width), IGNORE, dtype=torch.long)
        positions = torch.zeros((n_rows, width), dtype=torch.long)
        seq_ids = torch.zeros((n_rows, width), dtype=torch.long) if self.packed else None
        sup_index, sup_sample, sample_tokens, sources, tiles, flags = [], [], [], [], [], []
        queries: list[tuple[int, list[int], list[bool], int]] = []
        places: list[tuple[int, list[float], int]] = []
        num_tokens = 0
        for b, row in enumerate(rows):
            at = 0
            for k, s in enumerate(row):
                n = s.num_tokens
                t = shifted_targets(s.labels)
                input_ids[b, at : at + n] = s.input_ids
                targets[b, at : at + n] = t
                positions[b, at : at + n] = torch.arange(n)
                if seq_ids is not None:
                    seq_ids[b, at : at + n] = k
                sup = (t != IGNORE).nonzero().squeeze(1) + b * width + at
                sup_index.append(sup)
                sup_sample.append(torch.full_like(sup, len(sample_tokens)))
                sample_tokens.append(int(sup.numel()))
                sources.append(s.source)
                tiles.append(s.pixel_values)
                flags.append(s.image_flags)
                base = b * width + at
                queries += [(base + q, [base + k for k in keys], hits, kind) for q, keys, hits, kind in s.binding]
                places += [(base + q, xy, kind) for q, xy, kind in s.places]
                at += n
            num_tokens += at
            if seq_ids is not None:
                seq_ids[b, at:] = len(row)  # padding: a sequence of its own
                positions[b, at:] = torch.arange(width - at)
        if not self.packed:
            positions = torch.arange(width).expand(n_rows, width).clone()
        pixel_values, image_flags = self._tiles(tiles, flags)
        empty = torch.zeros(0, dtype=torch.long)
        binding = _binding_tensors(queries) if queries else {}
        if places:
            binding["place_query"] = torch.tensor([q for q, _, _ in places])
            wide = max(len(xy) for _, xy, _ in places)  # rows of several kinds: zeros after a row's own values
            binding["place_xy"] = torch.tensor([xy + [0.0] * (wide - len(xy)) for _, xy, _ in places],
                                               dtype=torch.float32)  # fmt: skip
            binding["place_kind"] = torch.tensor([kind for _, _, kind in places])
        return Batch(
            input_ids=input_ids, targets=targets, positions=positions, pixel_values=pixel_values,
            image_flags=image_flags, sup_index=torch.cat(sup_index) if sup_index else empty,
            sup_sample=torch.cat(sup_sample) if sup_sample else empty, seq_ids=seq_ids,
            sample_tokens=sample_tokens, num_tokens=num_tokens, sources=sources, bad=list(bad), **binding,
        )  # fmt: skip

    def _tiles(
        self, tiles: list[torch.Tensor], flags: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Dummy tiles only keep the vision encoder in the graph: one per batch is enough, none when the
        # batch has a real image. Their embeddings are multiplied by 0, so dropping extras changes nothing.
        real = [(t[f == 1], f[f == 1]) for t, f in zip(tiles, flags)]
        if any(f.numel() for _, f in real):
            return torch.cat([t for t, _ in real]), torch.cat([f for _, f in real])
        return self.dummy, torch.zeros(1, dtype=torch.long)


def _binding_tensors(queries: list[tuple[int, list[int], list[bool], int]]) -> dict[str, torch.Tensor]:
    """The Batch fields of the binding loss: keys padded to the longest list (padding: index 0, not valid)."""
    width = max(len(keys) for _, keys, _, _ in queries)
    keys = torch.zeros(len(queries), width, dtype=torch.long)
    valid = torch.zeros(len(queries), width, dtype=torch.bool)
    target = torch.zeros(len(queries), width, dtype=torch.bool)
    for i, (_, k, hits, _) in enumerate(queries):
        keys[i, : len(k)] = torch.tensor(k)
        valid[i, : len(k)] = True
        target[i, : len(k)] = torch.tensor(hits)
    query = torch.tensor([q for q, _, _, _ in queries])
    kind = torch.tensor([kind for _, _, _, kind in queries])
    return {"bind_query": query, "bind_kind": kind, "bind_keys": keys, "bind_valid": valid, "bind_target": target}


class Packer:
    """Greedy packing of a sample stream into rows of at most `max_tokens` tokens and `max_tiles` tiles,
    in stream order; a sample that does not fit starts the next row."""

    def __init__(self, max_tokens: int, max_tiles: int):
        self.max_tokens = max_tokens
        self.max_tiles = max_tiles

    def pack(self, stream: Iterator[tuple[object, Sample]]) -> Iterator[tuple[list[Sample], object]]:
        """Yields (row, position of the first sample not in any yielded row); `stream` yields
        (position, sample) pairs. Resuming the stream at that position reproduces the rest exactly."""
        row: list[Sample] = []
        tokens = tiles = 0
        for pos, s in stream:
            if row and (
                tokens + s.num_tokens > self.max_tokens or tiles + max(s.num_tiles, 1) > self.max_tiles
            ):
                yield row, pos
                row, tokens, tiles = [], 0, 0
            row.append(s)
            tokens += s.num_tokens
            tiles += max(s.num_tiles, 1)
        if row:
            yield row, None
