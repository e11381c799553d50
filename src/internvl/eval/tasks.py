"""Benchmarks as small Task classes: the questions to ask (`examples`), how one answer is judged, how a
prediction set is summarized. MCQTask and VQATask read VLMEvalKit TSVs; SyntheticTask is the Synthetic
Visual World split (`synth.score` per task, its `mc` task through MCQTask, so both agree by construction).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl.errors import DataError
from internvl.eval.circular import Hit, circular_expand, group_of, has_copies, mcq_report
from internvl.eval.extract import extract_choice
from internvl.eval.metrics import anls, box_accuracy, exact_match, parse_boxes, relaxed_accuracy
from internvl.eval.prompts import build_mcq_prompt, build_vqa_prompt
from internvl.eval.tsv import EvalItem, ImageSource, read_tsv

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


def _rate(hits: list[float]) -> dict:
    return {"n": len(hits), "accuracy": sum(hits) / len(hits) if hits else 0.0}


def _by_category(pairs) -> dict:
    groups: dict[str, list[float]] = {}
    for cat, hit in pairs:
        groups.setdefault(cat if cat is not None else "none", []).append(hit)
    return {c: _rate(v) for c, v in sorted(groups.items())}


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
            return {**_rate([h.hit for h in hits]), "categories": _by_category((h.item.category, h.hit) for h in hits),
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
        return markdown(head, [[n, k, _pct(a)] + ([_pct(b)] if c else []) for n, k, a, b in rows])


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
        total = _rate([h for _, h in scored])
        return {"overall": total["accuracy"], "n": total["n"], "metric": self.metric,
                "categories": _by_category(scored)}  # fmt: skip

    def table(self, summary: dict) -> str:
        rows = [["Overall", summary["n"], _pct(summary["overall"])]]
        rows += [[c, r["n"], _pct(r["accuracy"])] for c, r in summary["categories"].items()]
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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(head: list[str], rows: list[list]) -> str:
    """A markdown table (pasteable into the README)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {line_no}: not JSON ({exc.msg})") from None
    return rows


# ---- the Synthetic Visual World benchmark --------------------------------------------------------------

# Accuracy the built-in model is expected to reach on the test split (the README table's "target" column).
# Provisional: the nano model's training work owns these numbers.
# the built-in model's targets on the test split (issue: "The Synthetic Visual World and the built-in nano model")
SYNTH_TARGETS = {
    "color": 0.98, "shape": 0.98, "position": 0.98, "relation": 0.98, "mc": 0.98, "text": 0.98,
    "count": 0.90, "ocr": 0.90, "multi_image": 0.90, "chart_max": 0.90,
    "grounding": 0.85, "caption": 0.85, "chart_value": 0.85, "reasoning": 0.85, "video": 0.95,
}  # fmt: skip
SYNTH_LONG = ("caption", "reasoning")
_TAIL_NUMBER = re.compile(r"(\d+)$")


def synth_tasks(names: str | list[str] | None) -> list[str]:
    """Task ids from "a,b" or a list (None: all), checked against the contract's task list."""
    from internvl.synth import TASKS

    if names is None:
        return list(TASKS)
    names = [t.strip() for t in names.split(",")] if isinstance(names, str) else list(names)
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise DataError(f"unknown synthetic task(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"expected some of: {', '.join(TASKS)}")  # fmt: skip
    return names


def _images(row: dict, root: Path) -> list[str]:
    paths = row.get("image") or []
    return [str(root / p) for p in ([paths] if isinstance(paths, str) else paths)]


def _mc_item(row: dict, root: Path, where: str) -> EvalItem:
    """A synthetic `mc` row as the EvalItem its mc.tsv row reads back as (same index, options, image)."""
    meta = row["meta"]
    m = _TAIL_NUMBER.search(str(row.get("id", "")))
    item = EvalItem(index=int(m.group(1)) if m else -1, question=meta["base_question"],
                    options=dict(zip("ABCD", meta["options"])), answer=meta["answer"], category=meta["category"],
                    images=[ImageSource(path=p, where=where) for p in _images(row, root)])  # fmt: skip
    # The exact mapping: the question the model was trained on is "<image>\n" + build_mcq_prompt(item).
    asked = row["conversations"][0]["value"].removeprefix("<image>\n")
    if m is None or build_mcq_prompt(item, "internvl") != asked:
        raise DataError(f"{where}: the mc question is not the VLMEvalKit prompt of its options "
                        f"(id {row.get('id')!r}, question {asked!r})")  # fmt: skip
    return item


class SynthPart:
    """One synthetic task other than mc: the row's own question, scored by `synth.score`."""

    def __init__(self, task: str, rows: list[dict], root: Path, max_new_tokens: int):
        self.task = task
        self.examples = [Example(row["id"], row["conversations"][0]["value"], _images(row, root), max_new_tokens,
                                 {"index": row["id"], "category": task, "gold": row["meta"]["answer"]}, row)
                         for row in rows]  # fmt: skip

    def judge(self, ex: Example, prediction: str) -> dict:
        from internvl.synth import score
        from internvl.synth.scoring import caption_set, final_answer, normalize

        if self.task == "reasoning":
            extracted = final_answer(prediction)
        elif self.task == "caption":
            extracted = sorted(caption_set(prediction))
        elif self.task == "grounding":
            extracted = parse_boxes(prediction)[:1] or None
        else:
            extracted = normalize(prediction, keep_case=True)
        return {"extracted": extracted, "hit": int(score(self.task, prediction, ex.ref))}

    def summarize(self, predictions: dict[str, str]) -> dict:
        judged = [(ex, self.judge(ex, predictions[ex.key])["hit"]) for ex in self.examples if ex.key in predictions]
        hits = [h for _, h in judged]
        out = {**_rate(hits), "overall": _rate(hits)["accuracy"]}
        # the fine-tuning demonstration split flags the items whose question is about the hexagon
        flagged = [(bool(ex.ref["meta"].get("hexagon")), h) for ex, h in judged if "hexagon" in ex.ref["meta"]]
        if any(f for f, _ in flagged):
            out["hexagon"] = _rate([h for f, h in flagged if f])
            out["other"] = _rate([h for f, h in flagged if not f])
        return out


class SyntheticTask:
    """A Synthetic Visual World split: per-task accuracy (`synth.score`); `mc` also circular. Overall is
    the mean over tasks. The mc task runs through MCQTask, so it matches `internvl eval --data mc.tsv`."""

    kind = "synthetic"

    def __init__(self, data_dir: str | Path, tasks=None, circular: str = "auto", limit: int | None = None,
                 max_new_tokens: int | None = None, name: str = "synthetic"):  # fmt: skip
        root = Path(data_dir)
        self.name, self.parts, self.examples = name, {}, []
        for task in synth_tasks(tasks):
            path = root / f"{task}.jsonl"
            if not path.is_file():
                raise DataError(f"{path}: no such file (task {task!r} is not in the split at {root})")
            rows = _read_jsonl(path)[:limit] if limit else _read_jsonl(path)
            tokens = max_new_tokens or (LONG_TOKENS if task in SYNTH_LONG else SHORT_TOKENS)
            if task == "mc":
                items = [_mc_item(r, root, f"{path}, line {i}") for i, r in enumerate(rows, start=1)]
                part = MCQTask("mc", items, circular != "off", "internvl", tokens, where=str(path))
            else:
                part = SynthPart(task, rows, root, tokens)
            self.parts[task] = part
            for ex in part.examples:
                info = {"task": task, **ex.info}
                self.examples.append(Example(f"{task}/{ex.key}", ex.prompt, ex.images, ex.max_new_tokens, info, ex))
        self.settings = {"kind": self.kind, "data_dir": str(root), "tasks": list(self.parts),
                         "circular_mc": "mc" in self.parts and self.parts["mc"].circular}  # fmt: skip

    def judge(self, ex: Example, prediction: str) -> dict:
        return self.parts[ex.info["task"]].judge(ex.ref, prediction)

    def summarize(self, predictions: dict[str, str]) -> dict:
        tasks = {}
        for task, part in self.parts.items():
            own = {ex.key: predictions[f"{task}/{ex.key}"] for ex in part.examples if f"{task}/{ex.key}" in predictions}
            s = part.summarize(own)
            tasks[task] = {"n": s["n"], "accuracy": s["overall"], "target": SYNTH_TARGETS.get(task)}
            if task == "mc":
                tasks[task]["categories"] = s["vanilla"]["categories"]
                if s["circular"] is not None:
                    tasks[task]["circular"] = s["circular"]["accuracy"]
            for group in ("hexagon", "other"):
                if group in s:
                    tasks[task][group] = s[group]
        accs = [t["accuracy"] for t in tasks.values()]
        out = {"overall": sum(accs) / len(accs) if accs else 0.0, "n": sum(t["n"] for t in tasks.values()),
               "tasks": tasks}  # fmt: skip
        for group in ("hexagon", "other"):
            parts = [t[group] for t in tasks.values() if group in t]
            if parts:
                n = sum(p["n"] for p in parts)
                hit = sum(p["accuracy"] * p["n"] for p in parts)
                out[group] = {"n": n, "accuracy": hit / n if n else 0.0}
        return out

    def table(self, summary: dict) -> str:
        return synth_table(summary)


def synth_table(summary: dict) -> str:
    """The per-task markdown table of a synthetic summary: task, n, accuracy, target (README-ready)."""
    rows = []
    for task, t in summary["tasks"].items():
        target = t.get("target")
        rows.append([task, t["n"], _pct(t["accuracy"]), _pct(target)])
        if "circular" in t:
            rows.append([f"{task} (circular)", t["n"], _pct(t["circular"]), "-"])
    rows.append(["**mean**", summary["n"], _pct(summary["overall"]), "-"])
    for group, label in (("hexagon", "items about the hexagon"), ("other", "other items of the split")):
        if group in summary:
            rows.append([label, summary[group]["n"], _pct(summary[group]["accuracy"]), "-"])
    return markdown(["task", "n", "accuracy (%)", "target (%)"], rows)
