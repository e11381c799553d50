"""Answer metrics shared by the evaluation harness and the synthetic benchmark."""

from __future__ import annotations

import re
from collections.abc import Sequence

_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
_BOX_TAG = re.compile(r"<box>(.*?)</box>", re.DOTALL)


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """All `[x1, y1, x2, y2]` boxes inside `<box>...</box>` tags (or anywhere, if there is no tag)."""
    spans = _BOX_TAG.findall(text) or [text]
    boxes = []
    for span in spans:
        for m in _BOX.finditer(span):
            boxes.append(tuple(float(g) for g in m.groups()))
    return boxes


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes; degenerate boxes give 0."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _golds(gold: str | Sequence[str]) -> list[str]:
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


def normalize_short_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip, and drop trailing periods ("Paris." equals "paris")."""
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def exact_match(pred: str, gold: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer (see normalize_short_answer).

    Lighter than the VQAv2 normalization (no article or number-word rewriting): it is for our own short
    answers and the synthetic benchmark, not for reproducing VQAv2 scores.
    """
    p = normalize_short_answer(pred)
    return float(any(p == normalize_short_answer(g) for g in _golds(gold)))


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0  # "12%" is 0.12, so it does not match a gold of "12"
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, gold: str | Sequence[str], tol: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Methani et al. 2020), as pix2struct's `relaxed_correctness` in VLMEvalKit.

    A number is correct within `tol` relative error of the gold; anything else (or a gold of 0, which has
    no relative error) needs a case-insensitive exact match. The prediction is stripped first. With
    several golds the best one counts.
    """
    pred = str(pred).strip()
    p = _to_float(pred)
    for g in _golds(gold):
        t = _to_float(g)
        if p is not None and t:
            if abs(p - t) / abs(t) <= tol:
                return 1.0
        elif pred.lower() == g.lower():
            return 1.0
    return 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        cur = [j]
        for i, ca in enumerate(a, start=1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[-1]))
        prev = cur
    return prev[-1]


def anls(pred: str, golds: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA, InfoVQA; Biten et al. 2019).

    Both strings are lower-cased with whitespace collapsed; similarity = 1 - distance / longer length,
    best over golds, and 0 when below `threshold` (so a mostly wrong answer scores 0, not 0.4). A score of
    exactly `threshold` is kept, as in VLMEvalKit (the ANLS paper zeroes it: NL < tau is required).
    """
    p = " ".join(str(pred).strip().lower().split())
    best = 0.0
    for g in _golds(golds):
        g = " ".join(g.strip().lower().split())
        length = max(len(g), len(p))
        best = max(best, 1.0 - (levenshtein(g, p) / length if length else 0.0))
    return best if best >= threshold else 0.0


def box_accuracy(pred_text: str, gold_box: Sequence[float], thr: float = 0.5,
                 image_size: tuple[int, int] | None = None) -> float:
    """1.0 when the first predicted box overlaps the gold box with IoU >= thr (RefCOCO Precision@1).

    Without `image_size` both boxes are in the same coordinates. With `image_size=(width, height)` the
    prediction is in InternVL's 0-1000 grid and the gold in pixels; as in InternVL's evaluate_grounding.py,
    a prediction whose coordinates sum below 4 is taken as already 0-1 normalized.
    """
    boxes = parse_boxes(pred_text)
    if not boxes:
        return 0.0
    box = boxes[0]
    if image_size is not None:
        w, h = image_size
        scale = 1000.0 if sum(box) >= 4 else 1.0
        box = (box[0] / scale * w, box[1] / scale * h, box[2] / scale * w, box[3] / scale * h)
    return float(box_iou(box, tuple(float(v) for v in gold_box)) >= thr)
