"""`internvl build-prefs [MODEL] --data sft_meta.json --out DIR`: MPO preference pairs sampled from the model itself
(correctness pairs against the gold answers, and truncated-continuation negatives), ready for `internvl mpo`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import add_config, add_options, option
from .options import GenerationOptions, ModelOptions


@dataclass
class PrefsOptions:
    """The questions asked and where the pairs go."""

    data: str | None = option(None, "fine-tuning meta file whose rows are asked", metavar="META.json", required=True)
    out: str | None = option(None, "writes DIR/pairs.jsonl, meta.json, summary.json", metavar="DIR", required=True)
    task: str | None = option(None, "only rows of these synthetic tasks (comma-separated)")
    limit: int | None = option(None, "only the first N questions")
    resume: bool = option(False, "continue an interrupted run in DIR")


@dataclass
class PairOptions:
    """How many answers are sampled and how they become pairs."""

    n: int = option(8, "answers sampled per question")
    batch_size: int = option(16, "requests in the engine at once")
    pairs_per_question: int = option(4, "correct-vs-wrong pairs per question")
    truncate_ratio: float = option(0.5, "Dropout-NTP: keep this fraction of a correct answer's words")
    truncations_per_question: int = option(
        1, "correct answers cut and continued without the image, per question (default 1; 0: none)"
    )


# preference pairs need varied answers: sampling defaults unlike chat's greedy ones
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_k": 50, "max_new_tokens": 256, "seed": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ModelOptions)
    add_options(p, PrefsOptions)
    add_options(p.add_argument_group("sampling"), GenerationOptions, defaults=SAMPLING_DEFAULTS,
                skip=("repetition_penalty", "num_segments"))  # fmt: skip
    add_options(p.add_argument_group("pairs"), PairOptions)
    add_config(p, ModelOptions, PrefsOptions, GenerationOptions, PairOptions)


def run(args: argparse.Namespace) -> int:
    from ..api import resolve_device
    from ..mpo.prefs import PrefOptions, Sampler, build_prefs, read_questions
    from .options import MAX_TILES, check_range, load_from_args

    check_range("--max-num", args.max_num, 1, MAX_TILES)
    resolve_device(args.device)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()] if args.task else None
    options = PrefOptions(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, pairs_per_question=args.pairs_per_question,
                          truncate_ratio=args.truncate_ratio, truncations_per_question=args.truncations_per_question,
                          tasks=tasks, limit=args.limit, seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    read = read_questions(args.data, tasks, args.limit)  # bad data fails before the model loads
    model = load_from_args(args)
    model.engine.max_batch = args.batch_size
    s = build_prefs(
        Sampler(model, args.max_num),
        args.data,
        args.out,
        options,
        resume=args.resume,
        progress=True,
        questions=read,
    )
    rate = f"{100 * s['correct_rate']:.1f}%" if s["correct_rate"] is not None else "n/a"
    print(f"{s['questions']} questions ({s['checkable']} checkable), {s['sampled']} answers sampled, {rate} correct; "
          f"{s['total_pairs']} pairs ({s['pairs']['correctness']} correctness, {s['pairs']['truncation']} "
          f"truncation) in {args.out}/pairs.jsonl; train with: internvl mpo MODEL --data {args.out}/meta.json")  # fmt: skip
    return 0
