"""PRM step labels from the synthetic world (hand-made cases), the rows `internvl prm-data` writes and the fine-tuning
reader accepts, and the VisualProcessBench-style step metrics on hand-made scores."""

from __future__ import annotations

import json
import random

import pytest

from internvl.cli.main import main as cli
from internvl.errors import DataError
from internvl.prm.bench import class_f1, parse_row, read_rows, step_metrics
from internvl.prm.data import count_solution, labels_from, reasoning_solution, solutions_for, write_prm_set
from internvl.prm.prompt import PRM_SYSTEM_PROMPT
from internvl.synth import generate_split
from internvl.train.data import build_index, check_row, read_meta


def facts(sol):
    return sol.steps, sol.labels


def test_labels_spread_from_the_first_wrong_step():
    assert labels_from(3, None) == [True, True, True]
    assert labels_from(3, 0) == [False, False, False]
    assert labels_from(3, 1) == [True, False, False] and labels_from(4, 3) == [True, True, True, False]


@pytest.mark.parametrize("seed", range(6))
def test_reasoning_solutions_hand_made(seed):
    rng = random.Random(seed)
    assert facts(reasoning_solution("correct", 5, 2, "circle", "square", rng)) == (
        ["There are 5 circles and 2 squares.", "5 - 2 = 3.", "Answer: 3"], [True, True, True])  # fmt: skip
    steps, labels = facts(reasoning_solution("count", 5, 2, "circle", "square", rng))
    assert labels == [False, False, False]
    assert steps[0] in ("There are 4 circles and 2 squares.", "There are 6 circles and 2 squares.",
                        "There are 5 circles and 1 square.", "There are 5 circles and 3 squares.")  # fmt: skip
    a, b = (int(w) for w in steps[0].split() if w.isdigit())
    assert steps[1:] == [f"{a} - {b} = {a - b}.", f"Answer: {a - b}"]  # the rest follows the miscount
    steps, labels = facts(reasoning_solution("arith", 5, 2, "circle", "square", rng))
    d = int(steps[2].removeprefix("Answer: "))
    assert labels == [True, False, False] and d in (1, 2, 4, 5) and steps[:2] == ["There are 5 circles and 2 squares.",
                                                                                   f"5 - 2 = {d}."]  # fmt: skip
    steps, labels = facts(reasoning_solution("answer", 5, 2, "circle", "square", rng))
    assert labels == [True, True, False] and steps[1] == "5 - 2 = 3." and steps[2] in (
        "Answer: 1", "Answer: 2", "Answer: 4", "Answer: 5")  # fmt: skip


def test_edge_counts_stay_valid():
    rng = random.Random(0)
    # one shape and none of the other: singular, a zero count, no negative miscount or difference
    assert reasoning_solution("correct", 1, 0, "star", "circle", rng).steps == [
        "There is 1 star and 0 circles.", "1 - 0 = 1.", "Answer: 1"]  # fmt: skip
    for _ in range(20):
        miscount = reasoning_solution("count", 1, 0, "star", "circle", rng).steps[0]
        assert miscount == "There are 2 stars and 0 circles."  # 0 stars would not be "more"; -1 circles is no count
        assert int(reasoning_solution("arith", 1, 0, "star", "circle", rng).steps[2][-1]) in (0, 2, 3)
        assert count_solution("count", 0, rng).steps[0] in ("1", "2")
        assert count_solution("count", 9, rng).steps[0] in ("7", "8")
    assert facts(count_solution("correct", 4, rng)) == (["4"], [True])


def test_rows_of_a_split(tmp_path):
    split = tmp_path / "split"
    generate_split(str(split), "test", n=2, tasks=["reasoning", "count", "color"])
    out = tmp_path / "prm"
    s = write_prm_set(str(split), str(out))
    # 2 reasoning rows x 4 kinds (3 steps), 2 count rows x 2 (1 step)
    assert s["rows"] == 12 and s["plus"] + s["minus"] == 8 * 3 + 4
    assert s["plus"] == 2 * (3 + 0 + 1 + 2) + 2 and s["by_kind"]["reasoning/arith"] == 2
    specs = read_meta(out / "meta.json")
    index = build_index(specs)
    assert len(index) == 12
    rows = [json.loads(line) for line in (out / "prm.jsonl").read_text().splitlines()]
    gold = [json.loads(line) for line in (split / "reasoning.jsonl").read_text().splitlines()]
    for row in rows:
        assert check_row(row, specs[0].root) is None  # the fine-tuning reader takes it, image file included
        assert row["conversations"][0] == {"from": "system", "value": PRM_SYSTEM_PROMPT}
    first = rows[0]
    question, steps, labels = parse_row(first)
    assert first["id"] == "reasoning_000000_correct" and first["image"] == gold[0]["image"]
    assert question == gold[0]["conversations"][0]["value"] and question.startswith("<image>\n")
    assert "\n".join(steps[:2]).replace(".\n", ". ", 1) + "\n" + steps[2] == gold[0]["conversations"][1]["value"]
    assert labels == [True, True, True]
    # the same seed writes the same set; an ORM set has one turn per solution, labelled by its last step
    again = write_prm_set(str(split), str(tmp_path / "again"))
    assert again == s and (tmp_path / "again" / "prm.jsonl").read_text() == (out / "prm.jsonl").read_text()
    write_prm_set(str(split), str(tmp_path / "orm"), tasks=("reasoning",), orm=True, system_message="")
    orm = [json.loads(line) for line in (tmp_path / "orm" / "prm.jsonl").read_text().splitlines()]
    assert [len(r["conversations"]) for r in orm] == [3] * 8 and orm[0]["conversations"][0]["value"] == ""
    assert [r["conversations"][2]["value"] for r in orm[:4]] == ["+", "-", "-", "-"]
    assert read_rows(str(out / "meta.json"), limit=3)[2][1] == specs[0].root
    with pytest.raises(DataError, match="task 'color' has no step labels"):
        solutions_for(json.loads((split / "color.jsonl").read_text().splitlines()[0]), ("correct",))
    with pytest.raises(DataError, match="unknown or missing task/kind 'wrong'"):
        write_prm_set(str(split), str(out), kinds=("wrong",))


def test_prm_data_verb(tmp_path, capsys):
    split = tmp_path / "split"
    generate_split(str(split), "train", n=2, tasks=["reasoning"])
    assert cli(["prm-data", str(split), "--out", str(tmp_path / "p"), "--tasks", "reasoning", "--kinds",
                "correct,arith", "--system-message", ""]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "wrote 4 solutions (reasoning/correct 2, reasoning/arith 2) with 8 '+' and 4 '-' steps" in out
    assert "internvl finetune MODEL --data" in out
    assert cli(["prm-data", str(split), "--out", str(tmp_path / "q"), "--tasks", "count"]) == 1
    assert "count.jsonl: no such file" in capsys.readouterr().err


def test_parse_row_refuses_other_rows():
    with pytest.raises(DataError, match="row 3: not a PRM row"):
        parse_row({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "+"}]}, "row 3")


def test_step_metrics_on_hand_made_scores():
    labels = [[True, True, False], [True, False], [True]]
    scores = [[0.9, 0.4, 0.2], [0.8, 0.7], [0.6]]  # at 0.5: one correct step missed, one wrong step missed
    m = step_metrics(scores, labels, 0.5)
    # wrong steps: tp 1 (0.2), fp 1 (0.4), fn 1 (0.7) -> P = R = F1 = 1/2; correct: tp 3, fp 1, fn 1 -> 3/4
    assert m["wrong"] == {"n": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert m["correct"]["f1"] == pytest.approx(0.75) and m["macro_f1"] == pytest.approx(0.625)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["steps"] == 6 and m["solutions"] == 3
    assert m["first_error"] == pytest.approx(1 / 3)  # only the last solution's first error (none) is found
    assert step_metrics(scores, labels, 0.3)["wrong"]["recall"] == 0.5  # 0.2 only
    perfect = step_metrics([[0.9, 0.1], [0.99]], [[True, False], [True]])
    assert perfect["macro_f1"] == 1.0 and perfect["first_error"] == 1.0
    only_right = class_f1([True, True], [True, True], False)
    assert only_right["f1"] is None and step_metrics([[0.9]], [[True]])["macro_f1"] == 1.0
    with pytest.raises(DataError, match="differ in shape"):
        step_metrics([[0.5]], [[True, False]])
