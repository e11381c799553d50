"""`internvl merge-lora BASE ADAPTER OUT`: fold a LoRA adapter into its base model and write a checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base model folder (either layout)")
    p.add_argument("adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder for the merged checkpoint")
    p.add_argument("--layout", choices=["original", "hf"], default="original", help="layout to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: the base checkpoint's)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint.io import load_model, save_model
    from ..errors import CheckpointError
    from ..tokenizer import Tokenizer
    from ..train.lora import apply_adapter

    base, adapter, out = Path(args.base), Path(args.adapter), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output folder exists and is not empty")
    tokenizer = Tokenizer.from_dir(base)
    model, _ = load_model(base, dtype=None, image_token_id=tokenizer.image_context_id)
    stored = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(model.dtype)]
    merged = apply_adapter(model.float(), adapter, merge=True)
    files = save_model(merged, out, layout=args.layout, dtype=args.dtype or stored, tokenizer_dir=base)
    print(f"merged {adapter} into {base} -> {out} ({args.layout}, {len(files)} file(s))")
    return 0
