"""MPO data: MMPR pair rows `{image | video?, question, chosen, rejected}` -> (chosen, rejected) samples built
like fine-tuning rows -> padded batches holding the chosen rows then the rejected rows (one forward for both).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from ..errors import DataError, InternVLError, TrainingError
from ..train.collate import IGNORE, Batch, Collator
from ..train.data import BadRow, DatasetSpec, RowIndex, build_index, check_row, read_meta


class StepState(Protocol):
    """What the batch stream needs of the objective (objective.MPOObjective): its resumable state."""

    def load_state(self, state: dict) -> None: ...

    def track(self, position: dict, micro_steps: int) -> None: ...


def pair_conversation(item: dict, side: str) -> dict:
    """The fine-tuning row of one side of a pair: the question, then `item[side]` as the answer."""
    row = {k: item[k] for k in ("image", "video", "clip") if k in item}
    row["conversations"] = [
        {"from": "human", "value": item["question"]},
        {"from": "gpt", "value": item[side]},
    ]
    return row


def check_pair_row(item, root: str, check_files: bool = True) -> str | None:
    """Why a parsed pair row cannot be trained on, or None (media and placeholders as fine-tuning rows)."""
    if not isinstance(item, dict):
        return f"a row must be a JSON object, got {type(item).__name__}"
    for key in ("question", "chosen", "rejected"):
        if not isinstance(item.get(key), str):
            return f"a preference row needs the string key {key!r}"
    return check_row(pair_conversation(item, "chosen"), root, check_files)


def build_pair_index(specs: list[DatasetSpec], skip_bad_rows: bool = False, check_files: bool = True,
                     progress: bool = False) -> RowIndex:  # fmt: skip
    """Scan and validate the pair annotations (repeat_time as fine-tuning data); errors name `file:line`."""
    return build_index(specs, skip_bad_rows, check_files, progress, check=check_pair_row, what="preference rows")


class PairDataset:
    """(epoch, row) -> (chosen Sample, rejected Sample) or BadRow; both sides get the same tiles."""

    def __init__(self, index: RowIndex, tokenizer, config, options):
        from ..train.dataset import SFTDataset

        self.index, self.sft = index, SFTDataset(index, tokenizer, config, options)
        self.dummy = self.sft.dummy

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        source = self.index.source(i)
        try:
            item, spec, source = self.index.read(i)
            sides = []
            for side in ("chosen", "rejected"):  # the same generator state: same augmentation, same frames
                rng = np.random.default_rng((self.sft.options.seed, epoch, i))
                s = self.sft.build(pair_conversation(item, side), spec.root, spec.data_augment,
                                   spec.max_dynamic_patch, rng, source)  # fmt: skip
                if not (s.labels[1:] != IGNORE).any():
                    raise DataError(f"the {side} answer has no token left within max_seq_length "
                                    f"{self.sft.options.max_seq_length}")  # fmt: skip
                sides.append(s)
            return tuple(sides)
        except (InternVLError, OSError, ValueError, IndexError, KeyError) as e:
            return BadRow(source, str(e))


class PairCollator:
    """Pairs -> one padded `Batch`: rows [chosen_1..chosen_B, rejected_1..rejected_B], tiles in row order."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, items) -> Batch:
        pairs = [p for p in items if isinstance(p, tuple)]
        bad = [p for p in items if isinstance(p, BadRow)]
        return self.collator.rows([[c] for c, _ in pairs] + [[r] for _, r in pairs], bad)


class PairBatches:
    """The padded batch stream, with the objective's state (delta) written into each step's data position,
    so that a checkpoint stores it and a resumed run starts from it."""

    def __init__(self, batches, objective: StepState):
        self.batches, self.objective = batches, objective

    @property
    def bad(self) -> list[BadRow]:
        return self.batches.bad

    def __call__(self, state: dict | None):
        state = dict(state) if state else None
        if state and "mpo" in state:
            self.objective.load_state(state.pop("mpo"))
        it = self.batches(state)
        try:
            for micro, position, epoch in it:
                position = dict(position)
                self.objective.track(position, len(micro))
                yield micro, position, epoch
        finally:
            it.close()


def pair_data(args, prepared, ctx, objective: StepState):
    """The pair rows of `args.data.data` as padded micro-batches for this rank (a `run.DataSource`)."""
    from ..train.dataset import SampleOptions, pad_token_id
    from ..train.run import DataSource
    from ..train.stream import PaddedBatches, PaddedPlan

    d, o, seed = args.data, args.optim, args.run.seed
    if d.packing:
        raise TrainingError("MPO trains on padded pairs: --packing is not supported")
    cfg, tokenizer = prepared.model.config, prepared.tokenizer
    index = build_pair_index(read_meta(d.data), d.skip_bad_rows, progress=ctx.is_main)
    options = SampleOptions.for_model(cfg, d, seed)
    dataset = PairDataset(index, tokenizer, cfg, options)
    pad_id = pad_token_id(tokenizer)
    plan = PaddedPlan(len(index), seed, o.batch_size, o.grad_accum, ctx.world_size, ctx.rank)
    total = o.max_steps or max(1, math.ceil(o.epochs * plan.steps_per_epoch))
    batches = PaddedBatches(dataset, PairCollator(Collator(pad_id, dataset.dummy)), plan, total, d.skip_bad_rows,
                            d.num_workers, ctx.device.type == "cuda")  # fmt: skip
    return DataSource(PairBatches(batches, objective), total, len(index), list(index.bad))
