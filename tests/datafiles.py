"""Tiny data folders the tests write: an SFT split (meta.json + JSONL) and preference pairs, in the
reference formats that `internvl finetune` and `internvl mpo` read."""

from __future__ import annotations

import json

Q, A = {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "red"}
COLORS = ["red", "green", "blue"]


def write_split(folder, rows, name="train", meta_extra=None):
    """Rows to folder/{name}.jsonl and a meta.json with root "." and a relative annotation."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )
    entry = {
        "root": ".",
        "annotation": f"{name}.jsonl",
        "data_augment": False,
        "repeat_time": 1,
        "length": len(rows),
    }
    (folder / "meta.json").write_text(json.dumps({name: {**entry, **(meta_extra or {})}}))
    return folder / "meta.json"


def write_pairs(folder, rows, name="pairs"):
    """Preference rows (question, chosen, rejected, optional image) and their meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )
    meta = {name: {"root": ".", "annotation": f"{name}.jsonl", "data_augment": False, "repeat_time": 1}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "meta.json"
