"""One builder per task id of the contract: sample a scene whose answer is balanced, then ask about it.

Each builder draws the answer first (uniform where the contract allows), then composes a scene for it.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from .chart import sample_chart
from .questions import (
    POSITION_NAMES,
    RELATION_MIN_GAP,
    Turn,
    ask_caption,
    ask_chart_max,
    ask_chart_value,
    ask_color,
    ask_count,
    ask_grounding,
    ask_ocr,
    ask_position,
    ask_relation,
    ask_shape,
    mc_prompt,
    plural,
    reasoning_text,
)
from .render import FONT_SHRINK
from .scene import (
    COLOR_NAMES,
    HEXAGON,
    MARGIN,
    SHAPES,
    TEXT_COLORS,
    Scene,
    Text,
    center,
    fill,
    jitter,
    new_scene,
    other_combo,
    shape_pool,
)
from .video import ask_direction, sample_clip

MC_CATEGORIES = ("color", "shape", "count", "position")
HEXAGON_FOCUS = 2 / 3  # with hexagon=True, the share of questions whose focus shape is the hexagon
POSITION_BAND = 0.04  # keep position targets this far (of the canvas) from the 3x3 cell borders
OCR_CHARS = string.ascii_uppercase + string.digits
TEXT_WIDTH = 1.25  # reserved text width per character, in cap heights (wide enough for most fonts)
TRIES = 30
REASONING_PAIRS = [(a, b) for a in range(1, 10) for b in range(a) if a + b <= 9]


@dataclass
class Target:
    color: str
    shape: str
    region: Callable[[Scene], tuple] | None = None  # bounds of the box center, given the canvas
    accept: Callable[[tuple, list, Scene], bool] | None = None  # extra test against earlier targets


def focus_shape(rng: random.Random, hexagon: bool) -> str:
    return HEXAGON if hexagon and rng.random() < HEXAGON_FOCUS else rng.choice(SHAPES)


def compose(rng: random.Random, targets: list[Target], extra: int, shapes, colors=COLOR_NAMES, avoid=()):
    """A scene with `targets` placed first (in order) and `extra` distractors; fresh canvases on crowding."""
    for _ in range(TRIES):
        scene, placed = new_scene(rng, len(targets) + extra), []
        for t in targets:
            accept = (lambda box, t=t: t.accept(box, placed, scene)) if t.accept else None
            obj = scene.add(rng, t.shape, t.color, t.region(scene) if t.region else None, accept)
            if obj is None:
                break
            placed.append(obj)
        else:
            if fill(scene, rng, extra, shapes, colors, avoid):
                return scene, placed
    raise RuntimeError(f"could not place {len(targets)} targets and {extra} distractors in {TRIES} canvases")


def _color(rng, hexagon):
    shape, color = focus_shape(rng, hexagon), rng.choice(COLOR_NAMES)
    others = [s for s in shape_pool(hexagon) if s != shape]
    scene, (t,) = compose(rng, [Target(color, shape)], rng.randint(0, 6), others)
    return scene, ask_color(scene, t)


def _shape(rng, hexagon):
    shape, color = focus_shape(rng, hexagon), rng.choice(COLOR_NAMES)
    others = [c for c in COLOR_NAMES if c != color]
    scene, (t,) = compose(rng, [Target(color, shape)], rng.randint(0, 6), shape_pool(hexagon), others)
    return scene, ask_shape(scene, t)


def _count(rng, hexagon):
    pool = shape_pool(hexagon)
    template = rng.choice(("objects", "shape", "color_shape"))
    if template == "objects":
        scene, _ = compose(rng, [], rng.randint(1, 9), pool)
        return scene, ask_count(scene)
    k, shape = rng.randint(0, 9), focus_shape(rng, hexagon)  # the answer is drawn first: uniform 0-9
    extra = rng.randint(1 if k == 0 else 0, min(4, 9 - k))
    if template == "shape":
        targets = [Target(rng.choice(COLOR_NAMES), shape) for _ in range(k)]
        scene, _ = compose(rng, targets, extra, [s for s in pool if s != shape])
        return scene, ask_count(scene, shape)
    color = rng.choice(COLOR_NAMES)
    scene, _ = compose(rng, [Target(color, shape) for _ in range(k)], extra, pool, avoid=((color, shape),))
    return scene, ask_count(scene, shape, color)


def _position(rng, hexagon):
    shape, color = focus_shape(rng, hexagon), rng.choice(COLOR_NAMES)
    row, col = rng.randrange(3), rng.randrange(3)  # the answer cell is drawn first: uniform over 9

    def region(scene):
        bw, bh = POSITION_BAND * scene.width, POSITION_BAND * scene.height
        w3, h3 = scene.width / 3, scene.height / 3
        return col * w3 + bw, (col + 1) * w3 - bw, row * h3 + bh, (row + 1) * h3 - bh

    scene, (t,) = compose(
        rng, [Target(color, shape, region)], rng.randint(0, 6), shape_pool(hexagon), avoid=((color, shape),)
    )
    return scene, ask_position(scene, t)


def _relation(rng, hexagon):
    pool = shape_pool(hexagon)
    first = (rng.choice(COLOR_NAMES), focus_shape(rng, hexagon))
    second = other_combo(rng, pool, avoid=(first,))
    axis, yes = rng.choice("xy"), rng.random() < 0.5
    i = 0 if axis == "x" else 1

    def apart(box, placed, scene):
        dim = scene.width if axis == "x" else scene.height
        return abs(center(box)[i] - center(placed[0].box)[i]) >= RELATION_MIN_GAP * dim

    targets = [Target(*first), Target(*second, accept=apart)]
    scene, (a, b) = compose(rng, targets, rng.randint(0, 5), pool, avoid=(first, second))
    if (center(a.box)[i] < center(b.box)[i]) != yes:  # balance yes/no by choosing the subject
        a, b = b, a
    return scene, ask_relation(scene, a, b, axis)


def _ocr(rng, hexagon):
    text = "".join(rng.choice(OCR_CHARS) for _ in range(rng.randint(3, 8)))
    rgb, font_u, extra = jitter(rng, rng.choice(TEXT_COLORS), 15), rng.random(), rng.randint(0, 4)
    for _ in range(TRIES):
        scene = new_scene(rng, extra + 2)
        # cap height: >= 14 px and 6% of the height even after the font shrinks; <= 20%; fits the width
        lo = math.ceil(max(14, 0.06 * scene.height) / FONT_SHRINK)
        hi = min(int(0.20 * scene.height), int((scene.width - 2 * MARGIN - 4) / (TEXT_WIDTH * len(text))))
        if lo > hi:
            continue
        cap = rng.randint(lo, hi)
        box = scene.free_box(rng, math.ceil(TEXT_WIDTH * cap * len(text)) + 4, math.ceil(1.35 * cap) + 6)
        if box is None:
            continue
        scene.reserved.append(box)
        scene.text = Text(text, rgb, cap, box, font_u)
        if fill(scene, rng, extra, shape_pool(hexagon)):
            return scene, ask_ocr(scene)
    raise RuntimeError(f"could not lay out the text {text!r} in {TRIES} canvases")


def _grounding(rng, hexagon):
    shape, color = focus_shape(rng, hexagon), rng.choice(COLOR_NAMES)
    scene, (t,) = compose(
        rng, [Target(color, shape)], rng.randint(0, 7), shape_pool(hexagon), avoid=((color, shape),)
    )
    return scene, ask_grounding(scene, t)


def _caption(rng, hexagon):
    pool = shape_pool(hexagon)
    combos, n_groups = [(rng.choice(COLOR_NAMES), focus_shape(rng, hexagon))], rng.randint(1, 4)
    while len(combos) < n_groups:
        combos.append(other_combo(rng, pool, avoid=combos))
    counts = [rng.randint(1, 4) for _ in combos]
    while sum(counts) > 9:
        counts[counts.index(max(counts))] -= 1
    targets = [Target(c, s) for (c, s), n in zip(combos, counts) for _ in range(n)]
    rng.shuffle(targets)
    scene, _ = compose(rng, targets, 0, pool)
    return scene, ask_caption(scene)


def _reasoning(rng, hexagon):
    pool = shape_pool(hexagon)
    s1 = focus_shape(rng, hexagon)
    s2 = rng.choice([s for s in pool if s != s1])
    if rng.random() < 0.5:
        s1, s2 = s2, s1
    a, b = rng.choice(REASONING_PAIRS)
    targets = [Target(rng.choice(COLOR_NAMES), s) for s, n in ((s1, a), (s2, b)) for _ in range(n)]
    rng.shuffle(targets)
    scene, _ = compose(
        rng, targets, rng.randint(0, min(2, 9 - a - b)), [s for s in pool if s not in (s1, s2)]
    )
    q = f"How many more {plural(s1)} than {plural(s2)} are there? Think step by step."
    return scene, Turn(
        "reasoning", q, reasoning_text(a, b, s1, s2), {"a": a, "b": b, "s1": s1, "s2": s2, "d": a - b}
    )


def _multi_image(rng, hexagon):
    shape, n = focus_shape(rng, hexagon), rng.randint(2, 4)
    win, top = rng.randrange(n), rng.randint(1, 5)  # a unique maximum, at a uniform position
    counts = [top if i == win else rng.randint(0, top - 1) for i in range(n)]
    others = [s for s in shape_pool(hexagon) if s != shape]
    scenes = []
    for c in counts:
        extra = rng.randint(1 if c == 0 else 0, min(4, 9 - c))
        scenes.append(
            compose(rng, [Target(rng.choice(COLOR_NAMES), shape) for _ in range(c)], extra, others)[0]
        )
    q = "".join(f"Image-{i + 1}: <image>\n" for i in range(n)) + f"Which image has the most {plural(shape)}?"
    return scenes, Turn("multi_image", q, f"Image-{win + 1}", {"shape": shape, "counts": counts})


def _video(rng, hexagon):
    shape, color = focus_shape(rng, hexagon), rng.choice(COLOR_NAMES)
    for _ in range(TRIES):
        clip = sample_clip(rng, shape, color, hexagon)
        if clip is not None:
            return clip, ask_direction(clip)
    raise RuntimeError(f"could not lay out a clip in {TRIES} canvases")


def _chart_value(rng, hexagon):
    values = [rng.randint(1, 9) for _ in range(rng.randint(3, 5))]
    chart = sample_chart(rng, values)
    return chart, ask_chart_value(chart, rng.randrange(len(values)))


def _chart_max(rng, hexagon):
    n = rng.randint(3, 5)
    win, top = rng.randrange(n), rng.randint(2, 9)  # unique maximum at a uniform position
    chart = sample_chart(rng, [top if i == win else rng.randint(1, top - 1) for i in range(n)])
    return chart, ask_chart_max(chart)


def _mc(rng, hexagon):
    category = rng.choice(MC_CATEGORIES)
    scene, base = BUILDERS[category](rng, hexagon)
    space = {
        "color": COLOR_NAMES,
        "shape": shape_pool(hexagon),
        "count": tuple(string.digits),
        "position": POSITION_NAMES,
    }[category]
    correct = rng.randrange(4)  # the correct letter is uniform over A-D
    wrong = rng.sample([o for o in space if o != base.answer], 3)
    options = wrong[:correct] + [base.answer] + wrong[correct:]
    facts = {
        "category": category,
        "base_question": base.question,
        "options": options,
        "answer_text": base.answer,
    }
    return scene, Turn("mc", mc_prompt(base.question, options), "ABCD"[correct], facts)


def _text(rng, hexagon):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return None, Turn("text", f"What is {a} + {b}?", str(a + b), {"a": a, "b": b, "op": "+"})
    a, b = max(a, b), min(a, b)  # non-negative results only
    return None, Turn("text", f"What is {a} - {b}?", str(a - b), {"a": a, "b": b, "op": "-"})


BUILDERS = {
    "color": _color,
    "shape": _shape,
    "count": _count,
    "position": _position,
    "relation": _relation,
    "ocr": _ocr,
    "grounding": _grounding,
    "caption": _caption,
    "multi_image": _multi_image,
    "video": _video,
    "chart_value": _chart_value,
    "chart_max": _chart_max,
    "reasoning": _reasoning,
    "mc": _mc,
    "text": _text,
}
