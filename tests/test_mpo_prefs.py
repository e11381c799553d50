"""`build-prefs`: judging, correctness pairs, truncated-continuation (Dropout-NTP) negatives, the output read back
by the MPO data reader, resuming, file:line errors; and the verb end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
from datafiles import write_split
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.cli.main import main as cli
from internvl.errors import DataError
from internvl.mpo.data import build_pair_index
from internvl.mpo.prefs import (
    PrefOptions,
    Question,
    build_prefs,
    judge,
    read_questions,
    truncate,
    without_media,
)
from internvl.synth import generate_split
from internvl.train.data import read_meta


class StubSampler:
    """Scripted answers per question index; continuations from a function of (question, prefix)."""

    def __init__(self, answers: dict, continue_with, fail_after: int | None = None):
        self.script, self.continue_with, self.fail_after = answers, continue_with, fail_after
        self.asked, self.continued = [], []

    def answers(self, requests, o):
        if self.fail_after is not None and len({q.index for q, _ in self.asked}) >= self.fail_after:
            raise KeyboardInterrupt
        self.asked += requests
        count = {}
        out = []
        for q, _seed in requests:
            k = count[q.index] = count.get(q.index, -1) + 1
            out.append(self.script[q.index][k % len(self.script[q.index])])
        return out

    def continuations(self, requests, o):
        self.continued += [(q.index, without_media(q.text), prefix) for q, prefix, _ in requests]
        return [self.continue_with(q, prefix) for q, prefix, _ in requests]


@pytest.fixture(scope="module")
def reasoning(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reason")
    generate_split(str(folder), "train", n=3, tasks=["reasoning"])
    return folder / "meta.json"


def chain(q: Question, d: int) -> str:
    m = q.row["meta"]
    return f"There are {m['a']} {m['s1']}s and {m['b']} {m['s2']}s. {m['a']} - {m['b']} = {d}.\nAnswer: {d}"


def test_judging_rules():
    synth = Question(
        0, "f:1", "<image>\nq", "x\nAnswer: 3", "reasoning", {"meta": {"answer": "x\nAnswer: 3"}}
    )
    assert judge("blah\nAnswer: 3", synth) is True and judge("Answer: 4", synth) is False
    assert judge("no final line", synth) is False
    final = Question(1, "f:2", "q", "Because of A, the value is 7.\nFinal Answer: Seven.")
    assert judge("so... Final Answer: seven", final) is True and judge("Answer: six", final) is False
    assert judge("seven", final) is False  # no "Answer:" part to compare
    short = Question(2, "f:3", "q", "Blue.")
    assert judge("blue", short) is True and judge("dark blue", short) is False
    free = Question(3, "f:4", "q", " ".join(["word"] * 30))
    assert judge("anything", free) is None
    assert truncate("one two three four five", 0.5) == "one two" and truncate("one", 0.5) == ""
    assert without_media("Image-1: <image>\nImage-2: <image>\nWhich?") == "Which?"
    assert without_media("<image>\nHow many?") == "How many?"


def test_pairs_from_scripted_samples(reasoning, tmp_path):
    questions, _ = read_questions(str(reasoning))
    assert len(questions) == 3 and questions[0].images and questions[0].task == "reasoning"
    d = [q.row["meta"]["d"] for q in questions]
    script = {
        0: [chain(questions[0], d[0]), chain(questions[0], d[0] + 1), chain(questions[0], d[0] + 2),
            "I do not know", chain(questions[0], d[0])],  # 2 correct (1 distinct), 3 wrong
        1: [chain(questions[1], d[1])],  # all correct
        2: [chain(questions[2], d[2] + 5)],  # all wrong
    }  # fmt: skip
    # the continuation without the image gets the counts wrong for question 0, right for question 1
    cont = lambda q, prefix: (" 9 things. 0 - 9 = -9.\nAnswer: -9" if q.index == 0
                              else chain(q, d[1])[len(prefix):])  # fmt: skip
    stub = StubSampler(script, cont)
    o = PrefOptions(n=5, pairs_per_question=2, batch_size=5)
    summary = build_prefs(stub, str(reasoning), str(tmp_path / "out"), o, log=lambda _m: None)
    assert summary["questions"] == 3 and summary["sampled"] == 15 and summary["checkable"] == 3
    assert summary["correct"] == 2 + 5 and summary["correct_rate"] == pytest.approx(7 / 15, abs=1e-4)
    assert summary["all_correct"] == 1 and summary["all_wrong"] == 1
    assert summary["pairs"] == {"correctness": 2, "truncation": 1} and summary["with_pairs"] == 1

    rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in ("correctness", "truncation")}
    q0 = questions[0]
    for r in by_kind["correctness"]:
        assert r["chosen"] == chain(q0, d[0]) and judge(r["rejected"], q0) is False
        assert r["image"] == q0.row["image"] and r["question"] == q0.text and r["task"] == "reasoning"
    assert len({r["rejected"] for r in by_kind["correctness"]}) == 2  # distinct pairs
    (t,) = by_kind["truncation"]
    prefix = truncate(chain(q0, d[0]), 0.5)
    assert t["chosen"] == chain(q0, d[0]) and t["rejected"] == prefix + " 9 things. 0 - 9 = -9.\nAnswer: -9"
    # the continuations were asked without the image placeholder, from half of a correct answer's words
    assert [c[0] for c in stub.continued] == [0, 1] and all("<image>" not in c[1] for c in stub.continued)
    assert stub.continued[0][2] == prefix and len(prefix.split(" ")) == len(chain(q0, d[0]).split(" ")) // 2

    # the output is an MMPR meta the MPO reader accepts, with the images found through the relative root
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["prefs"]["root"] == "../../reason0" or meta["prefs"]["length"] == 3
    index = build_pair_index(read_meta(tmp_path / "out" / "meta.json"))
    assert len(index) == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["total_pairs"] == 3


def test_uncheckable_questions_always_keep_truncations(tmp_path):
    long_gold = (
        "The picture shows a quiet street with a red door, two windows and a small tree beside the house."
    )
    meta = write_split(tmp_path, [{"conversations": [{"from": "human", "value": "Describe it."},
                                                     {"from": "gpt", "value": long_gold}]}])  # fmt: skip
    stub = StubSampler(
        {0: ["a calm street with a red door and a tree", "a red door"]}, lambda q, p: " and a dragon."
    )
    o = PrefOptions(n=2, truncations_per_question=2, truncate_ratio=0.5)
    summary = build_prefs(stub, str(meta), str(tmp_path / "out"), o, log=lambda _m: None)
    assert summary["checkable"] == 0 and summary["correct_rate"] is None
    rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    # "a red door" has 3 words: cut to "a", continued; the 10-word answer to its first 5 words
    assert sorted(r["rejected"] for r in rows) == ["a and a dragon.", "a calm street with a and a dragon."]
    assert all(r["kind"] == "truncation" and "image" not in r for r in rows)


def test_interrupted_run_resumes_to_the_same_pairs(reasoning, tmp_path):
    questions, _ = read_questions(str(reasoning))
    script = {q.index: [chain(q, q.row["meta"]["d"]), chain(q, q.row["meta"]["d"] + 1)] for q in questions}
    cont = lambda q, p: " nothing.\nAnswer: 99"
    o = PrefOptions(n=2, batch_size=2)  # one question per chunk
    build_prefs(StubSampler(script, cont), str(reasoning), str(tmp_path / "a"), o, log=lambda _m: None)
    with pytest.raises(KeyboardInterrupt):
        build_prefs(StubSampler(script, cont, fail_after=2), str(reasoning), str(tmp_path / "b"), o)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["done"] == 2
    with pytest.raises(DataError, match="already exists; pass --resume"):
        build_prefs(StubSampler(script, cont), str(reasoning), str(tmp_path / "b"), o)
    with pytest.raises(DataError, match="cannot resume .*: n was 2, now 3"):
        build_prefs(
            StubSampler(script, cont), str(reasoning), str(tmp_path / "b"), PrefOptions(n=3), resume=True
        )
    stub = StubSampler(script, cont)
    build_prefs(stub, str(reasoning), str(tmp_path / "b"), o, resume=True, log=lambda _m: None)
    assert {q.index for q, _ in stub.asked} == {2}
    assert (tmp_path / "b" / "pairs.jsonl").read_text() == (tmp_path / "a" / "pairs.jsonl").read_text()
    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    assert a == b


def test_bad_rows_name_file_and_line(tmp_path):
    q = {"from": "human", "value": "What?"}
    meta = write_split(
        tmp_path, [{"conversations": [q, {"from": "gpt", "value": "x"}]}, {"conversations": [q]}]
    )
    with pytest.raises(DataError, match=r"train.jsonl:2: no assistant turn"):
        read_questions(str(meta))
    with pytest.raises(DataError, match="no questions of task"):
        read_questions(
            str(write_split(tmp_path / "t", [{"conversations": [q, q | {"from": "gpt"}]}])), ["count"]
        )


def test_verb_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "model", counting=True)
    Image.new("RGB", (64, 56), "red").save(tmp_path / "r.png")
    rows = [{"image": "r.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                  {"from": "gpt", "value": "red"}]},
            {"conversations": [{"from": "human", "value": "Count: 1 2 3"},
                               {"from": "gpt", "value": "The next are 4 5 6.\nAnswer: 4"}]}]  # fmt: skip
    meta = write_split(tmp_path, rows)
    args = ["build-prefs", str(model), "--data", str(meta), "--out", str(tmp_path / "prefs"), "--n", "3",
            "--max-new-tokens", "6", "--batch-size", "4"]  # fmt: skip
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "2 questions (2 checkable), 6 answers sampled" in out and "internvl mpo MODEL --data" in out
    summary = json.loads((tmp_path / "prefs" / "summary.json").read_text())
    assert summary["sampled"] == 6 and summary["questions"] == 2
    lines = (tmp_path / "prefs" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == summary["total_pairs"]
    if lines:
        build_pair_index(read_meta(tmp_path / "prefs" / "meta.json"))
    # the same seeds give the same samples
    assert cli([*args[:5], str(tmp_path / "again"), *args[6:]]) == 0
    assert (tmp_path / "again" / "pairs.jsonl").read_text() == (
        tmp_path / "prefs" / "pairs.jsonl"
    ).read_text()
    assert cli([*args[:3], str(tmp_path / "nowhere.json"), *args[4:]]) == 1
    assert "nowhere.json: no such meta file" in capsys.readouterr().err


def test_real_sampler_prompts(tmp_path):
    """Answers are asked with the image; continuations without it, from the prompt plus the encoded prefix (the
    counting model continues the prefix's last token with the next ids)."""
    import internvl
    from internvl.mpo.prefs import Sampler

    model = internvl.load(tiny_checkpoint(tmp_path / "model", counting=True))
    Image.new("RGB", (64, 56), "red").save(tmp_path / "r.png")
    q = Question(0, "f:1", "<image>\nColor?", "red", images=[str(tmp_path / "r.png")])
    seen = []
    generate = model.detok.generate
    model.detok.generate = lambda reqs: seen.append(reqs) or generate(reqs)
    o = PrefOptions(n=2, temperature=1e-4, max_new_tokens=3)
    sampler = Sampler(model)
    assert len(sampler.answers([(q, 1), (q, 2)], o)) == 2
    (a, b) = seen[0]
    ctx = model.tokenizer.image_context_id
    assert a[2] is not None and ctx in a[0] and a[0] == b[0] and a[1].seed == 1 and b[1].seed == 2
    (cont,) = sampler.continuations([(q, "yes no", 5)], o)
    (req,) = seen[1]
    prompt, _, _ = model.prepare("Color?")
    prefix_ids = model.tokenizer.encode("yes no", add_special_tokens=False)
    assert req[2] is None and ctx not in req[0] and req[0] == prompt + prefix_ids
    expected = model.tokenizer.decode([prefix_ids[-1] + k for k in (1, 2, 3)])
    assert cont == expected.rstrip()
