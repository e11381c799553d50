"""Synthetic Visual World: answer formats of the contract, layout rules, split files, scoring, CLI."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from internvl.errors import DataError
from internvl.eval.synth_scoring import score
from internvl.synth import TASKS, generate_split, make_item
from internvl.synth.questions import caption_text, reasoning_text
from internvl.synth.render import cap_px, draw_text, pick_font
from internvl.synth.scene import Text
from internvl.synth.writer import encode_png

COLOR = "(red|green|blue|yellow|purple|orange|black)"
SHAPE = "(circle|square|triangle|star|diamond)"
GROUP = rf"\d {COLOR} {SHAPE}s?"
POSITION = "(top left|top|top right|left|center|right|bottom left|bottom|bottom right)"
# (question, answer) patterns taken from the contract's task table
FORMATS = {
    "color": (rf"<image>\nWhat color is the {SHAPE}\?", COLOR),
    "shape": (rf"<image>\nWhat shape is the {COLOR} object\?", SHAPE),
    "count": (
        rf"<image>\nHow many ({COLOR} {SHAPE}s|{SHAPE}s|objects) are there\?",
        "[0-9]",
    ),
    "position": (rf"<image>\nWhere is the {COLOR} {SHAPE}\?", POSITION),
    "relation": (rf"<image>\nIs the {COLOR} {SHAPE} (to the left of|above) the {COLOR} {SHAPE}\?", "yes|no"),
    "ocr": (r"<image>\nWhat is written in the image\?", "[A-Z0-9]{3,8}"),
    "grounding": (
        r"<image>\nPlease provide the bounding box coordinate of the region this sentence describes: "
        rf"<ref>the {COLOR} {SHAPE}</ref>",
        rf"<ref>the {COLOR} {SHAPE}</ref><box>\[\[\d+, \d+, \d+, \d+\]\]</box>",
    ),
    "caption": (r"<image>\nDescribe the image\.", rf"There (is|are) {GROUP}((, {GROUP})* and {GROUP})?\."),
    "multi_image": (rf"(Image-\d: <image>\n){{2,4}}Which image has the most {SHAPE}s\?", "Image-[1-4]"),
    "video": (
        rf"(Frame\d: <image>\n){{4,8}}In which direction is the {COLOR} {SHAPE} moving\?",
        "left|right|up|down",
    ),
    "chart_value": (r"<image>\nWhat is the value of bar [A-Z]\?", "[1-9]"),
    "chart_max": (r"<image>\nWhich bar is the tallest\?", "[A-Z]"),
    "reasoning": (
        rf"<image>\nHow many more {SHAPE}s than {SHAPE}s are there\? Think step by step\.",
        rf"There (is|are) \d {SHAPE}s? and \d {SHAPE}s?\. \d - \d = \d\.\nAnswer: \d",
    ),
    "mc": (
        r"<image>\n.+\?\nA\. .+\nB\. .+\nC\. .+\nD\. .+\n"
        r"Answer with the option's letter from the given choices directly\.",
        "[ABCD]",
    ),
    "text": (r"What is \d+ [+-] \d+\?", r"\d+"),
}


def _apart(a, b, gap=4):
    """The contract's layout rule: boxes at least 4 px apart along some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _items(task, n, seed=0, hexagon=False):
    rng = random.Random(f"{task}-{seed}")
    return [make_item(task, rng, hexagon) for _ in range(n)]


@pytest.fixture(scope="module")
def items():
    return {task: _items(task, 12) for task in TASKS}


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    counts = generate_split(str(out), "train", n=4)
    return out, counts


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _digest(folder):
    h = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                h[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return h


def test_answer_formats_follow_the_contract(items):
    for task, (q_pat, a_pat) in FORMATS.items():
        for item in items[task]:
            question, answer = item.conversations[0]["value"], item.conversations[1]["value"]
            assert re.fullmatch(q_pat, question), (task, question)
            assert re.fullmatch(a_pat, answer), (task, answer)
            assert answer == item.answer == item.meta["answer"]


def test_grammar_of_caption_and_reasoning():
    assert caption_text([(1, "red", "circle")]) == "There is 1 red circle."
    groups = [(2, "red", "circle"), (1, "blue", "square"), (1, "black", "star")]
    assert caption_text(groups) == "There are 2 red circles, 1 blue square and 1 black star."
    assert reasoning_text(1, 0, "star", "circle") == "There is 1 star and 0 circles. 1 - 0 = 1.\nAnswer: 1"
    assert reasoning_text(3, 1, "star", "circle") == "There are 3 stars and 1 circle. 3 - 1 = 2.\nAnswer: 2"


def test_boxes_are_apart_inside_and_sized(items):
    for task in ("color", "count", "caption", "grounding", "ocr", "video", "relation"):
        for item in items[task]:
            w, h = item.meta["size"]
            assert 224 <= w <= 640 and 224 <= h <= 640
            boxes = [o[2] for o in item.meta["objects"]] + [
                item.meta[k] for k in ("text_box",) if k in item.meta
            ]
            boxes += item.meta.get("boxes", [])[:1] + item.meta.get("boxes", [])[-1:]  # the video mover
            for i, b in enumerate(boxes):
                assert 4 <= b[0] < b[2] <= w - 4 and 4 <= b[1] < b[3] <= h - 4, (task, b)
                assert all(_apart(b, c) for c in boxes[i + 1 :]), (task, boxes)
            for _, _, (x1, y1, x2, y2) in item.meta["objects"]:
                side = min(w, h)
                assert max(14, 0.08 * side) <= min(x2 - x1, y2 - y1) and max(x2 - x1, y2 - y1) <= 0.3 * side


def test_gold_answers_agree_with_the_scene(items):
    for item in items["count"]:
        m, objs = item.meta, item.meta["objects"]
        want = sum((m["shape"] in (None, s)) and (m["color"] in (None, c)) for c, s, _ in objs)
        assert int(item.answer) == want
    for item in items["grounding"]:
        w, h = item.meta["size"]
        c, s = re.search(r"the (\w+) (\w+)</ref>", item.answer).groups()
        (box,) = [b for cc, ss, b in item.meta["objects"] if (cc, ss) == (c, s)]
        assert item.meta["box"] == [
            round(box[0] / w * 1000),
            round(box[1] / h * 1000),
            round(box[2] / w * 1000),
            round(box[3] / h * 1000),
        ]
    for item in items["video"]:
        boxes, w, h = item.meta["boxes"], *item.meta["size"]
        dx, dy = boxes[-1][0] - boxes[0][0], boxes[-1][1] - boxes[0][1]
        assert abs(dx) >= 0.3 * w or abs(dy) >= 0.3 * h
        assert item.answer == ("right" if dx > 0 else "left" if dx < 0 else "down" if dy > 0 else "up")
    for item in items["chart_max"]:
        values = item.meta["values"]
        assert (
            values.count(max(values)) == 1 and item.meta["letters"][values.index(max(values))] == item.answer
        )
    for item in items["multi_image"]:
        counts = item.meta["counts"]
        assert counts.count(max(counts)) == 1 and item.answer == f"Image-{counts.index(max(counts)) + 1}"
        assert len(item.images) == len(counts)


def test_balanced_answers():
    letters = Counter(it.answer for it in _items("mc", 200, seed=1))
    assert set(letters) == set("ABCD") and min(letters.values()) >= 30
    yes = Counter(it.answer for it in _items("relation", 100, seed=1))
    assert 30 <= yes["yes"] <= 70
    counts = Counter(it.answer for it in _items("count", 150, seed=1))
    assert set(counts) == set("0123456789")


def _ink_outside_boxes(item) -> int:
    """Darkest channel value among pixels outside every object and text box (background is >= 212)."""
    img = np.asarray(item.images[0]).min(axis=2)
    free = np.ones(img.shape, bool)
    for x1, y1, x2, y2 in [o[2] for o in item.meta["objects"]] + [item.meta.get("text_box", [0, 0, 0, 0])]:
        free[y1:y2, x1:x2] = False
    return int(img[free].min())


def test_drawing_stays_inside_boxes_and_text_is_large_enough():
    for task in ("ocr", "color", "caption"):
        for item in _items(task, 10, seed=2):
            assert _ink_outside_boxes(item) >= 200, task
    for item in _items("ocr", 10, seed=2):
        x1, y1, x2, y2 = item.meta["text_box"]
        assert (np.asarray(item.images[0])[y1:y2, x1:x2].min(axis=2) < 160).any()  # the dark text is there
    # the widest string in the widest font still fits its reserved box at >= 85% of the planned height
    text = Text("WWWWWWWW", (0, 0, 0), 30, (4, 4, 4 + 304, 4 + 47), 0.99)
    font = pick_font(text.font_u, text.cap, 300, text.text)
    assert cap_px(font) >= 0.85 * 30
    img = Image.new("RGB", (320, 60), "white")
    draw_text(img, text)
    ys, xs = np.nonzero(np.asarray(img).min(axis=2) < 250)
    assert xs.min() >= 4 and xs.max() < 308 and ys.min() >= 4 and ys.max() < 51


def test_hexagon_only_when_enabled(items):
    for task in TASKS:
        for item in items[task]:
            facts = {k: v for k, v in item.meta.items() if k != "hexagon"}  # the flag itself is named so
            assert "hexagon" not in json.dumps(item.conversations) + json.dumps(facts)
            assert item.meta["hexagon"] is False
    hexa = [
        it for task in ("color", "count", "grounding", "caption") for it in _items(task, 10, 3, hexagon=True)
    ]
    assert sum(it.meta["hexagon"] for it in hexa) >= len(hexa) // 2


def test_split_files_parse_and_point_to_images(train_split):
    out, counts = train_split
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta) == sorted(f"synth_{t}" for t in TASKS)
    for name, entry in meta.items():
        root = os.path.join(out, entry["root"])  # relative roots resolve against the meta file's folder
        rows = _rows(os.path.join(out, entry["annotation"]))
        assert (
            entry["length"] == len(rows) == 4 and entry["repeat_time"] == 1 and entry["data_augment"] is False
        )
        for row in rows:
            assert row["conversations"][0]["from"] == "human" and row["conversations"][1]["from"] == "gpt"
            images = row.get("image", [])
            images = [images] if isinstance(images, str) else images
            n_tags = sum(turn["value"].count("<image>") for turn in row["conversations"])
            assert n_tags == len(images), row["id"]
            for path in images:
                assert os.path.isfile(os.path.join(root, path))
            if isinstance(row.get("image"), str):
                assert Image.open(os.path.join(root, row["image"])).size == (row["width"], row["height"])
            elif images:
                assert len(row["width_list"]) == len(row["height_list"]) == len(images)
            assert score(row["task"], row["meta"]["answer"], row)
    mpo = json.loads((out / "mpo_meta.json").read_text())
    (entry,) = mpo.values()
    for pair in _rows(os.path.join(out, entry["annotation"])):
        assert os.path.isfile(os.path.join(out, entry["root"], pair["image"]))
        assert pair["question"].startswith("<image>\n") and pair["chosen"] != pair["rejected"]
        assert score("reasoning", pair["chosen"], pair) and not score("reasoning", pair["rejected"], pair)
    with open(out / "mc.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 4 and list(rows[0])[:9] == [
        "index",
        "question",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "image",
    ]
    for row in rows:
        png = base64.b64decode(row["image"])
        assert png == (out / "images" / f"mc_{int(row['index']):06d}.png").read_bytes()
        assert row["answer"] in "ABCD" and row["category"] in ("color", "shape", "count", "position")


def test_multi_turn_share_in_train_only(train_split, tmp_path):
    out, counts = train_split
    rows = [r for t in TASKS for r in _rows(out / f"{t}.jsonl")]
    multi = [r for r in rows if len(r["conversations"]) > 2]
    assert len(multi) >= 0.10 * len(rows) and counts["multi_turn"] == len(multi)
    for r in multi:
        assert len(r["conversations"]) in (4, 6) and len(r["meta"]["turns"]) == len(r["conversations"]) // 2
        questions = [t["value"] for t in r["conversations"][::2]]
        assert len(set(questions)) == len(questions)
    generate_split(str(tmp_path), "val", n=4, tasks=["color", "caption"])
    assert all(
        len(r["conversations"]) == 2 for t in ("color", "caption") for r in _rows(tmp_path / f"{t}.jsonl")
    )


def test_deterministic_per_seed_and_disjoint_splits(tmp_path):
    tasks = ["color", "video", "chart_max", "mc", "reasoning"]
    for name, split, seed in (("a", "test", 0), ("b", "test", 0), ("c", "test", 1), ("d", "train", 0)):
        generate_split(str(tmp_path / name), split, n=2, tasks=tasks, seed=seed)
    a, b, c, d = (_digest(tmp_path / x) for x in "abcd")
    assert a == b
    images = lambda h: {v for k, v in h.items() if k.startswith("images")}  # noqa: E731
    assert not images(a) & images(c) and not images(a) & images(d)


def test_png_encoder_round_trips():
    img = make_item("color", random.Random(5)).images[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(img)))), np.asarray(img))


def test_scoring_accepts_gold_and_rejects_wrong(items):
    for task in TASKS:
        for item in items[task][:3]:
            assert score(task, item.answer, item), task
            assert not score(task, "banana", item), task
    color = items["color"][0]
    assert score("color", f"  {color.answer.capitalize()}. ", color)
    ocr = items["ocr"][0]
    assert not score("ocr", ocr.answer.lower(), ocr) and score("ocr", ocr.answer + ".", ocr)
    mc = items["mc"][0]
    wrong = next(x for x in "ABCD" if x != mc.answer)
    assert score("mc", mc.answer + ".", mc) and not score("mc", wrong, mc)
    assert not score("count", None, items["count"][0])


def test_scoring_grounding_iou_threshold():
    item = {"meta": {"answer": "<ref>the red circle</ref><box>[[100, 100, 300, 300]]</box>"}}
    assert score("grounding", "<box>[[100, 100, 300, 300]]</box>", item)
    # IoU exactly 0.5: a box of half the area inside the gold box
    assert score("grounding", "<ref>x</ref><box>[[100, 100, 200, 300]]</box>", item)
    assert not score("grounding", "<box>[[100, 100, 199, 300]]</box>", item)
    assert not score("grounding", "<box>[[400, 400, 500, 500]]</box>", item)
    assert not score("grounding", "no box at all", item)


def test_scoring_caption_and_reasoning():
    item = {"meta": {"answer": "There are 2 red circles, 1 blue square and 1 black star."}}
    assert score("caption", "There is 1 black star, 1 blue square and 2 red circles.", item)
    assert score("caption", "there are 2 red circle and 1 blue squares and 1 black stars", item)
    assert not score("caption", "There are 2 red circles and 1 blue square.", item)
    assert not score("caption", "There are 3 red circles, 1 blue square and 1 black star.", item)
    item = {"meta": {"answer": "There are 3 stars and 1 circle. 3 - 1 = 2.\nAnswer: 2"}}
    assert score("reasoning", "I count 3 and 1, so 2.\nAnswer: 2", item)
    assert not score("reasoning", "There are 3 stars and 1 circle. 3 - 1 = 2.\nAnswer: 3", item)
    assert not score("reasoning", "2", item)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown split 'dev'"):
        generate_split(str(tmp_path), "dev", n=1)
    with pytest.raises(DataError, match="unknown synth task\\(s\\) 'colour'"):
        generate_split(str(tmp_path), "val", n=1, tasks=["colour"])
    with pytest.raises(DataError, match="at least 1 item per task, got 0"):
        generate_split(str(tmp_path), "val", n=0)
    with pytest.raises(DataError, match="unknown synth task 'colour'"):
        make_item("colour", random.Random(0))
    with pytest.raises(DataError, match="cannot score unknown synth task 'colour'"):
        score("colour", "red", {"meta": {"answer": "red"}})
    with pytest.raises(DataError, match="has no meta.answer"):
        score("color", "red", {"id": "x1"})


def test_cli_writes_a_split(tmp_path, capsys):
    from internvl.cli.main import main

    out = tmp_path / "val"
    assert (
        main(
            ["synth", "--out", str(out), "--split", "val", "--n", "2", "--tasks", "color,text", "--seed", "3"]
        )
        == 0
    )
    assert "wrote 4 items" in capsys.readouterr().out
    assert sorted(json.loads((out / "meta.json").read_text())) == ["synth_color", "synth_text"]
    assert len(_rows(out / "text.jsonl")) == 2 and "image" not in _rows(out / "text.jsonl")[0]
    assert main(["synth", "--out", str(out), "--split", "val", "--tasks", "nope"]) == 1
    assert "unknown synth task(s) 'nope'" in capsys.readouterr().err
