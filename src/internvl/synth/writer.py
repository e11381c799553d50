"""Split directories of the Synthetic Visual World: PNG images, one JSONL per task, meta files, MPO, TSV.

Layout of `generate_split(out_dir, ...)`:
    out_dir/images/{task}_{i:06d}.png            (multi-image and video items: {task}_{i:06d}_{k}.png)
    out_dir/{task}.jsonl                         reference fine-tuning rows plus "task" and "meta"
    out_dir/meta.json                            {name: {root, annotation, data_augment, repeat_time, length}}
    out_dir/reasoning_pairs.jsonl, mpo_meta.json MPO preference pairs (reasoning task)
    out_dir/mc.tsv                               VLMEvalKit-style multiple choice (mc task)
`root` and `annotation` are written relative to the meta file's directory ("." and "color.jsonl"):
loaders resolve relative paths against the directory of the meta file, so a split can be moved.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import random
import struct
import time
import zlib

import numpy as np
from PIL import Image

from ..errors import DataError
from .tasks import MULTI_TURN_TASKS, TASKS, SynthItem, conversation, describe_visual, make_item

SPLITS = ("train", "val", "test")
MULTI_TURN_EVERY = 4  # every 4th training item of a multi-turn task gets 2 or 3 questions


def item_seed(split: str, seed: int, task: str, index: int, hexagon: bool) -> int:
    """Per-item seed; the split sits in the top bits, so train seeds never equal val or test seeds."""
    digest = hashlib.sha256(f"synth|{split}|{seed}|{hexagon}|{task}|{index}".encode()).digest()
    return (SPLITS.index(split) << 126) | (int.from_bytes(digest[:16], "big") >> 2)


def encode_png(img: Image.Image) -> bytes:
    """RGB PNG with no row filter and zlib level 1: about 3x faster than Pillow's adaptive filtering,
    and the flat synthetic images still compress well. Decodes anywhere (it is a plain PNG)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 0  # filter type None at the start of every row
    raw[:, 1:] = np.frombuffer(img.tobytes(), np.uint8).reshape(h, w * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def _row(item: SynthItem, item_id: str, paths: list[str]) -> dict:
    row: dict = {"id": item_id}
    if len(paths) == 1:
        row.update(image=paths[0], width=item.images[0].width, height=item.images[0].height)
    elif paths:  # the reference multi-image layout
        row.update(
            image=paths,
            width_list=[im.width for im in item.images],
            height_list=[im.height for im in item.images],
        )
    row.update(conversations=item.conversations, task=item.task, meta=item.meta)
    return row


def _write_images(out_dir: str, item_id: str, images: list[Image.Image]) -> tuple[list[str], list[bytes]]:
    names = (
        [f"images/{item_id}.png"]
        if len(images) == 1
        else [f"images/{item_id}_{k}.png" for k in range(len(images))]
    )
    blobs = [encode_png(im) for im in images]
    for name, blob in zip(names, blobs):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(blob)
    return names, blobs


def _pair_row(item: SynthItem, item_id: str, image: str) -> dict:
    """An MMPR-style preference pair: the gold chain is chosen, a wrong chain rejected."""
    question = item.conversations[0]["value"]
    return {
        "id": item_id,
        "image": image,
        "question": question,
        "chosen": item.answer,
        "rejected": item.rejected,
        "task": item.task,
        "meta": item.meta,
    }


def _tsv_row(index: int, item: SynthItem, png: bytes) -> list:
    m = item.meta
    return [
        index,
        m["base_question"],
        *m["options"],
        item.answer,
        m["category"],
        base64.b64encode(png).decode("ascii"),
    ]


def _meta_entry(annotation: str, length: int) -> dict:
    return {"root": ".", "annotation": annotation, "data_augment": False, "repeat_time": 1, "length": length}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _check(split: str, n: int, tasks) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if n < 1:
        raise DataError(f"--n must be at least 1 item per task, got {n}")
    tasks = list(TASKS) if not tasks else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(
            f"unknown synth task(s) {', '.join(map(repr, unknown))}; expected some of: {', '.join(TASKS)}"
        )
    return tasks


def generate_split(
    out_dir: str,
    split: str,
    n: int = 200,
    tasks=None,
    hexagon: bool = False,
    seed: int | None = None,
    progress: bool = False,
) -> dict:
    """Write `n` items per task of one split to `out_dir`; returns counts (items per task, images, ...)."""
    tasks = _check(split, n, tasks)
    seed = 0 if seed is None else int(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    prefix = "synth_hexagon_" if hexagon else "synth_"
    meta, counts, n_images, n_multi = {}, {}, 0, 0
    start, start_cpu = time.perf_counter(), time.process_time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n * len(tasks), desc=f"synth {split}", unit="item")
    for task in tasks:
        rows, pairs, tsv = [], [], []
        for i in range(n):
            rng = random.Random(item_seed(split, seed, task, i, hexagon))
            multi = split == "train" and task in MULTI_TURN_TASKS and i % MULTI_TURN_EVERY == 0
            item = make_item(task, rng, hexagon, turns=2 + (i // MULTI_TURN_EVERY) % 2 if multi else 1)
            item_id = f"{task}_{i:06d}"
            names, blobs = _write_images(out_dir, item_id, item.images)
            rows.append(_row(item, item_id, names))
            n_images += len(names)
            n_multi += len(item.conversations) > 2
            if task == "reasoning":
                pairs.append(_pair_row(item, item_id, names[0]))
            if task == "mc":
                tsv.append(_tsv_row(i, item, blobs[0]))
            if bar is not None:
                bar.update(1)
        _write_jsonl(os.path.join(out_dir, f"{task}.jsonl"), rows)
        meta[prefix + task] = _meta_entry(f"{task}.jsonl", len(rows))
        counts[task] = len(rows)
        if pairs:
            _write_jsonl(os.path.join(out_dir, "reasoning_pairs.jsonl"), pairs)
            _write_json(
                os.path.join(out_dir, "mpo_meta.json"),
                {prefix + "reasoning_pairs": _meta_entry("reasoning_pairs.jsonl", len(pairs))},
            )
        if tsv:
            _write_tsv(os.path.join(out_dir, "mc.tsv"), tsv)
    if bar is not None:
        bar.close()
    _write_json(os.path.join(out_dir, "meta.json"), meta)
    # The rate uses this process's CPU time: it is the one-core speed even on a busy machine.
    cpu = time.process_time() - start_cpu
    total = sum(counts.values())
    return {
        "tasks": counts,
        "items": total,
        "images": n_images,
        "multi_turn": n_multi,
        "seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(cpu, 3),
        "items_per_second": round(total / max(cpu, 1e-9), 1),
    }


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)


def _write_tsv(path: str, rows: list[list]) -> None:
    # Each mc item has its own image, so no row needs the short "index of an earlier row" reference.
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "image"])
        w.writerows(rows)


def dense_scene(i: int, max_objects: int, turns: int, square: bool, seed: int,
                sides: tuple[float, float] | None) -> tuple:  # fmt: skip
    """Scene `i` of a dense set drawn from its seed, without rendering: (scene, its questions, the row's meta:
    the scene's facts and each question's task, as a split's multi-turn rows have them)."""
    from .questions import follow_ups
    from .scene import SHAPES, fill, new_scene, random_size

    rng = random.Random(item_seed("train", seed, "dense", i, False))
    k = rng.randint(1, max_objects)
    while True:  # a fresh canvas when the objects do not fit
        side = rng.randint(224, 640)
        scene = new_scene(rng, k, (side, side) if square else random_size(rng))
        scene.sides = sides
        if fill(scene, rng, k, SHAPES):
            break
    qa = follow_ups(scene, rng, turns, set())
    asked = [{"task": t.task, "question": t.question, "answer": t.answer} for t in qa]
    return scene, qa, {**describe_visual(scene), "turns": asked}


def generate_dense(
    out_dir: str,
    n: int,
    max_objects: int = 3,
    turns: int = 6,
    square: bool = False,
    seed: int = 0,
    sides: tuple[float, float] | None = None,
    progress: bool = False,
) -> dict:
    """A training-only curriculum split: `n` scenes of 1..`max_objects` shapes (no hexagon), each with up
    to `turns` questions about it in one conversation (every question kind the scene allows: count, color,
    shape, position, relation, grounding, caption). Few objects and many answers per image make the
    image's contribution to the loss large and direct, which is what a model trained from scratch needs
    before it starts reading its images at all (see configs/train/nano-stage0.yaml). `sides` overrides the
    contract's shape sizes, as (min, max) fractions of the canvas's shorter side. Same meta format as a
    split."""
    from .render import render_scene

    if n < 1 or max_objects < 1 or turns < 1:
        raise DataError(f"dense split: n, max_objects, turns must be >= 1, got {n}, {max_objects}, {turns}")
    from tqdm import tqdm

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    name = os.path.basename(os.path.normpath(out_dir))
    for i in tqdm(range(n), desc=f"curriculum {name}", unit="scene", disable=not progress):
        scene, qa, meta = dense_scene(i, max_objects, turns, square, seed, sides)
        item = SynthItem("dense", [render_scene(scene)], conversation(qa, True), qa[0].answer, meta)
        item_id = f"dense_{i:06d}"
        names, _ = _write_images(out_dir, item_id, item.images)
        rows.append(_row(item, item_id, names))
    _write_jsonl(os.path.join(out_dir, "dense.jsonl"), rows)
    _write_json(os.path.join(out_dir, "meta.json"), {"synth_dense": _meta_entry("dense.jsonl", len(rows))})
    return {"items": len(rows), "turns": sum(len(r["conversations"]) // 2 for r in rows)}
