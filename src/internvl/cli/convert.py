"""`internvl convert SRC DST --to original|hf`: rewrite a checkpoint in the other layout, or make a training
checkpoint (OUT/checkpoints/step-N) a complete model folder over its start model (checkpoint/export.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import add_config, add_options, option


@dataclass
class ConvertOptions:
    """What is converted, and how the result is written."""

    src: str | None = option(None, "checkpoint folder (either layout), Hugging Face Hub id, or a training "
                             "checkpoint OUT/checkpoints/step-N", positional="one", metavar="src")  # fmt: skip
    dst: str | None = option(None, "output folder (new or empty; never SRC itself)", positional="one", metavar="dst")
    revision: str | None = option(None, "branch, tag or commit of a Hub SRC (default: main)", metavar="REV")
    to: str | None = option(None, "layout to write", choices=("original", "hf"), required=True)
    dtype: str | None = option(None, "cast weights (default: keep)", choices=("fp32", "bf16", "fp16"))
    image_token_id: int | None = option(
        None, "id of <IMG_CONTEXT> when SRC has no tokenizer files (needed to write the -hf layout)"
    )
    max_shard_size: float = option(4.0, "shard size in GiB (default 4)")
    base: str | None = option(None, "a training checkpoint's start model, for the tensors it lacks (a frozen "
                              "encoder; default: the one its run recorded)", metavar="DIR")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ConvertOptions)
    add_config(p, ConvertOptions)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint.export import export_checkpoint, find_base, is_training_checkpoint
    from ..checkpoint.hub import resolve_model
    from ..checkpoint.io import load_model, save_model
    from ..errors import CheckpointError
    from ..tokenizer import IMG_CONTEXT, Tokenizer

    src, dst = resolve_model(args.src, args.revision), Path(args.dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output folder is the source checkpoint; write to a new folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: output folder exists and is not empty")
    shard_bytes = int(args.max_shard_size * (1 << 30))
    if is_training_checkpoint(src):
        base = resolve_model(args.base) if args.base else None
        export_checkpoint(src, dst, base, layout=args.to, dtype=args.dtype, max_shard_bytes=shard_bytes)
        start = find_base(src, base)
        print(f"exported the training checkpoint {src} over {start.weights or start.config} -> {dst} ({args.to})")
        return 0
    if args.base:
        raise CheckpointError(f"{src}: --base is for a training checkpoint (OUT/checkpoints/step-N)")
    image_token_id = args.image_token_id
    if image_token_id is None and ((src / "tokenizer.json").exists() or (src / "tokenizer.model").exists()):
        image_token_id = Tokenizer.from_dir(src).require(IMG_CONTEXT)
    model, report = load_model(src, dtype=args.dtype, image_token_id=image_token_id)
    if image_token_id is None and report.layout == "hf":
        import json

        model.image_token_id = json.loads((src / "config.json").read_text()).get("image_token_id")
    files = save_model(model, dst, layout=args.to, max_shard_bytes=shard_bytes, tokenizer_dir=src)
    size = sum(f.stat().st_size for f in files) / 1e6
    print(f"converted {src} ({report.layout}) -> {dst} ({args.to}): {len(files)} file(s), {size:.1f} MB")
    if report.unexpected:
        print(f"note: ignored {len(report.unexpected)} unexpected tensor(s), e.g. {report.unexpected[0]}")
    return 0
