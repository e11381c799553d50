"""Where the count questions go wrong, from an evaluation's predictions: for the count items of a split, the share
right and the mean signed error (answer minus truth) by question template ("How many objects", "How many
{shape}s", "How many {color} {shape}s"), by the true count and by how many objects of the scene the question does
not count (distractors). Reads `internvl eval synthetic --out DIR`'s predictions.jsonl and the split's count.jsonl
(settings.json names the split). No model is run.

    python runs/count_breakdown.py EVAL_DIR [EVAL_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def breakdown(eval_dir: Path) -> dict[str, dict[str, tuple[int, int, float]]]:
    """{grouping: {group: (items, right, mean signed error)}} for the count items of one evaluation."""
    split = Path(json.loads((eval_dir / "settings.json").read_text())["data_dir"])
    items = {}
    for line in (split / "count.jsonl").read_text().splitlines():
        row = json.loads(line)
        items[row["id"]] = row["meta"]
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("task") != "count":
            continue
        meta = items[row["index"]]
        n = int(meta["answer"])
        got = row["extracted"].strip()
        err = int(got) - n if got.isdigit() else 99  # an answer that is not a number counts as far off
        groups["template"][meta["template"]].append(err)
        groups["true count"][f"{n}"].append(err)
        groups["distractors"][f"{min(len(meta['objects']) - n, 4)}{'+' if len(meta['objects']) - n >= 4 else ''}"].append(err)
        groups["template x distractors"][f"{meta['template']}, {'none' if len(meta['objects']) == n else 'some'}"].append(err)
    out: dict[str, dict[str, tuple[int, int, float]]] = {}
    for name, by in groups.items():
        out[name] = {}
        for key in sorted(by, key=lambda k: (len(k), k)):
            errs = [e for e in by[key] if e != 99]
            out[name][key] = (len(by[key]), sum(e == 0 for e in by[key]), sum(errs) / len(errs) if errs else 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    for eval_dir in args.eval_dirs:
        print(f"# {eval_dir}")
        for name, by in breakdown(eval_dir).items():
            cells = ", ".join(f"{k}: {r}/{n} ({e:+.2f})" for k, (n, r, e) in by.items())
            print(f"{name}: {cells}")


if __name__ == "__main__":
    main()
