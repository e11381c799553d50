"""`internvl eval [MODEL] --data FILE.tsv` (VLMEvalKit MCQ or VQA TSVs) and `internvl eval synthetic [MODEL]`
(the Synthetic Visual World test split): greedy answers, predictions, a summary and a per-category table."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..options import add_config, add_options, option
from .options import MAX_TILES, MODEL_HELP, ModelOptions, check_range, load_from_args

SYNTHETIC = "synthetic"


@dataclass
class TsvOptions:
    """VLMEvalKit TSV files."""

    data: list[str] = option([], "benchmark TSV (repeatable)", append=True, metavar="FILE.tsv")  # noqa: RUF009
    circular: str = option("auto", "rotate MCQ options; auto: on for names with mmbench/ccbench/circular "
                           "(synthetic: on for mc)", choices=("auto", "on", "off"))  # fmt: skip
    prompt_style: str = option("internvl", "InternVL wrapper prompts (default) or VLMEvalKit's generic ones",
                               choices=("internvl", "vlmeval"))  # fmt: skip
    metric: str = option("auto", "open-answer metric; auto: chartqa relaxed, docvqa/infovqa anls, <box> answers "
                         "iou, else exact", choices=("auto", "exact", "relaxed", "anls", "iou"))  # fmt: skip


@dataclass
class SyntheticOptions:
    """The synthetic benchmark."""

    split: str = option("test", "which split", choices=("train", "val", "test"))
    n: int = option(200, "items per task in the generated split (default 200)")
    tasks: str | None = option(None, "comma-separated task ids (default: all)")
    data_dir: str | None = option(None, "an existing split folder (default: generated into the cache)")


@dataclass
class EvalRunOptions:
    """How the evaluation runs."""

    out: str | None = option(None, "output folder (default eval_out/<model>/<dataset>)")
    batch_size: int = option(8, "requests in the engine at once (default 8)")
    max_new_tokens: int | None = option(None, "override the per-task budget (64; 128 long)")
    max_num: int | None = option(None, "max tiles per image (default 6 as the reference eval, or the model's "
                                 "max_dynamic_patch when smaller)")  # fmt: skip
    limit: int | None = option(None, "only the first N questions (per task for synthetic)")
    resume: bool = option(False, "keep the predictions already in --out, ask the rest")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = ("internvl eval [MODEL] --data FILE.tsv [--data ...] [options]\n"
               "       internvl eval synthetic [MODEL] [--split test] [--n 200] [--tasks a,b] [options]")  # fmt: skip
    p.add_argument("target", nargs="*", metavar="MODEL",
                   help=f"{MODEL_HELP}; `synthetic [MODEL]` evaluates the synthetic split (a folder named "
                        f"'synthetic' is ./synthetic)")  # fmt: skip
    add_options(p, ModelOptions, skip=("model",))
    add_options(p.add_argument_group("VLMEvalKit TSV files"), TsvOptions)
    add_options(p.add_argument_group("synthetic benchmark"), SyntheticOptions)
    add_options(p.add_argument_group("run"), EvalRunOptions)
    add_config(p, ModelOptions, TsvOptions, SyntheticOptions, EvalRunOptions)


def _target(args: argparse.Namespace) -> tuple[bool, str | None]:
    """(synthetic?, MODEL) from the positional words: [MODEL] or synthetic [MODEL]."""
    from ..errors import DataError

    words = list(args.target)
    synthetic = bool(words) and words[0] == SYNTHETIC
    if synthetic:
        words = words[1:]
    if len(words) > 1:
        raise DataError(f"unexpected argument {words[1]!r}: give one MODEL (or `synthetic MODEL`)")
    return synthetic, (words[0] if words else None)


def _tasks(args: argparse.Namespace, synthetic: bool) -> list:
    from ..errors import DataError
    from ..eval.runner import synthetic_split
    from ..eval.synthetic import SyntheticTask, synth_tasks
    from ..eval.tasks import tsv_task
    from .options import model_path

    if synthetic:
        if args.data:
            raise DataError("`internvl eval synthetic` takes no --data (it evaluates the synthetic split)")
        names = synth_tasks(args.tasks)
        args.model = str(model_path(args))  # before spending time on generating the split
        folder = synthetic_split(args.split, args.n, names, args.data_dir)
        return [SyntheticTask(folder, names, args.circular, args.limit, args.max_new_tokens, name=SYNTHETIC)]
    if not args.data:
        raise DataError("nothing to evaluate: give --data FILE.tsv, or run `internvl eval synthetic`")
    tasks = [tsv_task(path, args.circular, args.prompt_style, args.metric, args.limit, args.max_new_tokens)
             for path in args.data]  # fmt: skip
    args.model = str(model_path(args))
    return tasks


def _check(args: argparse.Namespace) -> None:
    from ..api import resolve_device

    for flag, value in (("--batch-size", args.batch_size), ("--n", args.n), ("--limit", args.limit),
                        ("--max-new-tokens", args.max_new_tokens)):  # fmt: skip
        check_range(flag, value, 1)
    check_range("--max-num", args.max_num, 1, MAX_TILES)
    resolve_device(args.device)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.hub import is_hub_id
    from ..eval.runner import evaluate

    _check(args)
    synthetic, args.model = _target(args)
    model_name = Path(args.model).name if args.model else "nano"  # an id's name, not its snapshot's hash
    hub_id = args.model if args.model and is_hub_id(args.model) else None
    # read and check the data, then find the model (a Hub id is downloaded), then load it: bad input fails fast
    tasks = _tasks(args, synthetic)
    args.revision = None  # args.model is the local folder now
    model = load_from_args(args)
    model.engine.max_batch = args.batch_size
    for task in tasks:
        out = Path(args.out) if args.out else Path("eval_out") / model_name / task.name
        if args.out and len(tasks) > 1:
            out = out / task.name
        try:
            summary = evaluate(model, task, out, batch_size=args.batch_size, max_num=args.max_num,
                               resume=args.resume, model_name=hub_id or str(model.path or model_name))  # fmt: skip
        except KeyboardInterrupt:
            print(f"interrupted: the finished answers are in {out / 'predictions.jsonl'}; add --resume to "
                  f"continue", file=sys.stderr)  # fmt: skip
            raise
        print(f"\n{task.name}: {summary['n']} questions, overall {100 * summary['overall']:.1f}%"
              + (f", circular {100 * summary['circular']['accuracy']:.1f}%" if summary.get("circular") else ""))  # fmt: skip
        print(task.table(summary))
        print(f"predictions: {out / 'predictions.jsonl'}\nsummary: {out / 'summary.json'}")
    return 0
