"""Bar charts of the Synthetic Visual World: 3-5 lettered bars, integer values 1-9 read from a grid."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .render import pick_font
from .scene import COLOR_NAMES, COLORS, jitter, random_size

MIN_LABEL_PX = 14


@dataclass
class Chart:
    width: int
    height: int
    letters: list[str]
    values: list[int]
    colors: list[tuple[int, int, int]]
    ticks: bool  # numbers on the y axis on some charts only: the grid alone must be enough
    bar_frac: float  # bar width as a fraction of its slot
    font_u: float

    def to_json(self) -> dict:
        return {"letters": self.letters, "values": self.values}


def sample_chart(rng: random.Random, values: list[int]) -> Chart:
    """A chart for the given bar values: random size, letters, colors and bar widths."""
    n = len(values)
    w, h = random_size(rng)
    if rng.random() < 0.5:
        start = rng.randrange(0, 27 - n)
        letters = list(string.ascii_uppercase[start : start + n])
    else:
        letters = rng.sample(string.ascii_uppercase, n)
    if rng.random() < 0.5:
        colors = [jitter(rng, COLORS[rng.choice(COLOR_NAMES)])] * n
    else:
        colors = [jitter(rng, COLORS[c]) for c in rng.sample(COLOR_NAMES, n)]
    return Chart(
        w, h, letters, list(values), colors, rng.random() < 0.5, rng.uniform(0.45, 0.75), rng.random()
    )


def layout(chart: Chart) -> tuple[int, int, int, int, float, int]:
    """Plot area (left, top, right, bottom), pixels per unit and letter cap height."""
    w, h = chart.width, chart.height
    # letters at least 14 px tall, but never wider than their bar slot on narrow charts
    label = max(MIN_LABEL_PX, min(round(0.06 * h), int(0.5 * 0.85 * w / len(chart.values))))
    left = round(0.06 * w) + (label + 8 if chart.ticks else 0)
    right = w - round(0.05 * w)
    top = round(0.06 * h)
    bottom = h - round(1.5 * label) - 10
    unit = (bottom - top) / 10  # 9 grid lines plus headroom above the tallest possible bar
    return left, top, right, bottom, unit, label


def bar_boxes(chart: Chart) -> list[tuple[int, int, int, int]]:
    left, top, right, bottom, unit, _ = layout(chart)
    slot = (right - left) / len(chart.values)
    boxes = []
    for i, v in enumerate(chart.values):
        half = slot * chart.bar_frac / 2
        cx = left + slot * (i + 0.5)
        boxes.append((round(cx - half), round(bottom - v * unit), round(cx + half), bottom))
    return boxes


def render_chart(chart: Chart) -> Image.Image:
    img = Image.new("RGB", (chart.width, chart.height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom, unit, label = layout(chart)
    grid = (215, 215, 215)
    for v in range(1, 10):
        y = round(bottom - v * unit)
        draw.line((left, y, right, y), fill=grid, width=1)
    if chart.ticks:
        font = pick_font(chart.font_u, max(9, round(label * 0.7)))
        for v in range(1, 10):
            y = round(bottom - v * unit)
            draw.text((left - 6, y), str(v), font=font, fill=(60, 60, 60), anchor="rm")
    for box, rgb in zip(bar_boxes(chart), chart.colors):
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=rgb)
    axis = (40, 40, 40)
    draw.line((left, top, left, bottom), fill=axis, width=2)
    draw.line((left, bottom, right, bottom), fill=axis, width=2)
    font = pick_font(chart.font_u, label)
    for box, letter in zip(bar_boxes(chart), chart.letters):
        draw.text(
            ((box[0] + box[2]) / 2, bottom + 6 + label), letter, font=font, fill=(25, 25, 25), anchor="ms"
        )
    return img
