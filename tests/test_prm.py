"""The process reward model: the VisualPRM prompt layout (golden strings), steps, the step score read from the `+`/`-`
logits in one pass (against one forward per step, the reference's first scorer), and the training rows' tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.errors import InternVLError
from internvl.prm import PRM, PRM_SYSTEM_PROMPT, aggregate, split_steps
from internvl.prm.prompt import answer_slots, prm_text, step_turns
from internvl.prm.score import plus_probability

Q = "<image>\nHow many more circles than squares are there? Think step by step."
CHAIN = "There are 3 circles and 1 square. 3 - 1 = 2.\nAnswer: 2"
STEPS = ["There are 3 circles and 1 square.", "3 - 1 = 2.", "Answer: 2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import internvl

    folder = tmp_path_factory.mktemp("prm")
    Image.new("RGB", (64, 56), "red").save(folder / "r.png")
    return internvl.load(tiny_checkpoint(folder / "model")), str(folder / "r.png")


def test_system_prompt_is_the_reference_text():
    lines = PRM_SYSTEM_PROMPT.split("\n")
    assert lines[0].startswith("You are an advanced AI assistant, designed to serve as a process supervision model. ")
    assert lines[0].endswith("Your role is to assess whether the solution process is correct up to the current step.")
    assert '- Respond with **"+"** if you believe the solution process is correct up to this step.' in lines
    assert '- Respond with **"-"** if you detect any issues or errors in the process up to this step.' in lines
    assert lines[-1] == "Your task is to verify the accuracy and correctness of each step in the given solution process."
    assert len(lines) == 14 and len(PRM_SYSTEM_PROMPT) == 945


def test_prompt_layout_golden_internvl2_5():
    expected = (
        "<|im_start|>system\n" + PRM_SYSTEM_PROMPT + "<|im_end|>\n"
        "<|im_start|>user\n### Question:\n<image>\nHow many more circles than squares are there? Think step by step."
        "\n\n### Solution Process:\nThere are 3 circles and 1 square.<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
        "<|im_start|>user\n3 - 1 = 2.<|im_end|>\n"
        "<|im_start|>assistant\n+<|im_end|>\n"
        "<|im_start|>user\nAnswer: 2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prm_text("internvl2_5", Q, STEPS) == expected
    # the reference scorer prepends <image>\n to a question without one; no system prompt: no system block
    bare = Q.removeprefix("<image>\n")
    assert prm_text("internvl2_5", bare, ["7"], system_message="") == (
        "<|im_start|>user\n### Question:\n<image>\n" + bare + "\n\n### Solution Process:\n7<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert step_turns(bare, ["7"], image=False) == ["### Question:\n" + bare + "\n\n### Solution Process:\n7"]


def test_split_steps():
    assert split_steps(CHAIN) == STEPS
    assert split_steps("First.\n\nSecond line. Still second.\n\nThird") == [
        "First.", "Second line. Still second.", "Third"]  # fmt: skip
    # the reference's max_steps: groups of ceil(5 / 2) = 3 paragraphs, their text kept as written
    assert split_steps("a\n\nb\n\nc\n\nd\n\ne", max_steps=2) == ["a\n\nb\n\nc", "d\n\ne"]
    assert split_steps("3.5 is the value") == ["3.5 is the value"]
    assert split_steps("  7 ") == ["7"] and split_steps("") == [""]


def test_step_score_is_the_two_way_softmax():
    logits = torch.full((2, 10), -5.0)
    logits[0, 3], logits[0, 4] = 2.0, 0.0  # + = 3, - = 4
    logits[1, 3], logits[1, 4], logits[1, 7] = -1.0, 1.0, 50.0  # another token's logit does not matter
    p = plus_probability(logits, 3, 4)
    assert torch.allclose(p, torch.tensor([1 / (1 + torch.e**-2), 1 / (1 + torch.e**2)]))
    assert aggregate([0.2, 0.8, 0.5], "mean") == pytest.approx(0.5) and aggregate([0.2, 0.8], "sum") == 1.0
    assert aggregate([0.2, 0.8], "min") == 0.2 and aggregate([0.2, 0.8], "last") == 0.8
    with pytest.raises(InternVLError, match="unknown aggregation 'max'"):
        aggregate([0.1], "max")


def test_one_pass_matches_one_forward_per_step(tiny):
    """The reference's first scorer rebuilds the conversation for each step (earlier steps answered `+`) and reads
    the last position; the single pass over padded candidates must give the same p(+) at every step."""
    model, image = tiny
    prm = PRM(model)
    solutions = [STEPS, ["There are 4 circles and 1 square.", "4 - 1 = 3."], ["9"]]
    got = prm.score_steps(Q, solutions, image)
    tok = model.tokenizer
    plus, minus = tok.token_to_id("+"), tok.token_to_id("-")
    for steps, scores in zip(solutions, got):
        turns = step_turns(Q, steps)
        assert len(scores) == len(steps)
        for k in range(len(steps)):
            ids, pv, _ = model.prepare(turns[k], image, history=[(t, "+") for t in turns[:k]],
                                       system_message=PRM_SYSTEM_PROMPT)  # fmt: skip
            with torch.no_grad():
                last = model.model(torch.tensor([ids]), pixel_values=pv).logits[0, -1]
            want = torch.softmax(last[[plus, minus]].float(), -1)[0].item()
            assert scores[k] == pytest.approx(want, abs=1e-5)
    assert prm.score([Q][0], ["9"], image, orm=True) == pytest.approx(got[2])  # a one-step answer reads alike


def test_answer_slots_sit_before_each_plus(tiny):
    model, image = tiny
    prm = PRM(model, system_message="")
    ids, _, slots = prm.inputs(Q, STEPS, image)
    plus = model.tokenizer.token_to_id("+")
    assert len(slots) == 3 and slots[-1] == len(ids) - 1
    assert [ids[s + 1] for s in slots[:-1]] == [plus, plus]
    for s in slots[:-1]:
        assert model.tokenizer.decode(ids[: s + 1]).endswith("<|im_start|>assistant\n")
        assert model.tokenizer.decode(ids[s + 1 : s + 3]) == "+<|im_end|>"
    # a `+` inside a step is no answer slot
    _, _, inner = prm.inputs(Q, ["1 + 1 = 2.", "Answer: 2"], image)
    assert len(inner) == 2
    assert answer_slots([5, 6], "internvl2_5", model.tokenizer.encode) == [1]


def test_training_rows_tokenize_as_the_scoring_prompt(tiny):
    """`internvl finetune` on a PRM row sees the scoring prompt's tokens, and learns `+`/`-` where p(+) is read."""
    from internvl.prm.data import Solution, prm_row
    from internvl.train.tokenize import IGNORE, tokenize_conversation

    model, _ = tiny
    sol = Solution(STEPS, [True, False, False], "arith", CHAIN)
    row = prm_row("x", None, Q.removeprefix("<image>\n"), sol)
    turns = [(t["from"], t["value"]) for t in row["conversations"]]
    assert turns[0] == ("system", PRM_SYSTEM_PROMPT) and [a for r, a in turns if r == "gpt"] == ["+", "-", "-"]
    ids, labels = tokenize_conversation(turns, model.tokenizer, "internvl2_5")
    prm = PRM(model)
    scoring, _, slots = prm.inputs(Q.removeprefix("<image>\n"), STEPS, None)
    all_plus = prm_row("x", None, Q.removeprefix("<image>\n"), Solution(STEPS, [True] * 3, "correct", CHAIN))
    plus_ids, _ = tokenize_conversation([(t["from"], t["value"]) for t in all_plus["conversations"]],
                                        model.tokenizer, "internvl2_5")  # fmt: skip
    assert plus_ids[: len(scoring)] == scoring and len(ids) == len(plus_ids)
    tok = model.tokenizer
    learned = [i - 1 for i, y in enumerate(labels) if y != IGNORE and y in (tok.token_to_id("+"), tok.token_to_id("-"))]
    assert learned == slots


def test_a_tokenizer_without_plus_is_refused(tiny):
    model, _ = tiny

    class NoPlus:
        def require(self, token):
            from internvl.errors import TokenizerError

            raise TokenizerError(f"tok: the tokenizer has no token {token!r}")

    fake = type("M", (), {"tokenizer": NoPlus(), "template": model.template})()
    with pytest.raises(InternVLError, match="has no token '\\+'"):
        PRM(fake)
