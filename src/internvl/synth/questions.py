"""Question templates and answer formats of the contract's task table, asked about a sampled scene.

English agreement (contract: "singular/plural as English requires"): a noun takes `s` unless its
count is 1, and the verb agrees with the first count, as spoken English does for "there is/are":
`There is 1 circle and 0 squares.`, `There are 3 circles and 1 square.`, `There is 1 red circle and
1 blue star.` Questions always use the template's plural (`How many circles are there?`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from .chart import Chart
from .scene import COLOR_NAMES, SHAPES, Obj, Scene, center, shape_rank

POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
POSITION_NAMES = tuple(p for row in POSITIONS for p in row)
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
RELATION_MIN_GAP = 0.10  # fraction of the canvas between the two centers along the asked axis


@dataclass
class Turn:
    task: str
    question: str
    answer: str
    facts: dict = field(default_factory=dict)  # structured gold kept in the row's "meta" for scoring


def plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else shape + "s"


def there(n: int) -> str:
    return "There is" if n == 1 else "There are"


def position_name(box, width: int, height: int) -> str:
    cx, cy = center(box)
    return POSITIONS[min(2, int(3 * cy / height))][min(2, int(3 * cx / width))]


def norm_box(box, width: int, height: int) -> list[int]:
    """Pixel box to the 0..1000 integer grid used by InternVL grounding."""
    x1, y1, x2, y2 = box
    return [
        round(x1 / width * 1000),
        round(y1 / height * 1000),
        round(x2 / width * 1000),
        round(y2 / height * 1000),
    ]


def grounding_answer(ref: str, nbox: list[int]) -> str:
    return f"<ref>{ref}</ref><box>[[{nbox[0]}, {nbox[1]}, {nbox[2]}, {nbox[3]}]]</box>"


def caption_groups(objects: list[Obj]) -> list[tuple[int, str, str]]:
    """(count, color, shape) groups sorted by count (desc), then color order, then shape order."""
    counts = Counter((o.color, o.shape) for o in objects)
    groups = [(n, c, s) for (c, s), n in counts.items()]
    return sorted(groups, key=lambda g: (-g[0], COLOR_NAMES.index(g[1]), shape_rank(g[2])))


def caption_text(groups: list[tuple[int, str, str]]) -> str:
    parts = [f"{n} {c} {plural(s, n)}" for n, c, s in groups]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{there(groups[0][0])} {listed}."


def reasoning_text(a: int, b: int, s1: str, s2: str, d: int | None = None) -> str:
    """The step-by-step answer; `d` other than a - b writes a chain with wrong arithmetic."""
    d = a - b if d is None else d
    return f"{there(a)} {a} {plural(s1, a)} and {b} {plural(s2, b)}. {a} - {b} = {d}.\nAnswer: {d}"


def wrong_reasoning(rng: random.Random, a: int, b: int, s1: str, s2: str) -> str:
    """A plausible wrong chain for MPO: one shape miscounted by one, or a slip in the subtraction."""
    if rng.random() < 0.5:
        miscounts = [(a + e, b) for e in (-1, 1) if a + e > b] + [
            (a, b + e) for e in (-1, 1) if 0 <= b + e < a
        ]
        return reasoning_text(*rng.choice(miscounts), s1, s2)
    d = a - b
    return reasoning_text(a, b, s1, s2, rng.choice([x for x in (d - 2, d - 1, d + 1, d + 2) if x >= 0]))


def mc_prompt(question: str, options: list[str]) -> str:
    lines = [question] + [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)] + [MC_SUFFIX]
    return "\n".join(lines)


def ask_color(scene: Scene, obj: Obj) -> Turn:
    return Turn("color", f"What color is the {obj.shape}?", obj.color, {"shape": obj.shape})


def ask_shape(scene: Scene, obj: Obj) -> Turn:
    return Turn("shape", f"What shape is the {obj.color} object?", obj.shape, {"color": obj.color})


def ask_count(scene: Scene, shape: str | None = None, color: str | None = None) -> Turn:
    if shape is None:
        q, template = "How many objects are there?", "objects"
    elif color is None:
        q, template = f"How many {plural(shape)} are there?", "shape"
    else:
        q, template = f"How many {color} {plural(shape)} are there?", "color_shape"
    return Turn(
        "count", q, str(scene.count(shape, color)), {"template": template, "shape": shape, "color": color}
    )


def ask_position(scene: Scene, obj: Obj) -> Turn:
    return Turn(
        "position",
        f"Where is the {obj.color} {obj.shape}?",
        position_name(obj.box, scene.width, scene.height),
        {"target": [obj.color, obj.shape], "box": list(obj.box)},
    )


def ask_relation(scene: Scene, a: Obj, b: Obj, axis: str) -> Turn:
    i = 0 if axis == "x" else 1
    words = "to the left of" if axis == "x" else "above"
    yes = center(a.box)[i] < center(b.box)[i]
    return Turn(
        "relation",
        f"Is the {a.color} {a.shape} {words} the {b.color} {b.shape}?",
        "yes" if yes else "no",
        {"axis": axis, "subject": [a.color, a.shape], "object": [b.color, b.shape]},
    )


def ask_grounding(scene: Scene, obj: Obj) -> Turn:
    ref = f"the {obj.color} {obj.shape}"
    nbox = norm_box(obj.box, scene.width, scene.height)
    return Turn(
        "grounding",
        f"{GROUNDING_PROMPT}<ref>{ref}</ref>",
        grounding_answer(ref, nbox),
        {"box": nbox, "ref": ref},
    )


def ask_caption(scene: Scene) -> Turn:
    groups = caption_groups(scene.objects)
    return Turn("caption", "Describe the image.", caption_text(groups), {"groups": [list(g) for g in groups]})


def ask_ocr(scene: Scene) -> Turn:
    return Turn("ocr", "What is written in the image?", scene.text.text, {"text": scene.text.text})


def ask_chart_value(chart: Chart, i: int) -> Turn:
    return Turn(
        "chart_value", f"What is the value of bar {chart.letters[i]}?", str(chart.values[i]), chart.to_json()
    )


def ask_chart_max(chart: Chart) -> Turn:
    i = chart.values.index(max(chart.values))
    return Turn("chart_max", "Which bar is the tallest?", chart.letters[i], chart.to_json())


def relation_gap_ok(a: Obj, b: Obj, axis: str, scene: Scene) -> bool:
    i, dim = (0, scene.width) if axis == "x" else (1, scene.height)
    return abs(center(a.box)[i] - center(b.box)[i]) >= RELATION_MIN_GAP * dim


def _scene_questions(scene: Scene, rng: random.Random) -> list:
    """Zero-argument askers valid for this scene (unique references only), in random order."""
    combos = Counter((o.color, o.shape) for o in scene.objects)
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    unique = [o for o in scene.objects if combos[(o.color, o.shape)] == 1]
    asks = [lambda: ask_count(scene, rng.choice(SHAPES + tuple(shapes)))]
    if scene.objects:  # text-only OCR scenes have none
        asks += [
            lambda: ask_count(scene),
            lambda: ask_caption(scene),
            lambda: ask_count(scene, rng.choice(scene.objects).shape, rng.choice(scene.objects).color),
        ]
    asks += [lambda o=o: ask_color(scene, o) for o in scene.objects if shapes[o.shape] == 1]
    asks += [lambda o=o: ask_shape(scene, o) for o in scene.objects if colors[o.color] == 1]
    asks += [lambda o=o: ask_position(scene, o) for o in unique]
    asks += [lambda o=o: ask_grounding(scene, o) for o in unique]
    pairs = [
        (a, b, ax)
        for a in unique
        for b in unique
        for ax in "xy"
        if a is not b and relation_gap_ok(a, b, ax, scene)
    ]
    if pairs:
        asks.append(lambda: ask_relation(scene, *rng.choice(pairs)))
    if scene.text is not None:
        asks.append(lambda: ask_ocr(scene))
    rng.shuffle(asks)
    return asks


def follow_ups(visual, rng: random.Random, k: int, asked: set[str]) -> list[Turn]:
    """Up to `k` more questions about the same image, none repeating an earlier question."""
    if isinstance(visual, Chart):
        order = list(range(len(visual.values)))
        rng.shuffle(order)
        asks = [lambda i=i: ask_chart_value(visual, i) for i in order]
        if visual.values.count(max(visual.values)) == 1:
            asks.append(lambda: ask_chart_max(visual))
        rng.shuffle(asks)
    else:
        asks = _scene_questions(visual, rng)
    turns = []
    for ask in asks:
        if len(turns) == k:
            break
        turn = ask()
        if turn.question not in asked:
            asked.add(turn.question)
            turns.append(turn)
    return turns
