"""The training curriculum next to a train split: scenes of one large shape, then of one or two, then of up
to five at the contract's sizes, six questions each (`synth.writer.generate_dense`), and the meta files of
its stages in order: shapes.json, stage0.json, stage1a.json, stage1.json, stage1b.json, stage2h.json, a
mixture that leans on scenes of several objects, stage2k.json, the same leaning on count questions too,
stage2m.json, that leaning on multiple-choice questions as well, stage2o.json, stage2m.json with its count
questions drawn fresh from another seed, and stage2r.json, stage2o.json with fresh relation and position questions,
twice as many relation questions as before, stage2u.json, stage2r.json with the split's text-only arithmetic
questions 4 times over, stage2zc.json, stage2u.json with the split's grounding, caption, multi_image, chart_value,
chart_max and reasoning questions 4 times over, stage2zd.json, stage2zc.json with grounding 3 times over that, and
stage2zo.json, stage2zc.json with the position questions of fresh multiple-choice ones (see runs/train_nano.sh)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# (folder, items, objects at most, side fractions or None for the contract's, square canvases, seed)
CURRICULUM = (
    ("dense0", 20000, 1, (0.4, 0.9), True, 0),
    ("dense1", 20000, 2, (0.25, 0.5), True, 1),
    ("denseS", 30000, 5, None, False, 2),
)
SPLIT_SHARE = 0.25  # stage 1 takes this share of every task of the train split
STAGE1A_REPLAY = 0.3  # stage 1a keeps this share of the single large shapes next to the scenes of one or two
STAGE1B_SCENES = 0.5  # stage 1b: all of every task of the split, and this share of stage 1's scenes
# stage 2h (binding): all of the scenes of up to five objects and of these tasks, this share of the others
BINDING_TASKS = ("color", "shape", "count", "position", "relation")
STAGE2H_OTHERS = 0.5
STAGE2H_DENSE1 = 0.25
STAGE2K_COUNT = 3.0  # stage 2k: stage 2h with the split's count questions this many times over
STAGE2M_MC = 4.0  # stage 2m: stage 2k with the split's multiple-choice questions this many times over
# stage 2o: stage 2m with these count questions of the train split's kind (folder, items, base seed) instead of the
# split's own, each once
STAGE2O_COUNT = ("count2", 18000, 31)
# stage 2r: stage 2o with fresh relation and position questions (folder, items per task, base seed), the relation
# ones each once, the position ones at this share
STAGE2R_PLACE = ("place2", 12000, 33)
STAGE2R_POSITION = 0.5
# stage 2u: stage 2r with the split's text-only questions this many times over (672 distinct sums and differences;
# at stage 2r's half share a 500-step stage sees ~150 of them, and the answers drift one off)
STAGE2U_TEXT = 4.0
# stage 2zc: stage 2u with the split's questions of these tasks (the furthest below their targets; at stage 2u's half
# share a 500-step stage sees ~50 grounding rows) at this share each; stage 2zd: stage 2zc with grounding at its own
STAGE2ZC_TASKS = ("grounding", "caption", "multi_image", "chart_value", "chart_max", "reasoning")
STAGE2ZC_SHARE = 2.0
STAGE2ZD_GROUNDING = 6.0
# stage 2zo: stage 2zc with the position questions of fresh multiple-choice ones (folder, items before the filter,
# base seed; about a quarter are position ones) at this share: position is the category mc answers at chance (run 52:
# three times the position rows a stage saw before did not move it; the shipped lineage went through the stage)
STAGE2ZO_MC = ("mcpos", 24000, 37)
STAGE2ZO_SHARE = 2.0


def curriculum(split: str | Path, out: str | Path, scale: float = 1.0, progress: bool = False) -> dict:
    """The curriculum sets and the stages' meta files (paths relative to `out`); `scale` shrinks them."""
    from ..synth.writer import generate_dense

    split, out = Path(split), Path(out)
    meta_file = split / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file}: not a synthetic split (internvl synth --split train)")
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, n, k, sides, square, seed in CURRICULUM:
        n = max(1, int(n * scale))
        generate_dense(str(out / name), n, k, 6, square, seed, sides, progress)
        entries[name] = {"root": name, "annotation": f"{name}/dense.jsonl", "data_augment": False,
                         "repeat_time": 1, "length": n}  # fmt: skip
    n_shapes = shape_questions(out / "dense0" / "dense.jsonl", out / "dense0" / "shape.jsonl")
    shapes = {"dense0_shape": {**entries["dense0"], "annotation": "dense0/shape.jsonl", "length": n_shapes}}
    stage1a = {"dense0": {**entries["dense0"], "repeat_time": STAGE1A_REPLAY,
                          "length": max(1, int(entries["dense0"]["length"] * STAGE1A_REPLAY))},
               "dense1": entries["dense1"]}  # fmt: skip
    stage1 = {k: v for k, v in entries.items() if k != "dense0"}
    stage1b = {k: share(v, STAGE1B_SCENES) for k, v in stage1.items()}
    stage2h = {"dense1": share(entries["dense1"], STAGE2H_DENSE1), "denseS": entries["denseS"]}
    rel = Path(os.path.relpath(split, out))
    for name, entry in json.loads(meta_file.read_text()).items():
        paths = {"root": str(rel / entry["root"]), "annotation": str(rel / entry["annotation"])}
        stage1[name] = share({**entry, **paths}, SPLIT_SHARE)
        stage1b[name] = share({**entry, **paths}, 1.0)
        binding = name.removeprefix("synth_") in BINDING_TASKS
        stage2h[name] = share({**entry, **paths}, 1.0 if binding else STAGE2H_OTHERS)
    stage2k = {name: share(stage1b[name], STAGE2K_COUNT) if name == "synth_count" else entry
               for name, entry in stage2h.items()}  # fmt: skip
    stage2m = {name: share(stage1b[name], STAGE2M_MC) if name == "synth_mc" else entry
               for name, entry in stage2k.items()}  # fmt: skip
    count = fresh_questions(out, STAGE2O_COUNT, ["count"], scale, progress)
    stage2o = {name: count["count"] if name == "synth_count" else entry for name, entry in stage2m.items()}
    place = fresh_questions(out, STAGE2R_PLACE, ["relation", "position"], scale, progress)
    stage2r = {**stage2o, "synth_relation": place["relation"],
               "synth_position": share(place["position"], STAGE2R_POSITION)}  # fmt: skip
    stage2u = {name: share(stage1b[name], STAGE2U_TEXT) if name == "synth_text" else entry
               for name, entry in stage2r.items()}  # fmt: skip
    weak = {f"synth_{task}" for task in STAGE2ZC_TASKS}
    stage2zc = {name: share(stage1b[name], STAGE2ZC_SHARE) if name in weak else entry
                for name, entry in stage2u.items()}  # fmt: skip
    stage2zd = {name: share(stage1b[name], STAGE2ZD_GROUNDING) if name == "synth_grounding" else entry
                for name, entry in stage2zc.items()}  # fmt: skip
    fresh_mc = fresh_questions(out, STAGE2ZO_MC, ["mc"], scale, progress)["mc"]
    n_position = keep_category(out / fresh_mc["annotation"], out / STAGE2ZO_MC[0] / "mc_position.jsonl", "position")
    position_mc = {**fresh_mc, "annotation": f"{STAGE2ZO_MC[0]}/mc_position.jsonl", "length": n_position}
    stage2zo = {**stage2zc, "synth_mc_position": share(position_mc, STAGE2ZO_SHARE)}
    metas = {"shapes": shapes, "stage0": {"dense0": entries["dense0"]}, "stage1a": stage1a, "stage1": stage1,
             "stage1b": stage1b, "stage2h": stage2h, "stage2k": stage2k, "stage2m": stage2m,
             "stage2o": stage2o, "stage2r": stage2r, "stage2u": stage2u, "stage2zc": stage2zc,
             "stage2zd": stage2zd, "stage2zo": stage2zo}  # fmt: skip
    for name, meta in metas.items():
        (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {name: sum(e["length"] for e in meta.values()) for name, meta in metas.items()}


def fresh_questions(out: Path, spec: tuple[str, int, int], tasks: list[str], scale: float, progress: bool) -> dict:
    """Train-split questions of `tasks` drawn from another seed into `out`/folder (`spec`: folder, items per task
    before `scale`, base seed); their meta entries by task, each row once an epoch."""
    from ..synth.writer import generate_split

    folder, n, seed = spec
    n = max(1, int(n * scale))
    generate_split(str(out / folder), "train", n, tasks=tasks, seed=seed, progress=progress)
    return {task: {"root": folder, "annotation": f"{folder}/{task}.jsonl", "data_augment": False, "repeat_time": 1,
                   "length": n} for task in tasks}  # fmt: skip


def keep_category(rows: Path, out: Path, category: str) -> int:
    """The multiple-choice rows of `rows` whose category is `category`, written to `out`; the images of the others
    (next to `rows`) are deleted, as no stage reads them. Returns how many rows were kept."""
    n = 0
    with open(rows, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            row = json.loads(line)
            if row["meta"]["category"] == category:
                w.write(line)
                n += 1
            else:
                (rows.parent / row["image"]).unlink(missing_ok=True)
    return n


def share(entry: dict, rate: float) -> dict:
    """A meta entry that takes `rate` of its rows each epoch (its length the rows it contributes)."""
    return {**entry, "repeat_time": rate, "length": max(1, int(entry["length"] * rate))}


def shape_questions(dense: Path, out: Path) -> int:
    """The `What shape is ...` turns of a dense set, one single-turn row each; returns how many."""
    n = 0
    with open(dense, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            row = json.loads(line)
            turns = row["conversations"]
            for q, a in zip(turns[::2], turns[1::2]):
                question = q["value"].replace("<image>\n", "")
                if question.startswith("What shape"):
                    single = [{"from": "human", "value": "<image>\n" + question}, a]
                    w.write(json.dumps({**row, "id": f"{row['id']}_shape", "conversations": single}) + "\n")
                    n += 1
    return n
