"""`internvl merge-lora BASE ADAPTER OUT`: fold a LoRA adapter into its base model and write a checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import add_config, add_options, option


@dataclass
class MergeOptions:
    """The base, the adapter, and how the merged model is written."""

    base: str | None = option(None, "base model folder (either layout) or Hugging Face Hub id", positional="one",
                              metavar="base")  # fmt: skip
    revision: str | None = option(None, "branch, tag or commit of a Hub BASE (default: main)", metavar="REV")
    adapter: str | None = option(None, "LoRA adapter folder (adapter_config.json + adapter_model.safetensors)",
                                 positional="one", metavar="adapter")  # fmt: skip
    out: str | None = option(None, "output folder for the merged checkpoint", positional="one", metavar="out")
    layout: str = option("original", "layout to write", choices=("original", "hf"))
    dtype: str | None = option(None, "dtype of the written weights (default: the base checkpoint's)",
                               choices=("fp32", "bf16", "fp16"))  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, MergeOptions)
    add_config(p, MergeOptions)


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
