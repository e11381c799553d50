"""`internvl synth`: write one split of the Synthetic Visual World (images, JSONL, meta, MPO pairs, TSV)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="output directory (created; existing files are overwritten)"
    )
    parser.add_argument(
        "--split", required=True, choices=("train", "val", "test"), help="which split to write"
    )
    parser.add_argument("--n", type=int, default=200, help="items per task (default 200)")
    parser.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
    parser.add_argument(
        "--hexagon",
        action="store_true",
        help="the fine-tuning demonstration set: scenes and questions with the reserved hexagon",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="base seed (default 0); splits never share item seeds"
    )


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
