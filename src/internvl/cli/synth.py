"""`internvl synth`: write one split of the Synthetic Visual World (images, JSONL, meta, MPO pairs, TSV)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import add_config, add_options, option


@dataclass
class SynthOptions:
    """Which split of the Synthetic Visual World, how large, and where."""

    out: str | None = option(None, "output directory (created; existing files are overwritten)", required=True)
    split: str | None = option(None, "which split to write", choices=("train", "val", "test"), required=True)
    n: int = option(200, "items per task (default 200)")
    tasks: str | None = option(None, "comma-separated task ids (default: all)")
    hexagon: bool = option(False, "the fine-tuning demonstration set: scenes and questions with the reserved hexagon")
    seed: int | None = option(None, "base seed (default 0); splits never share item seeds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SynthOptions)
    add_config(parser, SynthOptions)


def run(args: argparse.Namespace) -> int:
    from ..synth import generate_split

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    counts = generate_split(
        args.out, args.split, n=args.n, tasks=tasks, hexagon=args.hexagon, seed=args.seed, progress=True
    )
    print(
        f"wrote {counts['items']} items ({counts['multi_turn']} multi-turn) and {counts['images']} images "
        f"to {args.out} in {counts['seconds']:.1f} s ({counts['items_per_second']:.0f} items/s of CPU time)"
    )
    return 0
