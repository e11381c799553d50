"""Add the scene facts (size, objects, each question's task) to the dense curriculum sets of a curriculum
written before `generate_dense` kept them, without rendering again: each row's scene is drawn again from its
seed and its questions must come out exactly as written. Writes CUR/<name>/dense_facts.jsonl next to the
old annotation and CUR/stage2h_facts.json, stage 2h's meta file pointing at them (the images are shared).

    python runs/annotate_dense.py /work/data/nano/cur
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internvl.nano.curriculum import CURRICULUM
from internvl.synth.tasks import conversation
from internvl.synth.writer import dense_scene


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cur")
    args = ap.parse_args()
    cur = Path(args.cur)
    stage = json.loads((cur / "stage2h.json").read_text())
    for name, _n, max_objects, sides, square, seed in CURRICULUM:
        if name not in stage:
            continue
        rows = [json.loads(line) for line in (cur / name / "dense.jsonl").read_text().splitlines()]
        for i, row in enumerate(rows):
            _, qa, row["meta"] = dense_scene(i, max_objects, 6, square, seed, sides)
            if conversation(qa, True) != row["conversations"]:
                raise SystemExit(f"{name}/dense.jsonl:{i + 1}: the scene drawn again asks other questions")
        with open(cur / name / "dense_facts.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
        stage[name]["annotation"] = f"{name}/dense_facts.jsonl"
        print(f"{name}: {len(rows)} rows")
    (cur / "stage2h_facts.json").write_text(json.dumps(stage, indent=2))


if __name__ == "__main__":
    main()
