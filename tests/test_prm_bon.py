"""Best-of-N: the pick follows the scores (mock scorer, tiny random policy), majority vote, the per-method accuracy of
a run on a synthetic split with scripted answers, and the `bon` / `prm-bench` verbs end to end on a tiny model."""

from __future__ import annotations

import pytest
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.cli.main import main as cli
from internvl.errors import DataError
from internvl.eval.synthetic import SyntheticTask
from internvl.prm import best_of, select
from internvl.prm.select import BonOptions, best_index, bon_table, majority_index, run_bon
from internvl.synth import generate_split


class MockPRM:
    """Step scores from a function of the text (the whole answer as one step when `orm`)."""

    def __init__(self, steps_of):
        self.steps_of, self.calls = steps_of, []

    def score_steps(self, question, solutions, images=None, max_num=None, orm=False):
        self.calls.append((question, list(solutions), images, orm))
        return [self.steps_of(s, orm) for s in solutions]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    import internvl

    folder = tmp_path_factory.mktemp("bon")
    Image.new("RGB", (64, 56), "blue").save(folder / "b.png")
    return internvl.load(tiny_checkpoint(folder / "model")), str(folder / "b.png"), folder / "model"


def test_pick_and_vote_rules():
    assert best_index([0.1, 0.7, 0.3]) == 1 and best_index([0.5, 0.9, 0.9]) == 1  # ties: the earliest
    assert majority_index(["2", "3", "3", None, "2"]) == 0  # 2 and 3 tie: the answer seen first
    assert majority_index([None, "4", "5", "5"]) == 2 and majority_index([None, None]) == 0
    with pytest.raises(DataError):
        best_index([])
    with pytest.raises(DataError, match="unknown aggregation 'max'"):
        BonOptions(aggregate="max")


def test_best_of_keeps_what_the_scores_say(policy):
    model, image, _ = policy
    score = {}

    def steps_of(text, orm):
        score.setdefault(text, [len(text) % 7 / 7, (len(text) * 3) % 5 / 5])
        return score[text]

    prm = MockPRM(steps_of)
    got = best_of(model, prm, "What color is it?", image, n=4, seed=3, max_new_tokens=6, temperature=1.0)
    assert got.candidates == model.samples("What color is it?", image, n=4, seed=3, max_new_tokens=6,
                                           temperature=1.0, top_k=50)  # seeded: the same four  # fmt: skip
    means = [sum(score[c]) / 2 for c in got.candidates]
    assert got.scores == means and got.answer == got.candidates[best_index(means)]
    assert prm.calls == [("What color is it?", got.candidates, image, False)]
    by_min = best_of(model, prm, "What color is it?", image, n=4, seed=3, max_new_tokens=6, temperature=1.0,
                     aggregate_by="min")  # fmt: skip
    assert by_min.answer == got.candidates[best_index([min(score[c]) for c in got.candidates])]


def test_run_on_a_split_with_scripted_answers(tmp_path, monkeypatch):
    """Greedy wrong, samples [wrong, right, wrong]: majority keeps the wrong answer, the PRM the right one, the ORM
    (scripted to prefer a wrong one) a wrong one."""
    generate_split(str(tmp_path), "test", n=2, tasks=["reasoning", "count"])
    task = SyntheticTask(tmp_path, "reasoning,count", limit=2)
    right, wrong = {}, {}
    for part in task.parts.values():
        for ex in part.examples:
            gold = ex.ref["conversations"][1]["value"]
            right[ex.key] = gold
            m = ex.ref["meta"]
            wrong[ex.key] = (gold.replace(f"= {m['d']}.\nAnswer: {m['d']}", f"= {m['d'] + 1}.\nAnswer: {m['d'] + 1}")
                             if "d" in m else str((int(gold) + 1) % 10))  # fmt: skip
    monkeypatch.setattr(select, "generate", lambda policy, examples, o: [
        (wrong[ex.key], [wrong[ex.key], right[ex.key], wrong[ex.key]]) for ex in examples])  # fmt: skip
    good = set(right.values())
    prm = MockPRM(lambda text, orm: ([0.8] if orm else [0.9, 0.8, 0.7]) if text in good else
                  ([0.3] if orm else [0.9, 0.3, 0.2]))  # fmt: skip
    orm = MockPRM(lambda text, orm: [0.1] if text in good else [0.6])
    s = run_bon(None, prm, orm, task, BonOptions(n=3))
    for name in ("reasoning", "count"):
        acc = s["tasks"][name]["accuracy"]
        assert acc["greedy"] == 0 and acc["majority"] == 0 and acc["orm"] == 0
        assert acc["prm"] == 1 and acc["pass"] == 1 and acc["sample"] == pytest.approx(1 / 3)
        assert all(acc[f"prm_{a}"] == 1 for a in ("mean", "sum", "min", "last"))
    assert all(orm_call[3] for orm_call in orm.calls) and not any(c[3] for c in prm.calls)
    table = bon_table(s)
    assert "| majority@3 | ORM-BoN@3 | PRM-BoN@3 (mean) | pass@3 |" in table
    assert "| reasoning | 2 | 0.0 | 33.3 | 0.0 | 0.0 | 100.0 | 100.0 |" in table
    # no ORM model: the PRM reads the whole answer as one step
    s2 = run_bon(None, prm, None, task, BonOptions(n=3))
    assert s2["tasks"]["count"]["accuracy"]["orm"] == 1 and prm.calls[-1][3]


def test_generate_is_seeded_and_greedy_first(policy, tmp_path):
    model, _, _ = policy
    generate_split(str(tmp_path), "test", n=1, tasks=["count"])
    examples = SyntheticTask(tmp_path, "count").parts["count"].examples
    o = BonOptions(n=2, max_new_tokens=4, temperature=1.0, batch_size=2)
    (greedy, samples), = select.generate(model, examples, o)
    assert len(samples) == 2 and select.generate(model, examples, o) == [(greedy, samples)]
    assert greedy == model.chat(examples[0].prompt, examples[0].images, max_new_tokens=4)


def test_verbs_end_to_end(policy, tmp_path, capsys):
    _, image, folder = policy
    assert cli(["bon", str(folder), "--prm", str(folder)]) == 1
    assert "give --data SPLIT (a synthetic split) or -p QUESTION" in capsys.readouterr().err
    args = ["bon", str(folder), "--prm", str(folder), "-p", "What color?", "-i", image, "--n", "3",
            "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    assert cli(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and float(lines[0].split()[0]) >= float(lines[2].split()[0])  # best first
    split = tmp_path / "split"
    generate_split(str(split), "test", n=1, tasks=["reasoning"])
    assert cli(["prm-data", str(split), "--out", str(tmp_path / "p"), "--tasks", "reasoning"]) == 0
    out = tmp_path / "m.json"
    assert cli(["prm-bench", str(folder), "--data", str(tmp_path / "p" / "meta.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| kind | solutions | steps | macro F1 |" in printed and "| **all** | 4 | 12 |" in printed
    assert out.is_file()
    assert cli(["prm-bench", str(folder), "--data", str(tmp_path / "p" / "meta.json"), "--threshold", "2"]) == 1
