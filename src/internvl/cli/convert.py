"""`internvl convert SRC DST --to original|hf`: rewrite a checkpoint in the other layout."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder (either layout) or Hugging Face Hub id")
    p.add_argument("dst", help="output folder (new or empty; never SRC itself)")
    p.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit of a Hub SRC (default: main)")
    p.add_argument("--to", choices=["original", "hf"], required=True, help="layout to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast weights (default: keep)")
    p.add_argument("--image-token-id", type=int, default=None,
                   help="id of <IMG_CONTEXT> when SRC has no tokenizer files (needed to write the -hf layout)")
    p.add_argument("--max-shard-size", type=float, default=4.0, help="shard size in GiB (default 4)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint.hub import resolve_model
    from ..checkpoint.io import load_model, save_model
    from ..errors import CheckpointError
    from ..tokenizer import IMG_CONTEXT, Tokenizer

    src, dst = resolve_model(args.src, args.revision), Path(args.dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output folder is the source checkpoint; write to a new folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: output folder exists and is not empty")
    image_token_id = args.image_token_id
    if image_token_id is None and ((src / "tokenizer.json").exists() or (src / "tokenizer.model").exists()):
        image_token_id = Tokenizer.from_dir(src).require(IMG_CONTEXT)
    model, report = load_model(src, dtype=args.dtype, image_token_id=image_token_id)
    if image_token_id is None and report.layout == "hf":
        import json

        model.image_token_id = json.loads((src / "config.json").read_text()).get("image_token_id")
    files = save_model(model, dst, layout=args.to, max_shard_bytes=int(args.max_shard_size * (1 << 30)),
                       tokenizer_dir=src)  # fmt: skip
    size = sum(f.stat().st_size for f in files) / 1e6
    print(f"converted {src} ({report.layout}) -> {dst} ({args.to}): {len(files)} file(s), {size:.1f} MB")
    if report.unexpected:
        print(f"note: ignored {len(report.unexpected)} unexpected tensor(s), e.g. {report.unexpected[0]}")
    return 0
