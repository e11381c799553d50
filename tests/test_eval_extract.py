"""Answer extraction, circular evaluation and answer metrics, on hand-made cases from VLMEvalKit's rules."""

import pytest

from internvl.errors import DataError
from internvl.eval.circular import (
    accuracy_table,
    circular_expand,
    circular_score,
    mcq_report,
    vanilla_score,
)
from internvl.eval.extract import can_infer_option, can_infer_text, extract_choice
from internvl.eval.items import EvalItem
from internvl.eval.metrics import anls, box_accuracy, exact_match, relaxed_accuracy

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"),
    ("The answer is B", "B"),
    ("(C)", "C"),
    ("C.", "C"),
    ("[D]", "D"),
    ("**A**", "A"),
    ("Answer: B.", "B"),
    ("B B", "B"),  # one distinct letter, repeated
])
def test_letter_is_found(answer, letter):
    assert extract_choice(answer, CHOICES) == letter


def test_letter_must_start_in_last_four_tokens():
    assert can_infer_option("so the answer is B", CHOICES) == "B"  # index 4 of 5 tokens
    assert can_infer_option("B is right because it barks", CHOICES) is None  # index 0 of 5 tokens
    # The first occurrence decides, even if the letter is repeated at the end.
    assert can_infer_option("B is right because it barks so B", CHOICES) is None


def test_several_letters_infer_nothing():
    assert can_infer_option("A or B", CHOICES) is None
    assert extract_choice("Either C or D", CHOICES) is None


def test_letters_inside_words_and_lowercase_do_not_count():
    assert can_infer_option("Bear", CHOICES) is None
    assert can_infer_option("I'm sure", CHOICES) is None
    assert can_infer_option("b", CHOICES) is None
    # "A" as an article is a whole token: VLMEvalKit takes it (it only logs a warning under VERBOSE).
    assert can_infer_option("A", CHOICES) == "A"


def test_refusals_and_z():
    assert extract_choice("Cannot determine the answer from the image", CHOICES) == "Z"
    assert extract_choice("I'm sorry, but without the image provided I can't say", CHOICES) == "Z"
    assert extract_choice("Z", CHOICES) == "Z"
    # Not one of VLMEvalKit's refusal strings, and no letter or option text: nothing is inferred.
    assert extract_choice("I cannot answer", CHOICES) is None
    # API failures never infer, even with a letter present.
    assert can_infer_option("Failed to obtain answer via API. B", CHOICES) is None


def test_option_text_fallback():
    assert extract_choice("dog", CHOICES) == "B"
    assert extract_choice("It is a DOG", CHOICES) == "B"  # case-insensitive substring
    assert can_infer_text("a dog and a cat", CHOICES) is None  # two option texts
    # Longer than twice the total option text (2 * 14 chars): no text inference.
    assert can_infer_text("the animal in the picture is clearly a dog", CHOICES) is None


def test_letter_rule_wins_over_text():
    assert extract_choice("fish, so D", CHOICES) == "D"
    assert extract_choice("C", {"A": "C", "B": "x", "C": "y"}) == "C"


def _item(index, answer="B", category="cat1", split="dev", options=None, **kw):
    return EvalItem(index=index, question="Which animal?", options=dict(options or CHOICES), answer=answer,
                    category=category, split=split, **kw)


def test_circular_expand_rotations_and_indices():
    items = circular_expand([_item(7, answer="B")])
    assert [it.index for it in items] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert {it.g_index for it in items} == {7}
    first = items[1]  # k=1: the option at B moves to A (VLMEvalKit's CIRCULAR tool, deque.rotate(1))
    assert first.options == {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    assert first.answer == "A" and first.options[first.answer] == "dog"
    for it in items:
        assert it.options[it.answer] == "dog"
        assert list(it.options) == ["A", "B", "C", "D"]
    assert items[0].images is items[1].images  # shared, never copied


def test_circular_offset_grows_with_large_indices():
    items = circular_expand([_item(1_500_000, options={"A": "x", "B": "y"}, answer="A")])
    assert [it.index for it in items] == [1_500_000, 11_500_000]
    assert items[1].answer == "B"


def test_abnormal_questions_are_not_rotated():
    assert len(circular_expand([_item(3, options={"A": "1", "B": "2", "C": "A, B", "D": "x"}, answer="D")])) == 1
    assert len(circular_expand([_item(3, options={"A": "1"}, answer="A")])) == 1
    with pytest.raises(DataError, match="options A, C are not consecutive letters from A"):
        circular_expand([_item(3, options={"A": "1", "C": "2"}, answer="A")])


def test_circular_expand_rejects_string_index():
    with pytest.raises(DataError, match="'q1' is not an integer"):
        circular_expand([_item("q1")])


def _answers(items, picks):
    """One prediction per rotation: its correct letter where `picks` is True, another letter elsewhere."""
    wrong = [next(c for c in it.options if c != it.answer) for it in items]
    return [(it, it.answer if ok else w) for it, ok, w in zip(items, picks, wrong)]


def test_group_wrong_when_one_rotation_wrong():
    q1 = circular_expand([_item(1, category="x")])
    q2 = circular_expand([_item(2, category="y")])
    records = _answers(q1, [True, True, True, True]) + _answers(q2, [True, True, False, True])
    res = circular_score(records)
    assert [h.hit for h in res["hits"]] == [1, 0]
    assert "rotation 2" in res["hits"][1].log
    assert res["accuracy"] == 0.5
    assert res["table"] == {"Overall": {"dev": 0.5}, "x": {"dev": 1.0}, "y": {"dev": 0.0}}
    # Vanilla over the same predictions counts rows; mcq_report's vanilla counts only the originals.
    assert vanilla_score(records)["accuracy"] == 7 / 8
    report = mcq_report(records)
    assert report["vanilla"]["accuracy"] == 1.0 and report["circular"]["accuracy"] == 0.5


def test_group_wrong_when_a_rotation_is_unextractable():
    items = circular_expand([_item(1)])
    records = [(it, it.answer) for it in items]
    records[3] = (items[3], "I don't know")
    assert circular_score(records)["hits"][0].hit == 0


def test_group_index_from_index_when_absent():
    # A VLMEvalKit TSV without a g_index column: the group is index % 1e6.
    items = [_item(5), _item(1_000_005, answer="C")]
    assert circular_score([(items[0], "B"), (items[1], "C")])["hits"][0].hit == 1
    # Rotations without their unrotated question are ignored.
    assert circular_score([(items[1], "C")])["hits"] == []


def test_scoring_needs_an_answer():
    with pytest.raises(DataError, match="index 9: no answer"):
        vanilla_score([(_item(9, answer=None), "A")])


def test_accuracy_table_rows_and_mmbench_abbreviations():
    hits = vanilla_score([
        (_item(1, category="coarse_perception", l2_category="Perception"), "B"),
        (_item(2, category="logic_reasoning", l2_category="Reasoning", split="test"), "A"),
    ])["hits"]
    table = accuracy_table(hits)
    assert list(table) == ["Overall", "Perception", "Reasoning", "CP", "LR"]
    assert table["Overall"] == {"dev": 1.0, "test": 0.0}
    assert table["LR"] == {"test": 0.0}  # no dev questions in LR: the cell is left out


def test_exact_match_normalization():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("  New   York ", ["Boston", "new york"]) == 1.0
    assert exact_match("Paris, France", "paris") == 0.0


def test_relaxed_accuracy():
    assert relaxed_accuracy("10.4", "10") == 1.0  # 4% off
    assert relaxed_accuracy("10.6", "10") == 0.0  # 6% off
    assert relaxed_accuracy("12%", "0.12") == 1.0  # percent becomes a fraction
    assert relaxed_accuracy("12%", "12") == 0.0  # ... so it does not match a plain 12
    assert relaxed_accuracy("0", "0") == 1.0  # gold 0 falls back to string match
    assert relaxed_accuracy(" Yes ", "yes") == 1.0
    assert relaxed_accuracy("1,000", "1000") == 0.0  # not a float: exact string needed
    assert relaxed_accuracy("7", ["3", "7.2"]) == 1.0


def test_anls():
    assert anls("hello world", ["Hello  World"]) == 1.0
    assert anls("helo world", "hello world") == pytest.approx(1 - 1 / 11)
    assert anls("abcd", "abxy") == 0.5  # exactly at the threshold: kept, as VLMEvalKit does
    assert anls("abcde", "vwxyz") == 0.0
    assert anls("wrong", ["nothing like it", "wrung"]) == pytest.approx(0.8)
    assert anls("", "") == 1.0


def test_box_accuracy():
    gold = (10, 10, 50, 50)
    assert box_accuracy("<ref>cat</ref><box>[[10, 10, 50, 50]]</box>", gold) == 1.0
    assert box_accuracy("[30, 10, 70, 50]", gold) == 0.0  # IoU 1/3
    assert box_accuracy("[15, 10, 55, 50]", gold) == 1.0  # IoU 0.78
    assert box_accuracy("no box here", gold) == 0.0
    # InternVL's 0-1000 grid scaled to a 100x200 image: (100, 50, 500, 250) -> (10, 10, 50, 50).
    assert box_accuracy("<box>[[100, 50, 500, 250]]</box>", gold, image_size=(100, 200)) == 1.0
