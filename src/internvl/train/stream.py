"""The order in which each rank reads rows, and the data loader that turns it into micro-batches per step.

Padded mode: epoch e visits the rows in a permutation seeded by (seed, e); optimizer step s of the epoch owns
the global window [s*G, (s+1)*G) of it (G = micro x accumulation x world size), and micro-step a of rank r
takes the chunk starting at s*G + (a*W + r)*micro. Any (micro, accumulation, world) with the same G therefore
sees the same rows in every step, and the position in the data is just (epoch, step). A rank whose chunk of
the last, partial window is empty runs an empty batch (zero weight), so all ranks run the same number of
micro-steps.

Packed mode: rank r reads rows e.g. perm_e[r::W] epoch after epoch, packing them greedily; its position is
(epoch, offset) of the first sample not yet packed into a trained row.

Workers (processes) load and tile images and tokenize; per-sample randomness is keyed by (epoch, row), so the
batches do not depend on the number of workers and a resumed run reads exactly what the original would have.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import DataError
from .collate import Batch, Collator, Packer
from .data import BadRow


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng((seed, 7919, epoch)).permutation(n)


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C, `kill -- -PGID`, `pkill -f` and `docker stop` reach the workers too: the main process handles the
    # signal (a checkpoint after the current step) and stops the workers itself; a worker that died first would
    # make the loader raise instead. Workers still exit with their parent (the loader's watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _identity(x):
    return x


def _loader(dataset, sampler_kwargs: dict, collate_fn, num_workers: int, pin: bool, seed: int) -> DataLoader:
    return DataLoader(
        dataset, collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin,
        worker_init_fn=_ignore_stop_signals if num_workers else None,
        # a private generator: creating the iterator must not consume the global torch RNG (exact resume)
        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if num_workers else None,
        persistent_workers=False, **sampler_kwargs,
    )  # fmt: skip


@dataclass
class PaddedPlan:
    n: int  # rows
    seed: int
    micro: int
    accum: int
    world: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.global_batch)

    def step_chunks(self, order: np.ndarray, step: int) -> list[np.ndarray]:
        """This rank's micro-batches (row indices, possibly empty) for `step` of the epoch with `order`."""
        g, m, w = self.global_batch, self.micro, self.world
        base, end = step * g, min(self.n, (step + 1) * g)
        n_micro = math.ceil((end - base) / (m * w))
        chunks = []
        for a in range(n_micro):
            start = base + (a * w + self.rank) * m
            chunks.append(order[start : max(start, min(start + m, end))])
        return chunks

    def steps(self, start_step: int, total_steps: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """(epoch, step in epoch, chunks) for global steps start_step..total_steps-1."""
        spe = self.steps_per_epoch
        order, order_epoch = None, -1
        for g in range(start_step, total_steps):
            epoch, step = divmod(g, spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            yield epoch, step, self.step_chunks(order, step)


class _ChunkSampler:
    def __init__(self, plan: PaddedPlan, start: int, total: int):
        self.plan, self.start, self.total = plan, start, total

    def __iter__(self):
        for epoch, _, chunks in self.plan.steps(self.start, self.total):
            for c in chunks:
                yield [(epoch, int(i)) for i in c]


class PaddedBatches:
    """Micro-batches of `micro` samples each, one list per optimizer step, up to `total_steps`."""

    def __init__(self, dataset, collator: Collator, plan: PaddedPlan, total_steps: int, skip_bad_rows: bool,
                 num_workers: int = 0, pin_memory: bool = False):  # fmt: skip
        self.dataset, self.collator, self.plan = dataset, collator, plan
        self.total_steps, self.skip, self.num_workers, self.pin = (
            total_steps,
            skip_bad_rows,
            num_workers,
            pin_memory,
        )
        self.bad: list[BadRow] = []

    def __call__(self, state: dict | None) -> Iterator[tuple[list[Batch], dict, float]]:
        """From data position `state` ({"step": global step}); yields (micro-batches, position after, epoch)."""
        start = int(state["step"]) if state else 0
        loader = _loader(self.dataset, {"batch_sampler": _ChunkSampler(self.plan, start, self.total_steps)},
                         self.collator, self.num_workers, self.pin, self.plan.seed)  # fmt: skip
        it = iter(loader)
        spe = self.plan.steps_per_epoch
        for g, (_, _, chunks) in enumerate(self.plan.steps(start, self.total_steps), start):
            micro = [next(it) for _ in chunks]
            for b in micro:
                for bad in b.bad:
                    if not self.skip:
                        raise DataError(str(bad))
                    self.bad.append(bad)
            yield micro, {"mode": "padded", "step": g + 1}, (g + 1) / spe


class _KeyStream:
    """Rank r's rows epoch after epoch, from (epoch, offset): yields ((epoch, offset), (epoch, row))."""

    def __init__(self, n: int, seed: int, world: int, rank: int, epoch: int, offset: int):
        self.n, self.seed, self.world, self.rank = n, seed, world, rank
        self.epoch, self.offset = epoch, offset

    def positions(self):
        epoch, offset = self.epoch, self.offset
        while True:
            mine = epoch_order(self.n, self.seed, epoch)[self.rank :: self.world]
            for k in range(offset, len(mine)):
                yield (epoch, k), (epoch, int(mine[k]))
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        return (key for _, key in self.positions())


class PackedBatches:
    """Micro-batches of `micro` packed rows each; `accum` of them per optimizer step; never ends."""

    def __init__(self, dataset, collator: Collator, packer: Packer, n: int, seed: int, micro: int, accum: int,
                 world: int, rank: int, skip_bad_rows: bool, num_workers: int = 0, pin_memory: bool = False):  # fmt: skip
        self.dataset, self.collator, self.packer = dataset, collator, packer
        self.n, self.seed, self.micro, self.accum, self.world, self.rank = n, seed, micro, accum, world, rank
        self.skip, self.num_workers, self.pin = skip_bad_rows, num_workers, pin_memory
        self.bad: list[BadRow] = []

    def __call__(self, state: dict | None) -> Iterator[tuple[list[Batch], dict, float]]:
        """From data position `state` ({"epoch", "offset"}); yields (micro-batches, position after, epoch)."""
        position = (int(state["epoch"]), int(state["offset"])) if state else (0, 0)
        keys = _KeyStream(self.n, self.seed, self.world, self.rank, *position)
        loader = _loader(self.dataset, {"sampler": keys, "batch_size": None}, _identity, self.num_workers,
                         self.pin, self.seed + self.rank)  # fmt: skip

        def samples():
            for pos, item in zip(keys.positions(), loader):
                if isinstance(item, BadRow):
                    if not self.skip:
                        raise DataError(str(item))
                    self.bad.append(item)
                    continue
                yield pos[0], item

        rows = self.packer.pack(samples())
        while True:
            micro_batches, after = [], None
            for _ in range(self.accum):
                packs = []
                for _ in range(self.micro):
                    row, after = next(rows)
                    packs.append(row)
                micro_batches.append(self.collator.rows(packs))
            per_rank = math.ceil(self.n / self.world)
            yield (
                micro_batches,
                {"mode": "packed", "epoch": after[0], "offset": after[1]},
                after[0] + after[1] / per_rank,
            )
