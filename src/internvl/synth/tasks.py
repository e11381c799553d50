"""Items of the Synthetic Visual World: a builder's scene rendered, plus a reference-format conversation.

`make_item` is the in-memory API; the structured gold answer of every item sits in `meta` for scoring.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from ..errors import DataError
from .builders import BUILDERS
from .chart import Chart, render_chart
from .questions import follow_ups, wrong_reasoning
from .render import render_scene
from .scene import HEXAGON, Scene
from .video import Clip, render_clip

TASKS = tuple(BUILDERS)  # the contract's task ids, in the contract's order
# Training items of these tasks may carry 2-3 questions about the same image; the others stay single-turn
# (several images, long answers, or no image).
MULTI_TURN_TASKS = tuple(t for t in TASKS if t not in ("multi_image", "video", "reasoning", "mc", "text"))


@dataclass
class SynthItem:
    task: str
    images: list[Image.Image]
    conversations: list[dict]
    answer: str  # the answer to the first question
    meta: dict  # JSON-serializable gold facts (objects, box, groups, options, ...)
    rejected: str | None = None  # a wrong reasoning chain, for MPO preference pairs


def _render(visual) -> list[Image.Image]:
    if visual is None:
        return []
    if isinstance(visual, Chart):
        return [render_chart(visual)]
    if isinstance(visual, Clip):
        return render_clip(visual)
    if isinstance(visual, list):
        return [render_scene(s) for s in visual]
    return [render_scene(visual)]


def describe_visual(visual) -> dict:
    """Ground truth of the picture itself, kept next to the question's facts."""
    if isinstance(visual, Scene):
        facts = {"size": [visual.width, visual.height], "objects": [o.to_json() for o in visual.objects]}
        if visual.text is not None:
            facts["text_box"] = list(visual.text.box)
        return facts
    if isinstance(visual, Clip):
        s = visual.scene
        return {"size": [s.width, s.height], "objects": [o.to_json() for o in s.objects]}
    if isinstance(visual, Chart):
        return {"size": [visual.width, visual.height]}
    return {}


def conversation(turns, one_image: bool) -> list[dict]:
    """Reference fine-tuning turns; a single image's `<image>` placeholder opens the first question."""
    out = []
    for j, turn in enumerate(turns):
        q = "<image>\n" + turn.question if j == 0 and one_image else turn.question
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": turn.answer}]
    return out


def make_item(task: str, rng: random.Random, hexagon: bool = False, turns: int = 1) -> SynthItem:
    """One item of `task` drawn from `rng`; `turns` > 1 adds follow-up questions on multi-turn tasks."""
    if task not in BUILDERS:
        raise DataError(f"unknown synth task {task!r}; expected one of: {', '.join(TASKS)}")
    visual, first = BUILDERS[task](rng, hexagon)
    more = (
        follow_ups(visual, rng, turns - 1, {first.question}) if turns > 1 and task in MULTI_TURN_TASKS else []
    )
    images = _render(visual)
    conversations = conversation([first] + more, len(images) == 1)
    meta = {
        "question": first.question,
        "answer": first.answer,
        **first.facts,
        **describe_visual(visual),
        "hexagon": HEXAGON in first.question + " " + first.answer,
    }
    if more:
        meta["turns"] = [{"task": t.task, "question": t.question, "answer": t.answer} for t in [first] + more]
    rejected = (
        wrong_reasoning(rng, **{k: first.facts[k] for k in ("a", "b", "s1", "s2")})
        if task == "reasoning"
        else None
    )
    return SynthItem(task, images, conversations, first.answer, meta, rejected)
