"""Training: supervised fine-tuning (full, partial, LoRA), training from scratch, and the shared loop.

    args.py        run arguments (CLI flags = YAML keys), validated dataclasses
    data.py        meta JSON, lazy JSONL index, row validation (file:line errors)
    media.py       training-time image tiles (JPEG augmentation) and video frame sampling
    tokenize.py    conversation -> input ids + labels per template (reference label rules)
    dataset.py     rows -> samples (media, placeholders, tokens)
    collate.py     samples -> batches (padding, packing, shifted targets)
    stream.py      per-rank data order, resumable, with loader workers
    objective.py   pluggable losses (SFT with token / sample / square reduction)
    freeze.py      freezing knobs; lora.py: PEFT LoRA, adapters saved (read and merged: checkpoint/adapter.py)
    optim.py       AdamW and the warmup + cosine schedule
    dist.py        torchrun / FSDP2; checkpoint.py: atomic checkpoints, exact resume
    metrics.py     CSV, TensorBoard, loss curve; loop.py: the trainer; run.py: train(args)

Imports are lazy so that `internvl finetune --help` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainArgs": "args", "ModelArgs": "args", "DataArgs": "args", "TuneArgs": "args", "OptimArgs": "args",
    "RunArgs": "args", "train": "run", "TrainResult": "run", "Trainer": "loop", "LoopConfig": "loop",
    "Objective": "objective", "ObjectiveOutput": "objective", "SFTObjective": "objective",
    "tokenize_conversation": "tokenize", "read_meta": "data", "build_index": "data", "BadRow": "data",
    "SFTDataset": "dataset", "Sample": "collate", "Batch": "collate", "Collator": "collate", "Packer": "collate",
    "merge_lora": "lora", "save_adapter": "lora", "prepare_model": "run", "sft_data": "run",
    "run_loop": "run", "DataSource": "run", "Prepared": "run",
}  # fmt: skip

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
