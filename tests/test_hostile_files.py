"""Hostile training and evaluation files (issue 21): an evaluation's settings.json and the training metrics are
written atomically and a torn settings file is a one-line error on --resume; a JSONL row too large to be a
conversation is refused by file and line without being read whole (skipped with --skip-bad-rows); an
unwritable output folder stops checkpoints and metrics with one line, and `internvl finetune` / `mpo` with one
line and exit code 1 for any other output they cannot write (TensorBoard, the skipped-rows list, the adapter)."""

from __future__ import annotations

import json
import tracemalloc
from types import SimpleNamespace

import pytest
import torch

from internvl.errors import DataError, TrainingError
from internvl.eval import runner
from internvl.eval.runner import evaluate
from internvl.train.checkpoint import save_checkpoint
from internvl.train.data import MAX_ROW_BYTES, DatasetSpec, build_index
from internvl.train.dist import DistContext
from internvl.train.metrics import MetricsLog


class Engine:
    """Just enough of the engine with text (engine.detok) for the runner: every request answers "A" at the
    next step."""

    def __init__(self):
        self.waiting, self.n = [], 0

    def add(self, prompt, params, pixel_values):
        self.n += 1
        self.waiting.append(SimpleNamespace(request_id=f"r{self.n}", text="A"))
        return self.waiting[-1]

    def step(self):
        done, self.waiting = self.waiting, []
        return [SimpleNamespace(seq=s, finished=True, output=s.text) for s in done]

    def abort(self, seq):
        pass


class Task:
    name, settings = "toy", {"prompt": "v1"}

    def __init__(self, n=3, tokens=8):
        self.examples = [SimpleNamespace(key=str(i), prompt=f"q{i}", images=[], info={}, max_new_tokens=tokens)
                         for i in range(n)]  # fmt: skip

    def judge(self, ex, answer):
        return {}

    def summarize(self, predictions):
        return {"n": len(predictions)}


def model():
    return SimpleNamespace(detok=Engine(), path="toy-model", prepare=lambda prompt, images, max_num: (prompt, None, 0))


def test_a_torn_settings_file_is_a_one_line_error_on_resume(tmp_path):
    evaluate(model(), Task(), tmp_path, progress=False)
    settings = tmp_path / "settings.json"
    text = settings.read_text()
    settings.write_text(text[: len(text) // 2])  # what a kill in the middle of a plain write leaves
    with pytest.raises(DataError) as e:
        evaluate(model(), Task(), tmp_path, resume=True, progress=False)
    assert "settings.json" in str(e.value) and "drop --resume" in str(e.value) and "\n" not in str(e.value)


def test_settings_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run killed while writing new settings leaves the previous file intact (the write goes to a temporary
    file that is renamed into place)."""
    evaluate(model(), Task(tokens=8), tmp_path, progress=False)
    before = json.loads((tmp_path / "settings.json").read_text())

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model(), Task(tokens=16), tmp_path, progress=False)
    assert json.loads((tmp_path / "settings.json").read_text()) == before
    monkeypatch.undo()
    assert evaluate(model(), Task(tokens=8), tmp_path, resume=True, progress=False)["n"] == 3


def conversation(text: str) -> bytes:
    row = {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}
    return json.dumps(row).encode() + b"\n"


def test_a_100_mb_row_is_refused_by_file_and_line_without_reading_it_whole(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(conversation("hello") + conversation("a" * (100 << 20)))  # valid, but no real row
    spec = DatasetSpec("toy", str(tmp_path), str(path))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            build_index([spec])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size - len(conversation("hello"))
    assert f"data.jsonl:2: the row is {size} bytes, above the limit of {MAX_ROW_BYTES}" in str(e.value)
    assert peak < 3 * MAX_ROW_BYTES, f"{peak >> 20} MiB held while scanning"  # the row alone is 100 MiB


def test_an_oversized_row_is_skipped_and_the_rows_after_it_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr("internvl.train.data.MAX_ROW_BYTES", 4096)
    path = tmp_path / "data.jsonl"
    path.write_bytes(conversation("first") + conversation("x" * 10_000) + b"\n" + conversation("third"))
    index = build_index([DatasetSpec("toy", str(tmp_path), str(path))], skip_bad_rows=True)
    size, name = len(conversation("x" * 10_000)), index.source(0).rsplit(":", 1)[0]
    assert [str(b) for b in index.bad] == [f"{name}:2: the row is {size} bytes, above the limit of 4096 bytes for one line"]
    assert len(index) == 2 and index.read(1)[0]["conversations"][0]["value"] == "third"
    assert index.source(1).endswith(":4")


def test_an_unwritable_output_folder_is_one_line_for_training_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "ok", 1, model, optimizer, DistContext(), {}, {})  # a writable folder works
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoints folder should be")
    with pytest.raises(TrainingError) as e:
        save_checkpoint(out, 3, model, optimizer, DistContext(), {}, {})
    message = str(e.value)
    assert "cannot write the checkpoint of step 3" in message and "--resume" in message and "\n" not in message


def test_unwritable_metrics_are_one_line_and_a_rewrite_is_atomic(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log({"step": 1, "loss": 2.0})
    before = (tmp_path / "metrics.csv").read_text()

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("internvl.train.metrics.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):  # a resume rewrites the file; killed then, it keeps the old one
        MetricsLog(tmp_path, tensorboard=False, resume_step=1)
    assert (tmp_path / "metrics.csv").read_text() == before
    monkeypatch.undo()
    (tmp_path / "metrics.csv").unlink()
    (tmp_path / "metrics.csv").mkdir()  # the file can no longer be written
    with pytest.raises(TrainingError) as e:
        log.log({"step": 2, "loss": 1.0})
    assert "metrics.csv: cannot write the training metrics" in str(e.value) and "\n" not in str(e.value)


# ---- the training commands: an output that cannot be written is one line, exit code 1 ---------------------------
# Each output path is blocked by something in the way (a file where a folder goes, a folder where a file goes, a
# link to nowhere) rather than by a read-only folder: that fails for every user, root included, so nothing skips.

CLI_FAST = ["--num-workers", "0", "--threads", "1", "--no-grad-checkpoint", "--max-seq-length", "256",
            "--log-every", "1", "--max-steps", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from refmodels import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("hostile_model") / "model")


@pytest.fixture()
def sft_meta(tmp_path):
    from datafiles import A, Q, write_split

    return write_split(tmp_path / "data", [{"conversations": [Q, A]}] * 2)


def _one_line(capsys, verb: str) -> str:
    """The one error line, last on stderr (after the progress bar's lines), and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback (most recent call last):" not in err, err
    assert [line for line in err if "error" in line.lower()] == err[-1:], err
    assert err[-1].startswith(f"internvl {verb}: error: "), err
    return err[-1]


def _run(verb: str, model, meta, out, *extra) -> int:
    from internvl.cli.main import main as cli

    return cli([verb, str(model), "--data", str(meta), "--out", str(out), *CLI_FAST, *map(str, extra)])


@pytest.mark.parametrize("verb", ["finetune", "mpo"])
def test_an_unwritable_tensorboard_folder_is_one_line(tiny_model, sft_meta, tmp_path, capsys, verb):
    pytest.importorskip("torch.utils.tensorboard")  # a dependency of the train extra
    if verb == "mpo":
        from datafiles import write_pairs

        sft_meta = write_pairs(tmp_path / "pairs", [{"question": "Count: 1 2 3", "chosen": "4 5 6",
                                                     "rejected": "left right"}] * 3)  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "tensorboard").write_text("a file where the TensorBoard folder goes")
    assert _run(verb, tiny_model, sft_meta, out, "--tensorboard") == 1
    assert _one_line(capsys, verb).endswith(f": error: {out / 'tensorboard'}: File exists")


def test_an_unwritable_skipped_rows_file_is_one_line(tiny_model, tmp_path, capsys):
    from datafiles import A, Q, write_split

    sft_meta = write_split(tmp_path / "data", [{"conversations": [Q, A]}] * 2 + ["{not json"])
    out = tmp_path / "out"
    (out / "skipped_rows.txt").mkdir(parents=True)  # a folder where the list of bad rows goes
    assert _run("finetune", tiny_model, sft_meta, out, "--skip-bad-rows", "--no-tensorboard") == 1
    assert _one_line(capsys, "finetune").endswith(f": error: {out / 'skipped_rows.txt'}: Is a directory")


def test_an_unwritable_adapter_folder_is_one_line(tiny_model, sft_meta, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "blocker").write_text("a file")
    (out / "final").symlink_to(tmp_path / "blocker" / "final")  # a link to a folder that cannot exist
    assert _run("finetune", tiny_model, sft_meta, out, "--no-tensorboard", "--lora-r", 2) == 1
    assert _one_line(capsys, "finetune").endswith(f": error: {out / 'final'}: File exists")
