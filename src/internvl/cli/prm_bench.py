"""`internvl prm-bench PRM --data DIR/meta.json`: step-correctness of a process reward model in VisualProcessBench's
form (F1 of wrong-step detection, F1 of correct steps, their macro mean) on step-labelled rows (`internvl prm-data`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..options import add_config, add_options, option
from .bon import load_prm
from .options import ModelOptions


@dataclass
class BenchOptions:
    """The labelled steps and how a score becomes a verdict."""

    data: str | None = option(None, "meta file of PRM rows (`internvl prm-data` on a test split)", metavar="META.json",
                              required=True)  # fmt: skip
    limit: int | None = option(None, "only the first N rows of each dataset")
    threshold: float = option(0.5, "a step with p(+) at or above this reads as correct")
    prm_system: str | None = option(None, "the system prompt the PRM was trained with (default: VisualPRM's; '' for "
                                    "none)", metavar="TEXT")  # fmt: skip
    max_steps: int | None = option(None, "merge longer solutions into this many steps (the reference's max_steps)")
    max_num: int | None = option(None, "max tiles per image (default: the model's)")
    out: str | None = option(None, "write the metrics as JSON", metavar="FILE.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ModelOptions, skip=("quantize", "v2pe", "vir"))
    add_options(p, BenchOptions)
    add_config(p, ModelOptions, BenchOptions)


def run(args: argparse.Namespace) -> int:
    from ..errors import InternVLError
    from ..prm.bench import bench_table, evaluate, read_rows
    from .options import model_path

    if not 0.0 <= args.threshold <= 1.0:
        raise InternVLError(f"--threshold must be in [0, 1], got {args.threshold}")
    rows = read_rows(args.data, args.limit)  # bad data fails before the model loads
    prm = load_prm(str(model_path(args)), args)
    summary = evaluate(prm, rows, args.threshold, args.max_num, progress=True)
    print(bench_table(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0
