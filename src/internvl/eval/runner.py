"""The evaluation runner: a task's examples through the generation engine (continuous batching), each
prediction appended to `predictions.jsonl` as it finishes, `--resume` from that file, and the summary.

Files in the output folder:
    settings.json      what the predictions depend on (model, prompts, tiles, tokens); --resume checks it
    predictions.jsonl  one row per question, in finishing order; the key of a row is its "key" field
    summary.json       the task's summary plus "settings" and "dataset", written when every question has an answer
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, suppress
from pathlib import Path

from internvl.errors import DataError, InternVLError
from internvl.eval.items import ImageSource
from internvl.eval.tasks import Example
from internvl.processing.inputs import TOTAL_MAX_NUM, tiles_per_image

DEFAULT_MAX_NUM = 6  # tiles per image in the reference evaluation scripts


def _greedy(max_new_tokens: int):
    from internvl.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)


def generate(model, examples: Iterable[Example], max_num: int = DEFAULT_MAX_NUM,
             batch_size: int = 8, total_max_num: int = TOTAL_MAX_NUM) -> Iterator[tuple[Example, str]]:  # fmt: skip
    """Yield (example, answer) as answers finish. Up to `batch_size` requests are in the engine at once; a new
    one is prepared (images decoded and tiled) only when one finishes, so memory stays flat. Closing the
    iterator early (an error, Ctrl-C) aborts the requests still in flight."""
    engine = model.detok  # the engine, with text
    todo = iter(examples)
    pending: dict[str, tuple] = {}
    try:
        while True:
            while len(pending) < batch_size and (ex := next(todo, None)) is not None:
                images = [im.load() if isinstance(im, ImageSource) else im for im in ex.images]
                try:
                    # the images of a question share 64 tiles, as InternVL's VLMEvalKit wrapper gives them
                    caps = tiles_per_image(max_num, len(images), total_max_num)
                    ids, pv, _ = model.prepare(ex.prompt, images, max_num=caps)
                    seq = engine.add(ids, _greedy(ex.max_new_tokens), pv)
                except InternVLError as exc:
                    raise type(exc)(f"question {ex.key}: {exc}") from None
                pending[seq.request_id] = (seq, ex)
            if not pending:
                return
            for event in engine.step():
                if event.finished and event.seq.request_id in pending:
                    _, ex = pending.pop(event.seq.request_id)
                    yield ex, event.output.strip()
    finally:
        if pending:
            for seq, _ in pending.values():
                engine.abort(seq)
            with suppress(Exception):  # best effort while another error propagates
                engine.step()  # drops the aborted requests, so the engine can be used again


def read_predictions(path: Path) -> dict[str, dict]:
    """Rows of a predictions file by key. Text after the last newline is a row torn by an interruption
    (rows are written whole, newline included): it is cut off the file, and its question asked again."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    rows: dict[str, dict] = {}
    for line_no, line in enumerate(complete.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["key"]] = row
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise DataError(f"{path}, line {line_no}: not a prediction row; delete the file or drop --resume") from None
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return rows


def _check_settings(path: Path, settings: dict) -> None:
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        old = e
    if not isinstance(old, dict):
        raise DataError(f"{path}: not a settings file written by this runner ({old}); delete it to resume anyway, "
                        "or drop --resume")  # fmt: skip
    for key in sorted(set(old) | set(settings)):
        if old.get(key) != settings.get(key):
            raise DataError(f"{path}: the predictions were made with {key}={old.get(key)!r}, this run has "
                            f"{settings.get(key)!r}; use the same settings or drop --resume")  # fmt: skip


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_max_num(model) -> int:
    """The reference evaluation's 6 tiles per image, or fewer when the model was trained with fewer
    (its config's max_dynamic_patch): more tiles than it has ever seen only hurt it."""
    processor = getattr(getattr(model, "config", None), "processor", None)  # config.ProcessorConfig
    trained = getattr(processor, "max_dynamic_patch", None)
    return min(DEFAULT_MAX_NUM, trained) if trained else DEFAULT_MAX_NUM


def evaluate(model, task, out_dir: str | Path, *, batch_size: int = 8, max_num: int | None = None,
             resume: bool = False, progress: bool | None = None, model_name: str | None = None,
             on_row: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Answer every example of `task` that has no prediction yet, then score all of them; returns the summary.

    `on_row(row)` is called after each row is written (tests interrupt a run from there). Without `resume`
    an existing predictions file is replaced. `max_num` defaults to `default_max_num(model)`.
    """
    from tqdm import tqdm

    max_num = max_num or default_max_num(model)
    total = max_num if getattr(task, "shares_tiles_as_training", False) else TOTAL_MAX_NUM
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path, settings_path = out / "predictions.jsonl", out / "settings.json"
    tokens = sorted({ex.max_new_tokens for ex in task.examples})
    settings = {**task.settings, "model": model_name or str(getattr(model, "path", None) or "model"),
                "max_num": max_num, "total_max_num": total,
                "max_new_tokens": tokens[0] if len(tokens) == 1 else tokens,
                "temperature": 0.0}  # fmt: skip
    if getattr(model, "efficiency", None) is not None:  # --efficiency: a resumed run keeps the same switches
        settings["efficiency"] = model.efficiency.to_spec()
    if resume:
        _check_settings(settings_path, settings)
        done = read_predictions(pred_path)
    else:
        done = {}
        pred_path.unlink(missing_ok=True)
    _write_atomic(settings_path, json.dumps(settings, indent=2) + "\n")
    todo = [ex for ex in task.examples if ex.key not in done]
    bar = tqdm(total=len(task.examples), initial=len(task.examples) - len(todo), desc=task.name, unit="q",
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)  # fmt: skip
    try:
        with open(pred_path, "a", encoding="utf-8") as f, closing(generate(model, todo, max_num, batch_size, total)) as gen:
            for ex, answer in gen:
                row = {"key": ex.key, **ex.info, "question": ex.prompt, "prediction": answer, **task.judge(ex, answer)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                done[ex.key] = row
                bar.update(1)
                if on_row is not None:
                    on_row(row)
            os.fsync(f.fileno())
    finally:
        bar.close()
    summary = {"dataset": task.name, **task.summarize({k: r["prediction"] for k, r in done.items()}),
               "settings": settings, "predictions": str(pred_path)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def cache_root() -> Path:
    """$INTERNVL_CACHE, else $XDG_CACHE_HOME/internvl, else ~/.cache/internvl."""
    if os.environ.get("INTERNVL_CACHE"):
        return Path(os.environ["INTERNVL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "internvl"


def synthetic_split(split: str = "test", n: int = 200, tasks: list[str] | None = None,
                    data_dir: str | Path | None = None) -> Path:  # fmt: skip
    """A folder holding `tasks` of a synthetic split with n items each: generated once (deterministically)
    into the cache, `<cache>/synth/<split>-n<n>-<fingerprint>`, unless `data_dir` is given. The fingerprint
    hashes the generator's source and fonts (synth/fingerprint.py): a split made by another revision, or with
    other fonts, is never reused (older folders stay until deleted)."""
    from internvl.synth import TASKS, generate_split
    from internvl.synth.fingerprint import fingerprint, generator_inputs

    tasks = list(tasks or TASKS)
    if data_dir is not None:
        return Path(data_dir)
    folder = cache_root() / "synth" / f"{split}-n{n}-{fingerprint()}"

    def complete(task: str) -> bool:
        path = folder / f"{task}.jsonl"
        return path.is_file() and sum(1 for _ in open(path)) == n

    missing = [t for t in tasks if not complete(t)]
    if missing:
        generate_split(str(folder), split, n=n, tasks=missing, progress=True)
        _write_atomic(folder / "generator.json", json.dumps(generator_inputs(), indent=1) + "\n")
    return folder
