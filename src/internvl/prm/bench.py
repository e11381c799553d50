"""Step-correctness evaluation in VisualProcessBench's form (arXiv 2503.10291): every step of a solution labelled
correct or wrong, the PRM's p(+) at or above a threshold read as "correct", and the F1 of each class with their
macro mean (the benchmark's headline), on PRM rows such as `internvl prm-data` writes for a test split."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..errors import DataError
from ..eval.tasks import markdown, pct
from .prompt import MINUS, PLUS

_HEAD, _STEPS = "### Question:\n", "\n\n### Solution Process:\n"


def parse_row(row: dict, where: str = "row") -> tuple[str, list[str], list[bool]]:
    """(question, steps, labels) of a PRM fine-tuning row (an optional system turn, then human step / gpt +|-)."""
    turns = [t for t in row.get("conversations", []) if t.get("from") != "system"]
    humans, answers = [t["value"] for t in turns[0::2]], [t["value"] for t in turns[1::2]]
    ok = (turns and len(humans) == len(answers) and all(t["from"] == "human" for t in turns[0::2])
          and all(a in (PLUS, MINUS) for a in answers) and humans[0].startswith(_HEAD) and _STEPS in humans[0])  # fmt: skip
    if not ok:
        raise DataError(f"{where}: not a PRM row (human step turns, each answered '+' or '-', the first one "
                        f"'### Question:' ... '### Solution Process:')")  # fmt: skip
    question, first = humans[0][len(_HEAD) :].split(_STEPS, 1)
    return question, [first, *humans[1:]], [a == PLUS for a in answers]


def read_rows(meta_path: str, limit: int | None = None) -> list[tuple[dict, str]]:
    """(row, images root) of every row of a fine-tuning meta file's datasets, the first `limit` of each."""
    from ..train.data import read_meta

    out = []
    for spec in read_meta(meta_path):
        with open(spec.annotation) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out += [(r, spec.root) for r in rows[:limit]]
    if not out:
        raise DataError(f"{meta_path}: no rows")
    return out


def class_f1(labels: Sequence[bool], predicted: Sequence[bool], positive: bool) -> dict:
    """Precision, recall and F1 of one class (`positive` True: correct steps, False: wrong steps); F1 is None
    when the class neither occurs nor is predicted."""
    tp = sum(p == positive and y == positive for y, p in zip(labels, predicted))
    fp = sum(p == positive and y != positive for y, p in zip(labels, predicted))
    fn = sum(p != positive and y == positive for y, p in zip(labels, predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if tp + fp + fn == 0:
        f1 = None
    return {"n": tp + fn, "precision": precision, "recall": recall, "f1": f1}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def step_metrics(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]], threshold: float = 0.5) -> dict:
    """Per-step F1 of wrong-step detection and of correct steps, their macro mean, step accuracy, and the share of
    solutions whose first step read as wrong is their first wrong step (-1: none) ("first error")."""
    if len(scores) != len(labels) or any(len(s) != len(y) for s, y in zip(scores, labels)):
        raise DataError("step scores and labels differ in shape")
    flat_y = [y for ys in labels for y in ys]
    flat_p = [s >= threshold for ss in scores for s in ss]
    wrong, right = class_f1(flat_y, flat_p, False), class_f1(flat_y, flat_p, True)

    def first(flags) -> int:
        return next((k for k, ok in enumerate(flags) if not ok), -1)

    hits = [first([s >= threshold for s in ss]) == first(ys) for ss, ys in zip(scores, labels)]
    return {"solutions": len(labels), "steps": len(flat_y), "threshold": threshold,
            "macro_f1": _mean([c["f1"] for c in (wrong, right) if c["f1"] is not None]), "wrong": wrong, "correct": right,
            "accuracy": sum(y == p for y, p in zip(flat_y, flat_p)) / max(1, len(flat_y)),
            "first_error": sum(hits) / max(1, len(hits))}  # fmt: skip


def evaluate(prm, rows: Sequence[tuple[dict, str]], threshold: float = 0.5, max_num: int | None = None,
             progress: bool = False) -> dict:  # fmt: skip
    """Score every row's steps with `prm` (a `PRM`) and measure them: overall, and by the rows' `kind`."""
    from tqdm import tqdm

    scores, labels, kinds = [], [], []
    for i, (row, root) in enumerate(tqdm(rows, desc="steps", unit="solution", disable=not progress)):
        question, steps, ys = parse_row(row, f"row {i} ({row.get('id', '?')})")
        image = row.get("image")
        image = os.path.join(root, image) if isinstance(image, str) else None
        scores += prm.score_steps(question, [steps], image, max_num=max_num)
        labels.append(ys)
        kinds.append(row.get("kind", "all"))
    out = step_metrics(scores, labels, threshold)
    out["kinds"] = {}
    for kind in dict.fromkeys(kinds):
        own = [k == kind for k in kinds]
        out["kinds"][kind] = step_metrics([s for s, o in zip(scores, own) if o], [y for y, o in zip(labels, own) if o],
                                          threshold)  # fmt: skip
    return out


def bench_table(summary: dict) -> str:
    """Markdown: macro F1, the two classes' F1, step accuracy and first-error accuracy, overall and by kind."""
    rows = []
    for name, m in [("**all**", summary), *summary.get("kinds", {}).items()]:
        rows.append([name, m["solutions"], m["steps"], pct(m["macro_f1"]), pct(m["wrong"]["f1"]),
                     pct(m["correct"]["f1"]), pct(m["accuracy"]), pct(m["first_error"])])  # fmt: skip
    return markdown(["kind", "solutions", "steps", "macro F1", "F1 wrong steps", "F1 correct steps", "step accuracy",
                     "first error found"], rows)  # fmt: skip
