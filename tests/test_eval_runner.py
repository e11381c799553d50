"""The evaluation runner: TSV mc vs the synthetic mc task, circular wiring, resume, VQA metrics, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.api import load
from internvl.cli.main import main as cli
from internvl.errors import DataError
from internvl.eval import MCQTask, SyntheticTask, VQATask, evaluate, synth_table, synthetic_split, tsv_task
from internvl.eval.extract import extract_choice
from internvl.eval.items import EvalItem, ImageSource
from internvl.eval.runner import read_predictions
from internvl.synth import generate_split


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    generate_split(str(d), "test", n=6, tasks=["mc", "color", "count", "reasoning", "text"])
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"random": tiny_checkpoint(d / "random"), "counting": tiny_checkpoint(d / "counting", counting=True)}


def rows_of(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- a fake engine that answers from a table, to control correctness exactly ----------------------------


class FakeEngine:
    """Engine.add/step/abort on text: `answer(prompt)` is the reply; `max_batch` requests finish per step."""

    def __init__(self, answer, max_batch=4):
        self.answer, self.max_batch, self.waiting, self.batches, self.added = answer, max_batch, [], [], 0

    def add(self, prompt, params, pixel_values):
        self.added += 1
        seq = SimpleNamespace(request_id=f"req-{self.added}", text=self.answer(prompt))
        self.waiting.append(seq)
        return seq

    def step(self):
        batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
        self.batches.append(len(batch))
        return [SimpleNamespace(seq=s, finished=True, output=s.text) for s in reversed(batch)]  # finishing out of order

    def abort(self, seq):
        self.waiting = [s for s in self.waiting if s is not seq]


class FakeModel:
    path = "fake"

    def __init__(self, answer, max_batch=4):
        self.detok = FakeEngine(answer, max_batch)

    def prepare(self, prompt, images, max_num=None):
        return prompt, None, prompt


def mcq_items(n=3):
    image = ImageSource.from_image(Image.new("RGB", (32, 32), "red"))
    opts = {"A": "red", "B": "green", "C": "blue", "D": "black"}
    return [EvalItem(index=i, question=f"Question {i}?", options=dict(opts), answer="ABCD"[i % 4],
                     category=f"cat{i % 2}", images=[image]) for i in range(n)]  # fmt: skip


# ---- 1. the mc TSV and the synthetic mc task ask and score the same --------------------------------------


@pytest.mark.parametrize("kind", ["random", "counting"])
def test_mc_tsv_equals_synthetic_mc(split, models, kind, tmp_path, capsys):
    model = str(models[kind])
    common = ["--max-new-tokens", "12", "--circular", "on", "--batch-size", "5"]
    assert cli(["eval", model, "--data", str(split / "mc.tsv"), "--out", str(tmp_path / "tsv"), *common]) == 0
    assert cli(["eval", "synthetic", model, "--data-dir", str(split), "--tasks", "mc",
                "--out", str(tmp_path / "syn"), *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| mc | 6 |" in out and "| category | n | vanilla | circular |" in out
    tsv = {r["index"]: r for r in rows_of(tmp_path / "tsv" / "predictions.jsonl")}
    syn = {r["index"]: r for r in rows_of(tmp_path / "syn" / "predictions.jsonl")}
    assert tsv.keys() == syn.keys() and len(tsv) == 6 * 4  # every rotation of every question
    trained = {i: r["conversations"][0]["value"] for i, r in enumerate(rows_of(split / "mc.jsonl"))}
    for index, row in tsv.items():
        assert row["question"] == syn[index]["question"]  # identical prompts, rotations included
        if row["rotation"] == 0:
            assert "<image>\n" + row["question"] == trained[index]  # ... and the question the model learned
        assert row["prediction"] == syn[index]["prediction"] and row["hit"] == syn[index]["hit"]
        assert row["extracted"] == extract_choice(row["prediction"], row["options"])
    a, b = json.loads((tmp_path / "tsv" / "summary.json").read_text()), json.loads((tmp_path / "syn" / "summary.json").read_text())
    assert a["vanilla"]["accuracy"] == b["tasks"]["mc"]["accuracy"]
    assert a["circular"]["accuracy"] == b["tasks"]["mc"]["circular"]
    assert a["vanilla"]["categories"] == b["tasks"]["mc"]["categories"]
    originals = [r for r in tsv.values() if r["rotation"] == 0]
    assert a["vanilla"]["accuracy"] == sum(r["extracted"] == r["gold"] for r in originals) / 6


def test_mc_tsv_equals_synthetic_mc_with_nonzero_accuracy(split, tmp_path):
    # A rule that picks the alphabetically first option text: right on some questions, and circular-consistent.
    def answer(prompt):
        options = [line.split(". ", 1) for line in prompt.splitlines()[1:5]]
        return f"The answer is {min(options, key=lambda o: o[1])[0]}"

    a = evaluate(FakeModel(answer), tsv_task(split / "mc.tsv", circular="on"), tmp_path / "a", progress=False)
    b = evaluate(FakeModel(answer), SyntheticTask(split, ["mc"]), tmp_path / "b", progress=False)
    assert 0 < a["vanilla"]["accuracy"] < 1
    assert a["vanilla"]["accuracy"] == b["tasks"]["mc"]["accuracy"] == a["circular"]["accuracy"]


# ---- 2. circular wiring -----------------------------------------------------------------------------------


def test_circular_group_counts_only_when_every_rotation_is_right(tmp_path):
    task = MCQTask("toy", mcq_items(3), circular=True)
    assert [ex.info["rotation"] for ex in task.examples] == [0, 1, 2, 3] * 3
    wrong = {(1, 2), (2, 0)}  # (question, rotation): q1 misses one rotation, q2 misses the unrotated one
    replies = {}
    for ex in task.examples:
        gold = ex.ref.answer
        bad = "ABCD"[("ABCD".index(gold) + 1) % 4]
        replies[ex.prompt] = f"({bad})" if (ex.info["g_index"], ex.info["rotation"]) in wrong else f"{gold}."
    fake = FakeModel(replies.__getitem__)
    summary = evaluate(fake, task, tmp_path, batch_size=5, progress=False)
    assert summary["vanilla"]["accuracy"] == pytest.approx(2 / 3)  # q0, q1 right unrotated
    assert summary["circular"]["accuracy"] == pytest.approx(1 / 3)  # only q0 right in every rotation
    assert summary["circular"]["categories"] == {"cat0": {"n": 2, "accuracy": 0.5}, "cat1": {"n": 1, "accuracy": 0.0}}
    rows = rows_of(tmp_path / "predictions.jsonl")
    assert len(rows) == 12 and sorted(r["index"] for r in rows) == sorted(ex.ref.index for ex in task.examples)
    assert max(fake.detok.batches) == 4  # several requests in flight at once


def test_circular_off_scores_the_plain_questions(tmp_path):
    task = MCQTask("toy", mcq_items(4), circular=False)
    summary = evaluate(FakeModel(lambda p: "B"), task, tmp_path, progress=False)
    assert summary["circular"] is None and summary["vanilla"]["accuracy"] == 0.25 and len(task.examples) == 4


@pytest.mark.parametrize("trained, asked, used", [(None, None, 6), (12, None, 6), (1, None, 1), (1, 4, 4)])
def test_tiles_default_to_the_reference_six_or_what_the_model_was_trained_with(tmp_path, trained, asked, used):
    """A model trained on one tile per image (the built-in one) is not evaluated on six."""
    model, seen = FakeModel(lambda p: "A"), []
    if trained is not None:
        model.config = SimpleNamespace(processor=SimpleNamespace(max_dynamic_patch=trained))  # as ModelConfig
    model.prepare = lambda prompt, images, max_num=None: seen.append(max_num) or (prompt, None, prompt)
    evaluate(model, MCQTask("toy", mcq_items(2), circular=False), tmp_path, max_num=asked, progress=False)
    assert seen == [used, used]
    assert json.loads((tmp_path / "settings.json").read_text())["max_num"] == used


# ---- 3. resume ----------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_run(split, models, tmp_path):
    model = load(models["random"])
    task = SyntheticTask(split, ["mc", "color", "reasoning", "text"], limit=3, max_new_tokens=10)
    full = evaluate(model, task, tmp_path / "full", batch_size=3, progress=False)

    def interrupt(row, seen=[]):
        seen.append(row["key"])
        if len(seen) == 5:
            raise Stop

    with pytest.raises(Stop):
        evaluate(model, task, tmp_path / "cut", batch_size=3, progress=False, on_row=interrupt)
    assert len(rows_of(tmp_path / "cut" / "predictions.jsonl")) == 5 and not (tmp_path / "cut" / "summary.json").exists()
    with open(tmp_path / "cut" / "predictions.jsonl", "a") as f:
        f.write('{"key": "color/color_0000')  # a row torn by a kill in mid-write
    resumed = evaluate(model, task, tmp_path / "cut", batch_size=3, resume=True, progress=False)
    keys = [r["key"] for r in rows_of(tmp_path / "cut" / "predictions.jsonl")]
    assert sorted(keys) == sorted(ex.key for ex in task.examples) and len(keys) == len(set(keys)) == 3 * 4 + 3 * 3
    by_key = {r["key"]: r for r in rows_of(tmp_path / "full" / "predictions.jsonl")}
    assert all(by_key[r["key"]] == r for r in rows_of(tmp_path / "cut" / "predictions.jsonl"))
    full.pop("predictions"), resumed.pop("predictions")
    assert resumed == full
    assert full["tasks"]["mc"]["n"] == 3 and "circular" in full["tasks"]["mc"]


def test_resume_through_the_cli_extends_a_limited_run_and_checks_settings(split, models, tmp_path, capsys):
    base = ["eval", str(models["counting"]), "--data", str(split / "mc.tsv"), "--out", str(tmp_path), "--max-new-tokens", "4"]
    assert cli(base + ["--limit", "2"]) == 0
    assert cli(base + ["--resume"]) == 0
    assert sorted(r["index"] for r in rows_of(tmp_path / "predictions.jsonl")) == list(range(6))
    assert cli(base[:-1] + ["5", "--resume"]) == 1
    assert "max_new_tokens=4" in capsys.readouterr().err


def test_several_tsvs_go_to_one_folder_each_and_circular_auto_follows_the_name(split, models, tmp_path):
    (tmp_path / "MMBench_toy.tsv").write_bytes((split / "mc.tsv").read_bytes())
    data = ["--data", str(split / "mc.tsv"), "--data", str(tmp_path / "MMBench_toy.tsv")]
    assert cli(["eval", str(models["counting"]), *data, "--out", str(tmp_path / "o"), "--limit", "2",
                "--max-new-tokens", "3"]) == 0  # fmt: skip
    plain = json.loads((tmp_path / "o" / "mc" / "summary.json").read_text())
    mmb = json.loads((tmp_path / "o" / "MMBench_toy" / "summary.json").read_text())
    assert plain["circular"] is None and plain["settings"]["circular"] is False and plain["n"] == 2
    assert mmb["circular"]["n"] == 2 and len(rows_of(tmp_path / "o" / "MMBench_toy" / "predictions.jsonl")) == 8


# ---- open VQA metrics -----------------------------------------------------------------------------------------


def vqa_items(answers):
    return [EvalItem(index=i, question=f"q{i}", answer=a, category="c") for i, a in enumerate(answers)]


@pytest.mark.parametrize(
    "name, answers, replies, metric, accuracy",
    [
        ("textvqa", ["Red", "['cat', 'kitten']"], ["red.", "kitten"], "exact", 1.0),
        ("chartqa_test", ["100", "yes"], ["103", "no"], "relaxed", 0.5),
        ("docvqa_val", ["invoice"], ["invoce"], "anls", 1 - 1 / 7),
        ("ref", ["<ref>a cat</ref><box>[[0, 0, 100, 100]]</box>"] * 2,
         ["<box>[[0, 0, 90, 100]]</box>", "<box>[[50, 50, 150, 150]]</box>"], "iou", 0.5),
    ],
)  # fmt: skip
def test_vqa_metric_from_the_dataset_name(tmp_path, name, answers, replies, metric, accuracy):
    from internvl.eval.tasks import vqa_metric

    items = vqa_items(answers)
    assert vqa_metric(name, items) == metric
    task = VQATask(name, items, metric)
    by_prompt = {ex.prompt: r for ex, r in zip(task.examples, replies)}
    summary = evaluate(FakeModel(by_prompt.__getitem__), task, tmp_path, progress=False)
    assert summary["overall"] == pytest.approx(accuracy) and summary["metric"] == metric
    assert task.examples[0].prompt == ("q0" if metric == "iou" else "q0\nAnswer the question using a single word or phrase.")


# ---- the synthetic benchmark: cache and table ------------------------------------------------------------------


def test_synthetic_split_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    from internvl.synth import fingerprint

    monkeypatch.setenv("INTERNVL_CACHE", str(tmp_path))
    folder = synthetic_split("test", 3, ["text", "color"])
    assert folder == tmp_path / "synth" / f"test-n3-{fingerprint.fingerprint()}"
    assert len(rows_of(folder / "color.jsonl")) == 3
    assert json.loads((folder / "generator.json").read_text()) == fingerprint.generator_inputs()
    stamp = (folder / "color.jsonl").stat().st_mtime_ns
    assert synthetic_split("test", 3, ["color", "count"]) == folder  # the same generator: reused
    assert (folder / "color.jsonl").stat().st_mtime_ns == stamp and (folder / "count.jsonl").exists()
    # another revision of the generator (or other fonts): a new split, the old one left as it was
    monkeypatch.setattr(fingerprint, "fingerprint", lambda: "0123456789ab")
    other = synthetic_split("test", 3, ["color"])
    assert other == tmp_path / "synth" / "test-n3-0123456789ab" and len(rows_of(other / "color.jsonl")) == 3
    assert (folder / "color.jsonl").stat().st_mtime_ns == stamp


def test_the_fingerprint_follows_the_generator_source_and_fonts(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from internvl.synth import fingerprint, render

    inputs = fingerprint.generator_inputs()
    assert inputs["fonts"][0] == {"file": fingerprint.BUNDLED} and len(inputs["source"]) == 16
    package = Path(render.__file__).parent
    for f in package.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    assert fingerprint.generator_inputs(tmp_path) == inputs  # the same bytes, the same hash
    with open(tmp_path / "render.py", "a") as f:
        f.write("# one more line\n")
    assert fingerprint.generator_inputs(tmp_path)["source"] != inputs["source"]
    monkeypatch.setattr(render, "font_files", lambda: (None,))  # another font list
    assert fingerprint.generator_inputs()["fonts"] == [{"file": fingerprint.BUNDLED}]


def test_synth_table_is_markdown(split, tmp_path):
    def answer(prompt):
        return "0" if "What is" in prompt else "A"

    task = SyntheticTask(split, ["text", "mc"], circular="off", limit=4)
    table = synth_table(evaluate(FakeModel(answer), task, tmp_path, progress=False))
    lines = table.splitlines()
    assert lines[0] == "| task | n | accuracy (%) | target (%) |" and lines[1] == "|---|---:|---:|---:|"
    assert lines[2].startswith("| text | 4 | ") and lines[3].startswith("| mc | 4 | ") and lines[-1].startswith("| **mean** | 8 |")


# ---- 4. bad input: one line naming the file, row or column -------------------------------------------------------


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "nowhere.tsv: no such file"),
        ("no_question", "column 'question': missing required column"),
        ("no_answer", "column 'answer': missing"),
        ("bad_answer", "index 0, column 'answer': 'E' is not one of the options"),
        ("unknown_task", "unknown synthetic task(s) 'colour'"),
        ("no_data", "nothing to evaluate"),
        ("no_model", "nomodel: no such model folder"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, case, message):
    image = ImageSource.from_image(Image.new("RGB", (8, 8))).data
    args = {
        "missing": ["--data", str(tmp_path / "nowhere.tsv")],
        "no_question": ["--data", str(write_tsv(tmp_path / "a.tsv", ["index", "A", "answer", "image"], [[0, "x", "A", image]]))],
        "no_answer": ["--data", str(write_tsv(tmp_path / "b.tsv", ["index", "question", "A", "image"], [[0, "q", "x", image]]))],
        "bad_answer": ["--data", str(write_tsv(tmp_path / "c.tsv", ["index", "question", "A", "B", "answer", "image"],
                                               [[0, "q", "x", "y", "E", image]]))],
        "unknown_task": ["synthetic", "--tasks", "color,colour", "--data-dir", str(tmp_path)],
        "no_data": [],
        "no_model": [str(tmp_path / "nomodel"), "--data", str(write_tsv(tmp_path / "d.tsv", ["index", "question", "A", "B", "answer", "image"],
                                                                  [[0, "q", "x", "y", "A", image]]))],
    }[case]  # fmt: skip
    assert cli(["eval", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("internvl eval: error: ") and message in err[0], err
    if case in ("no_question", "no_answer"):
        assert str(tmp_path) in err[0]


def test_bad_input_from_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "internvl", "eval", "--data", str(tmp_path / "x.tsv")],
                          check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "x.tsv: no such file" in proc.stderr


def test_ctrl_c_leaves_a_valid_partial_file_and_resume_finishes_it(split, models, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "internvl", "eval", str(models["counting"]), "--data", str(split / "mc.tsv"),
           "--circular", "on", "--max-new-tokens", "400", "--batch-size", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the tiny model answers all 24 rows within the poll's 50 ms once it starts, so the run would end before
    # the Ctrl-C: every engine step sleeps 20 ms here (the launcher patches Engine.step, then runs the CLI)
    launcher = ("import sys, time\nfrom internvl.engine.engine import Engine\nstep = Engine.step\n"
                "Engine.step = lambda self, *a, **k: (time.sleep(0.02), step(self, *a, **k))[1]\n"
                "from internvl.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    # an ignored SIGINT is inherited through exec, and something earlier in the suite leaves pytest ignoring it
    # (seen in the full run only): the child starts with the default disposition, as from a shell
    proc = subprocess.Popen([sys.executable, "-c", launcher, *cmd[3:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    preds, deadline = out / "predictions.jsonl", time.monotonic() + 60
    while not (preds.exists() and preds.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "no predictions within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "add --resume to continue" in err, err
    partial = rows_of(preds)  # every line parses
    assert 2 <= len(partial) < 24 and not (out / "summary.json").exists()
    assert cli(cmd[3:] + ["--resume"]) == 0
    keys = [r["key"] for r in rows_of(preds)]
    assert len(keys) == len(set(keys)) == 24 and json.loads((out / "summary.json").read_text())["n"] == 6


def test_resume_refuses_a_file_that_is_not_predictions(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"key": "a", "prediction": "x"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(DataError, match="line 2: not a prediction row"):
        read_predictions(path)


def test_hexagon_split_reports_items_about_the_hexagon_apart(tmp_path):
    from internvl.eval.synthetic import SyntheticTask, synth_table
    from internvl.synth import generate_split

    generate_split(tmp_path, "test", n=6, tasks=["color", "count"], hexagon=True)
    task = SyntheticTask(tmp_path, tasks=["color", "count"])
    # right answers exactly on the items about the hexagon, wrong ones elsewhere
    flag = {ex.key: ex.ref.ref["meta"]["hexagon"] for ex in task.examples}  # the row behind each question
    preds = {ex.key: ex.info["gold"] if flag[ex.key] else "zzz" for ex in task.examples}
    flags = list(flag.values())
    summary = task.summarize(preds)
    assert summary["hexagon"] == {"n": sum(flags), "accuracy": 1.0}
    assert summary["other"] == {"n": len(flags) - sum(flags), "accuracy": 0.0}
    assert "items about the hexagon" in synth_table(summary)
