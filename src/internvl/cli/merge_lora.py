"""`internvl merge-lora BASE ADAPTER OUT`: fold a LoRA adapter into its base model and write a checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base model folder (either layout) or Hugging Face Hub id")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of a Hub BASE (default: main)")  # fmt: skip
    p.add_argument("adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder for the merged checkpoint")
    p.add_argument("--layout", choices=["original", "hf"], default="original", help="layout to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: the base checkpoint's)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint.adapter import load_adapter_model
    from ..checkpoint.hub import resolve_model
    from ..checkpoint.io import save_model
    from ..errors import CheckpointError

    adapter, out = Path(args.adapter), Path(args.out)
    if not adapter.is_dir():
        raise CheckpointError(f"{adapter}: no such adapter folder")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output folder exists and is not empty")
    base = resolve_model(args.base, args.revision)
    merged, _, _ = load_adapter_model(adapter, base, dtype=args.dtype)
    files = save_model(merged, out, layout=args.layout, tokenizer_dir=base)
    print(f"merged {adapter} into {base} -> {out} ({args.layout}, {len(files)} file(s))")
    return 0
