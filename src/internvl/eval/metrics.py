"""Answer metrics shared by the evaluation harness and the synthetic benchmark."""

from __future__ import annotations

import re

_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
_BOX_TAG = re.compile(r"<box>(.*?)</box>", re.S)


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
