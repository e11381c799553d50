"""`internvl prm-data SPLIT --out DIR`: step-labelled solutions for a process reward model, from the gold facts of
a Synthetic Visual World split, as fine-tuning rows (DIR/prm.jsonl, DIR/meta.json) for `internvl finetune`.

A verb of its own rather than `internvl synth --prm`: it reads a split that `synth` wrote (its images stay where
they are), so the same command labels a train split for training and a test split for `internvl prm-bench`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import add_config, add_options, option


@dataclass
class PrmDataOptions:
    """Which split, which solutions, where."""

    split: str | None = option(None, "a split folder written by `internvl synth`", positional="one", metavar="SPLIT")
    out: str | None = option(None, "writes DIR/prm.jsonl and DIR/meta.json", metavar="DIR", required=True)
    tasks: str = option("reasoning,count", "tasks whose rows are labelled (reasoning, count)")
    kinds: str = option("correct,count,arith,answer", "solutions per reasoning row: right, miscount, wrong "
                        "subtraction, wrong final answer (a count row: right and one wrong count)")  # fmt: skip
    limit: int | None = option(None, "only the first N rows of each task")
    system_message: str | None = option(None, "the rows' system prompt (default: VisualPRM's; '' for none)",
                                        metavar="TEXT")  # fmt: skip
    orm: bool = option(False, "outcome-only rows: the whole solution in one turn, one +/- (the reference ORM data)")
    seed: int = option(0, "seed of the wrong counts and answers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, PrmDataOptions)
    add_config(p, PrmDataOptions)


def split_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def run(args: argparse.Namespace) -> int:
    from ..prm.data import write_prm_set
    from ..prm.prompt import PRM_SYSTEM_PROMPT

    system = PRM_SYSTEM_PROMPT if args.system_message is None else args.system_message
    s = write_prm_set(args.split, args.out, split_list(args.tasks), split_list(args.kinds), args.limit, system,
                      args.orm, args.seed)  # fmt: skip
    kinds = ", ".join(f"{k} {v}" for k, v in s["by_kind"].items())
    print(f"wrote {s['rows']} solutions ({kinds}) with {s['plus']} '+' and {s['minus']} '-' steps to "
          f"{args.out}/prm.jsonl; train with: internvl finetune MODEL --data {args.out}/meta.json")  # fmt: skip
    return 0
