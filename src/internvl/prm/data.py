"""Step-labelled solutions from a Synthetic Visual World split's gold facts, written as VisualPRM fine-tuning rows
(system, then one human turn per step answered `+` or `-`) with a meta file that `internvl finetune` reads.

Every step from the first wrong one on is labelled wrong, as the error spreads to everything that follows.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass

from ..errors import DataError
from ..synth.questions import reasoning_text
from .prompt import PRM_SYSTEM_PROMPT, orm_turn, prm_conversation, split_steps

KINDS = ("correct", "count", "arith", "answer")  # a right chain; a miscount; a slip in the subtraction; a wrong copy
TASKS = ("reasoning", "count")  # the tasks whose gold facts say which step is wrong


@dataclass
class Solution:
    steps: list[str]
    labels: list[bool]  # True: correct so far
    kind: str
    text: str  # the whole solution, as a model would write it


def labels_from(n_steps: int, first_wrong: int | None) -> list[bool]:
    """Correct before the first wrong step, wrong from it on (None: every step is correct)."""
    return [first_wrong is None or k < first_wrong for k in range(n_steps)]


def _solution(text: str, first_wrong: int | None, kind: str) -> Solution:
    steps = split_steps(text)
    return Solution(steps, labels_from(len(steps), first_wrong), kind, text)


def reasoning_solution(kind: str, a: int, b: int, s1: str, s2: str, rng: random.Random) -> Solution:
    """A chain of the `reasoning` task ("There are {a} {s1}s and {b} {s2}s." / "{a} - {b} = {d}." /
    "Answer: {d}") with the error `kind` says: the counts (one shape miscounted by one, the rest computed from
    it), the subtraction, or the final answer copied wrong."""
    d = a - b
    if kind == "correct":
        return _solution(reasoning_text(a, b, s1, s2), None, kind)
    if kind == "count":
        miscounts = [(a + e, b) for e in (-1, 1) if a + e > b] + [(a, b + e) for e in (-1, 1) if 0 <= b + e < a]
        return _solution(reasoning_text(*rng.choice(miscounts), s1, s2), 0, kind)
    slips = [x for x in (d - 2, d - 1, d + 1, d + 2) if x >= 0]
    if kind == "arith":
        return _solution(reasoning_text(a, b, s1, s2, rng.choice(slips)), 1, kind)
    if kind == "answer":
        chain = reasoning_text(a, b, s1, s2).rsplit("Answer:", 1)[0]
        return _solution(f"{chain}Answer: {rng.choice(slips)}", 2, kind)
    raise DataError(f"unknown solution kind {kind!r}; expected one of: {', '.join(KINDS)}")


def count_solution(kind: str, gold: int, rng: random.Random) -> Solution:
    """The one-step answer of the `count` task: the count, or (any wrong kind) a count off by one or two."""
    if kind == "correct":
        return Solution([str(gold)], [True], kind, str(gold))
    wrong = str(rng.choice([x for x in (gold - 2, gold - 1, gold + 1, gold + 2) if 0 <= x <= 9]))
    return Solution([wrong], [False], "count", wrong)


def solutions_for(row: dict, kinds: tuple[str, ...], seed: int = 0) -> list[Solution]:
    """The solutions of one split row: one per kind (a `count` row: the right count and one wrong one)."""
    task, meta = row.get("task"), row.get("meta") or {}
    rng = random.Random(f"prm|{seed}|{row.get('id')}")
    if task == "reasoning":
        facts = {k: meta[k] for k in ("a", "b", "s1", "s2")}
        return [reasoning_solution(k, **facts, rng=rng) for k in kinds]
    if task == "count":
        wanted = ["correct"] * ("correct" in kinds) + ["count"] * any(k != "correct" for k in kinds)
        return [count_solution(k, int(meta["answer"]), rng) for k in wanted]
    raise DataError(f"row {row.get('id')!r}: task {task!r} has no step labels; expected one of: {', '.join(TASKS)}")


def prm_row(row_id: str, image, question: str, sol: Solution, system_message: str = PRM_SYSTEM_PROMPT,
            orm: bool = False) -> dict:  # fmt: skip
    """A fine-tuning row in the reference layout. `orm`: the whole solution in one turn, labelled by its last step
    (the reference `item2conv_orm`)."""
    if orm:
        turns = [(orm_turn(question, sol.text, image is not None), "+" if sol.labels[-1] else "-")]
    else:
        turns = prm_conversation(question, sol.steps, sol.labels, image is not None)
    conv = [{"from": "system", "value": system_message}]
    for user, answer in turns:
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    row = {"id": row_id} if image is None else {"id": row_id, "image": image}
    return {**row, "conversations": conv, "kind": sol.kind}


def _read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_prm_set(split_dir: str, out_dir: str, tasks: tuple[str, ...] = TASKS, kinds: tuple[str, ...] = KINDS,
                  limit: int | None = None, system_message: str = PRM_SYSTEM_PROMPT, orm: bool = False,
                  seed: int = 0) -> dict:  # fmt: skip
    """Write OUT/prm.jsonl (rows) and OUT/meta.json (its `root` points back at the split's images) from the first
    `limit` rows of each task of the split at `split_dir`; returns counts of rows, steps and labels."""
    unknown = [t for t in tasks if t not in TASKS] + [k for k in kinds if k not in KINDS]
    if unknown or not tasks or not kinds:
        raise DataError(f"unknown or missing task/kind {', '.join(map(repr, unknown))}; tasks: {', '.join(TASKS)}; "
                        f"kinds: {', '.join(KINDS)}")  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    rows, stats = [], Counter()
    for task in tasks:
        path = os.path.join(split_dir, f"{task}.jsonl")
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file (write the split with `internvl synth --tasks {task}`)")
        for row in _read_rows(path)[:limit]:
            question = row["conversations"][0]["value"]
            for sol in solutions_for(row, kinds, seed):
                rows.append(prm_row(f"{row['id']}_{sol.kind}", row.get("image"), question, sol, system_message, orm))
                stats[f"{task}/{sol.kind}"] += 1
                stats["+"] += sum(sol.labels)
                stats["-"] += len(sol.labels) - sum(sol.labels)
    with open(os.path.join(out_dir, "prm.jsonl"), "w") as f:
        f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
    root = os.path.relpath(os.path.abspath(split_dir), os.path.abspath(out_dir))
    name = "synth_orm" if orm else "synth_prm"
    meta = {name: {"root": root, "annotation": "prm.jsonl", "data_augment": False, "repeat_time": 1,
                   "length": len(rows)}}  # fmt: skip
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return {"rows": len(rows), "plus": stats.pop("+", 0), "minus": stats.pop("-", 0), "by_kind": dict(stats)}
