"""`internvl bon MODEL --prm PRM --data SPLIT`: best-of-N with a process reward model on a synthetic split (accuracy
of greedy, one sample, majority vote, outcome-reward BoN, PRM BoN and pass@N, per task); with -p, one question."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..options import add_config, add_options, option
from .options import ModelOptions


@dataclass
class RewardOptions:
    """The reward models, and how they read a solution."""

    prm: str | None = option(None, "the process reward model (folder or Hub id)", metavar="PRM", required=True)
    orm: str | None = option(None, "an outcome reward model for the ORM column (default: the PRM reading the whole "
                             "answer as one step)", metavar="ORM")  # fmt: skip
    prm_system: str | None = option(None, "the system prompt the PRM was trained with (default: VisualPRM's; '' for "
                                    "none)", metavar="TEXT")  # fmt: skip
    max_steps: int | None = option(None, "merge longer solutions into this many steps (the reference's max_steps)")
    aggregate: str = option("mean", "a solution's score from its step scores (the reference's soft scoring: mean)",
                            choices=("mean", "sum", "min", "last"))  # fmt: skip


@dataclass
class BonDataOptions:
    """What is asked: a synthetic split's tasks, or one question."""

    data: str | None = option(None, "a split folder written by `internvl synth`", metavar="SPLIT")
    task: str = option("reasoning,count", "tasks of the split (comma-separated)")
    n_items: int = option(50, "items per task")
    out: str | None = option(None, "write the summary and every answer and score as JSON", metavar="FILE.json")
    prompt: str | None = option(None, "one question instead of a split (prints the candidates and scores)", short="-p")
    image: str | None = option(None, "the image of -p", short="-i")


@dataclass
class BonSampling:
    """How the N candidates are sampled."""

    n: int = option(8, "candidates per question")
    temperature: float = option(0.7, "sampling temperature")
    top_k: int = option(50, "sample from the k likeliest tokens (0: all)")
    top_p: float = option(1.0, "nucleus sampling")
    max_new_tokens: int = option(128, "tokens per answer at most")
    seed: int = option(0, "base seed: candidate k of an item has a seed of (seed, item, k)")
    batch_size: int = option(16, "generation requests in the engine at once")
    max_num: int | None = option(None, "max tiles per image (default: the model's)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ModelOptions)
    add_options(p.add_argument_group("reward models"), RewardOptions)
    add_options(p.add_argument_group("data"), BonDataOptions)
    add_options(p.add_argument_group("sampling"), BonSampling)
    add_config(p, ModelOptions, RewardOptions, BonDataOptions, BonSampling)


def load_prm(path: str, args: argparse.Namespace, batch_size: int = 8):
    """A `PRM` of the model at `path` on --device in --dtype, reading solutions as --prm-system/--max-steps say."""
    from ..api import load, resolve_device
    from ..prm import PRM, PRM_SYSTEM_PROMPT

    system = PRM_SYSTEM_PROMPT if args.prm_system is None else args.prm_system
    model = load(path, device=resolve_device(args.device), dtype=args.dtype)
    return PRM(model, system, args.max_steps, batch_size)


def run(args: argparse.Namespace) -> int:
    from ..errors import InternVLError
    from ..eval.synthetic import SyntheticTask
    from ..prm.select import BonOptions, best_of, bon_table, run_bon
    from .options import load_from_args

    if (args.data is None) == (args.prompt is None):
        raise InternVLError("give --data SPLIT (a synthetic split) or -p QUESTION, one of the two")
    o = BonOptions(args.n, args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed, args.aggregate,
                   args.batch_size, args.max_num)  # fmt: skip
    task = SyntheticTask(args.data, args.task, limit=args.n_items) if args.data else None  # bad data fails first
    policy = load_from_args(args)
    policy.engine.max_batch = max(policy.engine.max_batch, args.batch_size)
    prm = load_prm(args.prm, args)
    if task is None:
        got = best_of(policy, prm, args.prompt, args.image, n=o.n, aggregate_by=o.aggregate, seed=o.seed,
                      temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, max_new_tokens=o.max_new_tokens)  # fmt: skip
        for text, score, steps in sorted(zip(got.candidates, got.scores, got.step_scores), key=lambda c: -c[1]):
            print(f"{score:.3f}  [{' '.join(f'{s:.2f}' for s in steps)}]  {text!r}")
        print(got.answer)
        return 0
    orm = load_prm(args.orm, args) if args.orm else None
    summary = run_bon(policy, prm, orm, task, o, progress=True)
    print(bon_table(summary))
    seconds = sum(t["sample_seconds"] + t["score_seconds"] for t in summary["tasks"].values())
    print(f"{sum(t['items'] for t in summary['tasks'].values())} items, N = {o.n}, in {seconds:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0
