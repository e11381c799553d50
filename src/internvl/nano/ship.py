"""Model folders of the recipe: `snapshot` (a training checkpoint as a model folder), `check` (right answers
on seeded check items) and `ship` (a trained model or checkpoint into the package as the built-in model, with
training.json: stage, step, base, hours, notes, test-split accuracy and the check answers)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def snapshot(
    init: str | Path, checkpoint: str | Path, out: str | Path, max_dynamic_patch: int | None = None
) -> Path:
    """A model folder from `checkpoint`'s tensors over `init` (the folder `prepare` wrote, whose config and
    tokenizer complete a from-scratch checkpoint, or the start model of a later stage, whose tensors fill in
    the frozen ones): checkpoint/export.py, with the tiling the weights were trained at."""
    from ..checkpoint.export import export_checkpoint

    out = export_checkpoint(checkpoint, out, base=init)
    if max_dynamic_patch is not None:
        config = json.loads((out / "config.json").read_text())
        config["max_dynamic_patch"] = max_dynamic_patch
        (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json")  # fmt: skip


# the fixed items a shipped model is checked on (tests/test_builtin_model.py)
CHECK_SPLIT, CHECK_N = "val", 5


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
         dest: str | Path | None = None, notes: str = "", step: int | None = None,
         base: str | Path | None = None) -> Path:  # fmt: skip
    """Copy `model_dir` into `dest` (default: the package's built-in model folder) and write `training.json`
    there, with the model's right answers on the fixed check items (`check`); returns `dest`. `model_dir` is a
    complete model folder in the original layout, or a training checkpoint (OUT/checkpoints/step-N) made
    complete over `base` (default: the start model its run recorded; checkpoint/export.py). `step` defaults to the
    checkpoint's, or for a model folder to the newest checkpoint beside it (OUT/final sits beside
    OUT/checkpoints)."""
    import tempfile

    from ..checkpoint.export import export_checkpoint, find_base, is_training_checkpoint

    src = Path(model_dir)
    if not is_training_checkpoint(src):
        if base is not None:
            raise ValueError(f"{src}: --base is for a training checkpoint (OUT/checkpoints/step-N); this folder "
                             "has a config.json")  # fmt: skip
        return _ship(src, src, stage, summary, hours, dest, notes, step)
    start = find_base(src, base)
    with tempfile.TemporaryDirectory() as work:
        folder = export_checkpoint(src, Path(work) / "model", base=base)
        return _ship(folder, src, stage, summary, hours, dest, notes, step, start.weights or start.config)


def _ship(folder: Path, source: Path, stage: str, summary, hours, dest, notes: str, step: int | None,
          start: Path | None = None) -> Path:  # fmt: skip
    import tempfile

    from ..api import BUILTIN
    from ..checkpoint.layouts import read_config
    from ..train.checkpoint import find_latest

    dest = Path(dest) if dest else BUILTIN
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; ship needs a complete model folder")
    read_config(folder / "config.json")  # refuses a config the loader would refuse
    info: dict = {"stage": stage, "source": str(source)}
    if start is not None:  # a checkpoint: its own step, and the start model it was completed with
        info["base"] = str(start)
        state = source / "state.json"
        if step is None and state.is_file():
            step = int(json.loads(state.read_text())["step"])
    else:
        latest = find_latest(source.parent) if step is None else None
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
        info["check"] = {"split": CHECK_SPLIT, "n": CHECK_N, "correct": check(folder, work, CHECK_SPLIT, CHECK_N)}
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (folder / name).is_file():
            tmp = dest / (name + ".tmp")
            shutil.copyfile(folder / name, tmp)
            os.replace(tmp, dest / name)
    (dest / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return dest
