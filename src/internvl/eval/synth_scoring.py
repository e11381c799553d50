"""Per-task metrics of the Synthetic Visual World benchmark (contract §2, column "metric"); the data is synth/'s.

`score(task, prediction, item)` takes an item as written to a split's JSONL (a dict with "meta") or
an in-memory `SynthItem`. Normalization is limited to what cannot change a correct answer: outer
whitespace, one trailing period, and case for the lower-case word answers (never for OCR strings).
"""

from __future__ import annotations

import re

from internvl.errors import DataError
from internvl.eval.metrics import box_iou, parse_boxes
from internvl.synth.scene import COLOR_NAMES, shape_pool
from internvl.synth.tasks import TASKS

IOU_THRESHOLD = 0.5
_CAPTION_GROUP = re.compile(
    r"\b(\d+)\s+(" + "|".join(COLOR_NAMES) + r")\s+(" + "|".join(shape_pool(True)) + r")(?:s)?\b"
)
_FINAL = re.compile(r"Answer:\s*(-?\d+)")
_CASED = ("ocr", "chart_max", "mc")  # answers whose case is part of the answer (strings, letters)


def _gold(item) -> tuple[str, dict]:
    meta = item.meta if hasattr(item, "meta") else item.get("meta")
    if not isinstance(meta, dict) or "answer" not in meta:
        name = item.get("id", "?") if isinstance(item, dict) else "?"
        raise DataError(f"synth item {name} has no meta.answer to score against")
    return str(meta["answer"]), meta


def normalize(text: str, keep_case: bool = False) -> str:
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text if keep_case else text.lower()


def caption_set(text: str) -> set[tuple[int, str, str]]:
    """The (count, color, shape) groups named in a description; plural and order do not matter."""
    return {(int(n), c, s) for n, c, s in _CAPTION_GROUP.findall(text.lower())}


def final_answer(text: str) -> str | None:
    """The integer after the last `Answer:` of a step-by-step answer."""
    found = _FINAL.findall(text)
    return found[-1] if found else None


def score(task: str, prediction: str | None, item) -> bool:
    """True when `prediction` answers the item's first question correctly under the task's metric."""
    if task not in TASKS:
        raise DataError(f"cannot score unknown synth task {task!r}; expected one of: {', '.join(TASKS)}")
    if prediction is None:
        return False
    gold = _gold(item)[0]
    if task == "grounding":
        pred_boxes, gold_boxes = parse_boxes(prediction), parse_boxes(gold)
        return bool(pred_boxes) and box_iou(pred_boxes[0], gold_boxes[0]) >= IOU_THRESHOLD
    if task == "caption":
        got = caption_set(prediction)
        return bool(got) and got == caption_set(gold)
    if task == "reasoning":
        got = final_answer(prediction)
        return got is not None and int(got) == int(final_answer(gold))
    keep_case = task in _CASED
    return normalize(prediction, keep_case) == normalize(gold, keep_case)
