"""Model folders of the recipe: `snapshot` (a training checkpoint as a model folder), `check` (right answers
on seeded check items) and `ship` (a trained model into the package as the built-in model, with training.json:
stage, step, hours, notes, test-split accuracy and the check answers)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def snapshot(
    init: str | Path, checkpoint: str | Path, out: str | Path, max_dynamic_patch: int | None = None
) -> Path:
    """A model folder from `init` (config.json, tokenizer files) and `checkpoint`'s model.safetensors; when
    `init` is a model folder (a later stage), the tensors the checkpoint lacks (frozen ones) come from it."""
    init, checkpoint, out = Path(init), Path(checkpoint), Path(out)
    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights}: no weights in this checkpoint (a from-scratch run saves them all)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in init.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    base = init / "model.safetensors"
    if base.exists():  # a run from a model folder saves only what it trains: the rest comes from the base
        from safetensors.torch import load_file, save_file

        tensors = {**load_file(str(base)), **load_file(str(weights))}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shutil.copy2(weights, out / "model.safetensors")
    if max_dynamic_patch is not None:
        config = json.loads((out / "config.json").read_text())
        config["max_dynamic_patch"] = max_dynamic_patch
        (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json")  # fmt: skip


# the fixed items a shipped model is checked on (tests/test_builtin_model.py)
CHECK_SPLIT, CHECK_N = "val", 10


def check(
    model_dir: str | Path, work: str | Path, split: str = CHECK_SPLIT, n: int = CHECK_N
) -> dict[str, int]:
    """Right answers per task on n generated items of every task of `split` (seeded, greedy, the model's
    own tiling): the figures `ship` records and the test of the shipped model reproduces."""
    from ..api import load
    from ..eval.runner import evaluate
    from ..eval.synthetic import SyntheticTask
    from ..synth import TASKS, generate_split

    work = Path(work)
    generate_split(str(work / "split"), split, n=n, tasks=list(TASKS))
    summary = evaluate(load(str(model_dir)), SyntheticTask(work / "split", list(TASKS)), work / "out",
                       batch_size=16, progress=False)  # fmt: skip
    return {task: round(r["accuracy"] * r["n"]) for task, r in summary["tasks"].items()}


def ship(model_dir: str | Path, stage: str, summary: str | Path | None = None, hours: float | None = None,
         dest: str | Path | None = None, notes: str = "", step: int | None = None) -> Path:
    """Copy `model_dir` (a complete model folder in the original layout) into `dest` (default: the package's
    built-in model folder) and write `training.json` there, with the model's right answers on the fixed
    check items (`check`); returns `dest`. `step` defaults to the newest checkpoint next to `model_dir`
    (a run's OUT/final sits beside OUT/checkpoints)."""
    import tempfile

    from ..api import BUILTIN
    from ..checkpoint.layouts import read_config
    from ..train.checkpoint import find_latest

    src, dest = Path(model_dir), Path(dest) if dest else BUILTIN
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name}: missing; ship needs a complete model folder")
    read_config(src / "config.json")  # refuses a config the loader would refuse
    info: dict = {"stage": stage, "source": str(src)}
    latest = find_latest(src.parent) if step is None else None
    if latest is not None:
        step = int(json.loads((latest / "state.json").read_text())["step"])
    if step is not None:
        info["step"] = step
    if hours is not None:
        info["training_hours"] = hours
    if notes:
        info["notes"] = notes
    if summary:
        s = json.loads(Path(summary).read_text())
        if "tasks" not in s:
            raise ValueError(f"{summary}: not the summary of `internvl eval synthetic` (no 'tasks')")
        tasks = {k: round(v["accuracy"] * 100, 1) for k, v in s["tasks"].items()}
        info["test_split"] = {"settings": s.get("settings", {}), "accuracy_percent": tasks,
                              "mean_percent": round(s["overall"] * 100, 1)}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        info["check"] = {"split": CHECK_SPLIT, "n": CHECK_N, "correct": check(src, work)}
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (src / name).is_file():
            tmp = dest / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dest / name)
    (dest / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return dest
