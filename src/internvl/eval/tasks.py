"""Benchmarks as small Task classes: the questions to ask (`examples`), how one answer is judged, how a
prediction set is summarized. MCQTask and VQATask read VLMEvalKit TSVs (`tsv_task`); the Synthetic Visual
World split is in synthetic.py.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl.errors import DataError
from internvl.eval.circular import Hit, circular_expand, group_of, has_copies, mcq_report
from internvl.eval.extract import extract_choice
from internvl.eval.items import EvalItem
from internvl.eval.metrics import anls, box_accuracy, exact_match, parse_boxes, relaxed_accuracy
from internvl.eval.prompts import build_mcq_prompt, build_vqa_prompt
from internvl.eval.tsv import read_tsv

SHORT_TOKENS = 64  # letters, words, numbers, one box
LONG_TOKENS = 128  # descriptions and step-by-step answers
CIRCULAR_NAMES = ("mmbench", "ccbench", "circular", "mmcr")  # VLMEvalKit's rule for circular datasets
METRICS = {"exact": exact_match, "relaxed": relaxed_accuracy, "anls": anls, "iou": None}


@dataclass
class Example:
    """One generation request: the user question (placeholders as `InternVL.prepare` takes them), its
    images (paths, PIL images or lazy `ImageSource`s), a token budget, the row fields and the gold item."""

    key: str  # unique in the task; the predictions file is keyed by it
    prompt: str
    images: list
    max_new_tokens: int
    info: dict = field(default_factory=dict)  # written into the prediction row
    ref: Any = None  # what `judge` scores against


def rate(hits: list[float]) -> dict:
    """The count and the mean of 0/1 (or fractional) hits."""
    return {"n": len(hits), "accuracy": sum(hits) / len(hits) if hits else 0.0}


def _by_category(pairs) -> dict:
    groups: dict[str, list[float]] = {}
    for cat, hit in pairs:
        groups.setdefault(cat if cat is not None else "none", []).append(hit)
    return {c: rate(v) for c, v in sorted(groups.items())}


class MCQTask:
    """Multiple choice: `extract_choice` on each answer; vanilla accuracy, and circular when `circular`.

    Circular items that already hold their rotated copies (VLMEvalKit's MMBench files) are asked as they are
    and grouped as VLMEvalKit groups them; other items are rotated here first (`circular_expand`)."""

    kind = "mcq"

    def __init__(self, name: str, items: list[EvalItem], circular: bool, style: str = "internvl",
                 max_new_tokens: int = SHORT_TOKENS, where: str = ""):  # fmt: skip
        for it in items:
            if it.answer is None or it.answer not in it.options:
                have = ", ".join(it.options)
                raise DataError(f"{where or name}, index {it.index}, column 'answer': {it.answer!r} is not one "
                                f"of the options ({have})")  # fmt: skip
        self.name, self.circular, self.style = name, circular, style
        rotated = circular and has_copies(items)
        self.items = items if not circular or rotated else circular_expand(items)
        rotation: dict = {}
        if circular:  # the k-th index of a group, in index order, is its rotation k
            groups: dict = {}
            for it in self.items:
                groups.setdefault(group_of(it), []).append(it.index)
            rotation = {i: k for members in groups.values() for k, i in enumerate(sorted(members))}
        self.examples = []
        for it in self.items:
            g_index = group_of(it) if circular else it.g_index
            info = {"index": it.index, "g_index": g_index, "rotation": rotation.get(it.index, 0),
                    "category": it.category, "gold": it.answer, "options": it.options}  # fmt: skip
            prompt = build_mcq_prompt(it, style)
            self.examples.append(Example(str(it.index), prompt, it.images, max_new_tokens, info, it))
        self.settings = {"kind": self.kind, "prompt_style": style, "circular": circular,
                         "rotated_in_file": rotated}  # fmt: skip

    def judge(self, ex: Example, prediction: str) -> dict:
        choice = extract_choice(prediction, ex.ref.options)
        return {"extracted": choice, "hit": int(choice == ex.ref.answer)}

    def summarize(self, predictions: dict[str, str]) -> dict:
        records = [(ex.ref, predictions[ex.key]) for ex in self.examples if ex.key in predictions]
        report = mcq_report(records, self.circular)

        def part(score: dict) -> dict:
            hits: list[Hit] = score["hits"]
            return {**rate([h.hit for h in hits]), "categories": _by_category((h.item.category, h.hit) for h in hits),
                    "table": score["table"]}  # fmt: skip

        vanilla = part(report["vanilla"])
        circular = part(report["circular"]) if self.circular else None
        return {"overall": vanilla["accuracy"], "n": vanilla["n"], "vanilla": vanilla, "circular": circular}

    def table(self, summary: dict) -> str:
        v, c = summary["vanilla"], summary["circular"]
        rows = [("Overall", v["n"], v["accuracy"], c["accuracy"] if c else None)]
        for cat, r in v["categories"].items():
            rows.append((cat, r["n"], r["accuracy"], c["categories"][cat]["accuracy"] if c else None))
        head = ["category", "n", "vanilla"] + (["circular"] if c else [])
        return markdown(head, [[n, k, pct(a)] + ([pct(b)] if c else []) for n, k, a, b in rows])


def _golds(answer: str) -> list[str]:
    # VLMEvalKit stores several accepted answers as a Python list literal in the `answer` cell.
    if answer.startswith("[") and answer.endswith("]") and not answer.startswith("[["):
        try:
            value = ast.literal_eval(answer)
            if isinstance(value, list) and value:
                return [str(v) for v in value]
        except (ValueError, SyntaxError):
            pass
    return [answer]


def vqa_metric(name: str, items: list[EvalItem]) -> str:
    """The metric a dataset name implies: ChartQA relaxed, DocVQA/InfoVQA ANLS, boxes IoU, else exact."""
    low = name.lower()
    if "chartqa" in low:
        return "relaxed"
    if "docvqa" in low or "infovqa" in low:
        return "anls"
    if "refcoco" in low or "grounding" in low or any(it.answer and "<box>" in it.answer for it in items[:50]):
        return "iou"
    return "exact"


class VQATask:
    """Open answers scored by one metric (exact, relaxed, anls, iou) or by a given `score_fn`."""

    kind = "vqa"

    def __init__(self, name: str, items: list[EvalItem], metric: str = "exact", style: str = "internvl",
                 max_new_tokens: int = SHORT_TOKENS, where: str = ""):  # fmt: skip
        if metric not in METRICS:
            raise DataError(f"unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
        for it in items:
            if it.answer is None:
                raise DataError(f"{where or name}, index {it.index}, column 'answer': no answer to score against")
        self.name, self.metric = name, metric
        self.examples = []
        for it in items:
            q = it.question if it.hint is None else f"{it.hint}\n{it.question}"
            # the InternVL wrapper adds the short-answer line, but not to grounding requests
            prompt = build_vqa_prompt(q) if style == "internvl" and metric != "iou" else q
            info = {"index": it.index, "category": it.category, "gold": it.answer}
            self.examples.append(Example(str(it.index), prompt, it.images, max_new_tokens, info, it))
        self.settings = {"kind": self.kind, "prompt_style": style, "metric": metric}

    def judge(self, ex: Example, prediction: str) -> dict:
        gold = ex.ref.answer
        if self.metric == "iou":
            boxes = parse_boxes(gold)
            if not boxes:
                raise DataError(f"{self.name}, index {ex.ref.index}, column 'answer': no [x1, y1, x2, y2] box")
            return {"extracted": parse_boxes(prediction)[:1] or None, "hit": box_accuracy(prediction, boxes[0])}
        return {"extracted": prediction.strip(), "hit": METRICS[self.metric](prediction, _golds(gold))}

    def summarize(self, predictions: dict[str, str]) -> dict:
        scored = [(ex.ref.category, self.judge(ex, predictions[ex.key])["hit"])
                  for ex in self.examples if ex.key in predictions]  # fmt: skip
        total = rate([h for _, h in scored])
        return {"overall": total["accuracy"], "n": total["n"], "metric": self.metric,
                "categories": _by_category(scored)}  # fmt: skip

    def table(self, summary: dict) -> str:
        rows = [["Overall", summary["n"], pct(summary["overall"])]]
        rows += [[c, r["n"], pct(r["accuracy"])] for c, r in summary["categories"].items()]
        return markdown(["category", "n", summary["metric"]], rows)


def tsv_task(path: str | Path, circular: str = "auto", style: str = "internvl", metric: str = "auto",
             limit: int | None = None, max_new_tokens: int | None = None):  # fmt: skip
    """The task of a VLMEvalKit TSV: MCQ when rows have option columns, open VQA otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    items = read_tsv(path)
    if not items:
        raise DataError(f"{path}: no rows with an image")
    if "answer" not in items[0].raw:
        raise DataError(f"{path}, row 0 (header, line 1), column 'answer': missing; evaluation needs the gold "
                        f"answers (have {', '.join(items[0].raw)})")  # fmt: skip
    name = path.stem
    tokens = max_new_tokens or SHORT_TOKENS
    if any(it.options for it in items):
        on = {"on": True, "off": False}.get(circular, any(k in name.lower() for k in CIRCULAR_NAMES))
        if limit and on and has_copies(items):  # the first `limit` questions with all their copies
            keep = set([it.index for it in items if it.index == group_of(it)][:limit])
            items = [it for it in items if group_of(it) in keep]
        elif limit:
            items = items[:limit]
        return MCQTask(name, items, on, style, tokens, where=str(path))
    items = items[:limit] if limit else items
    chosen = vqa_metric(name, items) if metric == "auto" else metric
    return VQATask(name, items, chosen, style, tokens, where=str(path))


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal for the tables; None is "-"."""
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(head: list[str], rows: list[list]) -> str:
    """A markdown table (pasteable into the README)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
