"""`internvl build-prefs [MODEL] --data sft_meta.json --out DIR`: MPO preference pairs sampled from the model itself
(correctness pairs against the gold answers, and truncated-continuation negatives), ready for `internvl mpo`."""

from __future__ import annotations

import argparse

from .chat import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--data", required=True, metavar="META.json", help="fine-tuning meta file whose rows are asked"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="writes DIR/pairs.jsonl, meta.json, summary.json"
    )
    p.add_argument("--task", default=None, help="only rows of these synthetic tasks (comma-separated)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=8, help="answers sampled per question (default 8)")
    g.add_argument("--temperature", type=float, default=0.7, help="(default 0.7)")
    g.add_argument("--top-k", type=int, default=50, help="(default 50)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default 1.0)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="(default 256)")
    g.add_argument("--max-num", type=int, default=None, help="max tiles per image (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="base seed of every sample (default 0)")
    g.add_argument("--batch-size", type=int, default=16, help="requests in the engine at once (default 16)")
    g = p.add_argument_group("pairs")
    g.add_argument(
        "--pairs-per-question", type=int, default=4, help="correct-vs-wrong pairs per question (default 4)"
    )
    g.add_argument("--truncate-ratio", type=float, default=0.5,
                   help="Dropout-NTP: keep this fraction of a correct answer's words (default 0.5)")  # fmt: skip
    g.add_argument("--truncations-per-question", type=int, default=1,
                   help="correct answers cut and continued without the image, per question (default 1; 0: none)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..api import resolve_device
    from ..train.prefs import PrefOptions, Sampler, build_prefs, read_questions
    from .chat import MAX_TILES, check_range, load_from_args

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
