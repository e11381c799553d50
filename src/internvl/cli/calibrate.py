"""`internvl calibrate [MODEL] --out schedule.json [--head-mask heads.json]`: a per-layer visual keep schedule
(G-Search or P-Sigmoid) and YOPO's head mask from a few synthetic validation rows, for `--efficiency
schedule=...,yopo_head_mask=...` (eval/calibrate.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..options import add_config, add_options, option
from .options import ModelOptions, check_range, load_from_args


@dataclass
class CalibrateOptions:
    """What is searched, on which rows."""

    out: str | None = option(None, "schedule JSON to write (a keep ratio per decoder layer)")
    head_mask: str | None = option(None, "YOPO head-mask JSON to write (from head statistics)")
    method: str = option("g-search", "g-search: smallest ratios within --tolerance; p-sigmoid: best loss within "
                         "--budget; none: head mask only", choices=("g-search", "p-sigmoid", "none"))  # fmt: skip
    split: str = option("val", "synthetic split the rows come from", choices=("train", "val", "test"))
    n: int = option(20, "items per task of the generated split (default 20)")
    data_dir: str | None = option(None, "an existing split folder (default: generated into the cache)")
    tasks: str | None = option(None, "comma-separated task ids (default: all but mc)")
    rows: int = option(16, "validation rows drawn with --seed (default 16)")
    seed: int = option(0, "draws the rows and P-Sigmoid's trials (default 0)")
    max_num: int = option(6, "max tiles per image (default 6, as the evaluation)")
    tolerance: float = option(0.05, "G-Search: answer loss allowed above the plain model's, in nats (default 0.05)")
    step: float = option(0.1, "G-Search: keep-ratio grid step (default 0.1)")
    budget: float = option(0.5, "P-Sigmoid: fraction of the decoder's token-rows allowed (default 0.5)")
    trials: int = option(16, "P-Sigmoid: sigmoid shapes tried (default 16)")
    prune_heads: int | None = option(None, "head mask: prune this many heads of lowest visual activity")
    tau: float = option(0.2, "head mask without --prune-heads: YOPO's threshold on visual/text attention "
                        "(pruned where at most tau in over 40%% of rows; default 0.2)")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ModelOptions, skip=("efficiency",))  # the plain model is what is measured against
    add_options(p, CalibrateOptions)
    add_config(p, CalibrateOptions)


def run(args: argparse.Namespace) -> int:
    from ..errors import InternVLError
    from ..eval.calibrate import calibrate
    from ..eval.runner import synthetic_split
    from ..eval.synthetic import synth_tasks

    if args.out is None and args.head_mask is None:
        raise InternVLError("calibrate: nothing to write (give --out and/or --head-mask)")
    if args.method != "none" and args.out is None:
        raise InternVLError(f"calibrate: --method {args.method} needs --out")
    check_range("--rows", args.rows, 1)
    check_range("--max-num", args.max_num, 1, 64)
    if not 0.0 < args.step <= 1.0 or not 0.0 < args.budget <= 1.0:
        raise InternVLError("calibrate: --step and --budget must lie in (0, 1]")
    tasks = synth_tasks(args.tasks) if args.tasks else [t for t in synth_tasks(None) if t != "mc"]
    data = synthetic_split(args.split, args.n, tasks, args.data_dir)
    llm = load_from_args(args)
    report = calibrate(llm, data, rows=args.rows, tasks=tasks, seed=args.seed, method=args.method, out=args.out,
                       budget=args.budget, tolerance=args.tolerance, step=args.step, trials=args.trials,
                       head_mask_out=args.head_mask, prune_heads=args.prune_heads, tau=args.tau,
                       max_num=args.max_num)  # fmt: skip
    print(json.dumps(report, indent=1))
    return 0
