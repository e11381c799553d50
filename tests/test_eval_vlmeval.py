"""Fidelity to VLMEvalKit on the inputs its users have: MMBench files that already hold the rotated copies, the
rotation rule of its CIRCULAR tool, chained image references, number-only option columns, relative image
paths, the current `can_infer_option` and the InternVL wrapper's tile budget. Every expected number below is
worked out by hand from those rules (vlmeval/tools.py, dataset/image_base.py, dataset/image_mcq.py,
dataset/utils/multiple_choice.py, utils/matching_util.py, vlm/internvl/internvl_chat.py)."""

from __future__ import annotations

import base64
import io
import json
import re
from types import SimpleNamespace

import pytest
from PIL import Image

from internvl.errors import DataError
from internvl.eval import evaluate, tsv_task
from internvl.eval.circular import circular_expand
from internvl.eval.extract import extract_choice
from internvl.eval.items import EvalItem
from internvl.eval.prompts import build_mcq_prompt
from internvl.eval.tsv import read_tsv
from internvl.processing.inputs import tiles_per_image


def png_b64(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


RED, BLUE = png_b64((255, 0, 0)), png_b64((0, 0, 255))


def write(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


class Fake:
    """A model whose answer is `reply(prompt, images)`; records what it was asked and the tile caps used."""

    path = "fake"

    def __init__(self, reply):
        self.asked, self.caps, self.reply = [], [], reply
        self.detok = SimpleNamespace(add=self._add, step=self._step, abort=lambda seq: None, waiting=[])

    def prepare(self, prompt, images, max_num=None):
        self.caps.append((len(images), max_num))
        return (prompt, images), None, prompt

    def _add(self, request, params, pixel_values):
        prompt, images = request
        self.asked.append(prompt)
        seq = SimpleNamespace(request_id=len(self.asked), text=self.reply(prompt, images))
        self.detok.waiting.append(seq)
        return seq

    def _step(self):
        done, self.detok.waiting = self.detok.waiting, []
        return [SimpleNamespace(seq=s, finished=True, output=s.text) for s in done]


def options_of(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z])\. (.*)$", prompt, re.MULTILINE))


# ---- an MMBench file as VLMEvalKit ships it: rotated copies already in it -----------------------------------

HEADER = ["index", "question", "A", "B", "C", "D", "answer", "category", "image"]
# Three questions, written out by hand as the CIRCULAR tool writes them (its k-th `deque.rotate(1)` moves the
# option at letter j to letter j - k; a rotated row's image is its question's index):
#   1: cat/dog/bird/fish, answer B        -> rotations 1..3 at 1000001, 2000001, 3000001
#   2: red/green/blue, answer C, image "1" (a reference, as MMBench dedups images) -> 1000002, 2000002,
#      whose image "2" is a reference to a reference
#   3: an option naming two letters ("A and B"): the tool keeps it once, unrotated
PRE_ROTATED = [
    [1, "Which animal?", "cat", "dog", "bird", "fish", "B", "animals", RED],
    [2, "Which color?", "red", "green", "blue", "", "C", "colors", "1"],
    [3, "Is it so?", "yes", "no", "A and B", "", "A", "logic", BLUE],
    [1000001, "Which animal?", "dog", "bird", "fish", "cat", "A", "animals", "1"],
    [2000001, "Which animal?", "bird", "fish", "cat", "dog", "D", "animals", "1"],
    [3000001, "Which animal?", "fish", "cat", "dog", "bird", "C", "animals", "1"],
    [1000002, "Which color?", "green", "blue", "red", "", "B", "colors", "2"],
    [2000002, "Which color?", "blue", "red", "green", "", "A", "colors", "2"],
]


def pre_rotated(tmp_path, name="MMBench_DEV_EN_toy", g_index=False):
    header, rows = HEADER, PRE_ROTATED
    if g_index:  # the tool's own output carries g_index; MMBench's files leave it to index % 1e6
        header = HEADER + ["g_index"]
        rows = [r + [r[0] % 1_000_000] for r in PRE_ROTATED]
    return write(tmp_path / f"{name}.tsv", header, rows)


def picks(prompt, images):
    """Names the option 'dog', 'blue' or 'yes'; misses question 2's rotation where blue is option A."""
    opts = options_of(prompt)
    if opts.get("A") == "blue":
        return "B"
    return next(letter for letter, text in opts.items() if text in ("dog", "blue", "yes"))


@pytest.mark.parametrize("g_index", [False, True])
def test_pre_rotated_mmbench_file_is_asked_once_per_row_and_grouped_by_index_mod_1e6(tmp_path, g_index):
    task = tsv_task(pre_rotated(tmp_path, g_index=g_index))
    assert task.circular and len(task.examples) == 8  # the 8 rows as they are, not rotated again
    assert [ex.info["g_index"] for ex in task.examples] == [1, 2, 3, 1, 1, 1, 2, 2]
    assert [ex.info["rotation"] for ex in task.examples] == [0, 0, 0, 1, 2, 3, 1, 2]
    fake = Fake(picks)
    summary = evaluate(fake, task, tmp_path / "out", progress=False)
    assert len(fake.asked) == 8
    # groups: 1 right in all 4 rows, 2 wrong in row 2000002, 3 right in its single row -> 2 of 3
    assert summary["circular"]["n"] == 3 and summary["circular"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["vanilla"]["n"] == 3 and summary["vanilla"]["accuracy"] == 1.0  # the unrotated rows
    assert summary["circular"]["categories"]["colors"] == {"n": 1, "accuracy": 0.0}


def test_limit_on_a_pre_rotated_file_takes_whole_questions(tmp_path):
    task = tsv_task(pre_rotated(tmp_path), limit=2)
    assert sorted(int(ex.key) for ex in task.examples) == [1, 2, 1000001, 1000002, 2000001, 2000002, 3000001]


def test_rotation_rule_is_the_circular_tools(tmp_path):
    """Expanding the three plain questions here gives exactly the tool's rows above."""
    plain = write(tmp_path / "plain.tsv", HEADER, PRE_ROTATED[:3])
    expanded = circular_expand(read_tsv(plain))
    got = sorted((it.index, it.options, it.answer, it.g_index) for it in expanded)
    want = sorted((r[0], {k: v for k, v in zip("ABCD", r[2:6]) if v}, r[6], r[0] % 1_000_000)
                  for r in PRE_ROTATED)  # fmt: skip
    assert got == want
    # a task over a plain file with a circular name rotates it itself
    (tmp_path / "CCBench_toy.tsv").write_bytes(plain.read_bytes())
    assert len(tsv_task(tmp_path / "CCBench_toy.tsv").examples) == 8


@pytest.mark.parametrize(
    "options, rotations",
    [
        ({"A": "1", "B": "2", "C": "3", "D": "None of the above"}, 4),  # a last 'None/All of' option rotates too
        ({"A": "red", "B": "blue", "C": "Both A and B"}, 1),  # names two option letters
        ({"A": "x", "B": "y", "C": "A, B, C"}, 1),
        ({"A": "x", "B": "C"}, 1),  # a bare capital letter as the option text
        ({"A": "x", "B": "CD"}, 1),  # ... or a run of them
        ({"A": "x", "B": "E and F"}, 2),  # letters that are not options of this question do not count
        ({"A": "x", "B": "option A"}, 2),  # one letter does not count
    ],
)
def test_which_questions_the_tool_rotates(options, rotations):
    item = EvalItem(index=5, question="q", options=options, answer="A")
    assert len(circular_expand([item])) == rotations


def test_none_of_the_above_moves_like_any_other_option():
    item = EvalItem(index=7, question="q", options={"A": "1", "B": "2", "C": "3", "D": "None of the above"},
                    answer="D")  # fmt: skip
    first = circular_expand([item])[1]
    assert first.options == {"A": "2", "B": "3", "C": "None of the above", "D": "1"} and first.answer == "C"


def test_mmcr_names_are_circular(tmp_path):
    path = write(tmp_path / "MMCR_toy.tsv", HEADER, PRE_ROTATED[:1])
    assert tsv_task(path).circular and len(tsv_task(path).examples) == 4


def test_non_circular_file_scores_rows_above_1e6_too(tmp_path):
    path = write(tmp_path / "SEED_toy.tsv", HEADER, [PRE_ROTATED[0], PRE_ROTATED[3], PRE_ROTATED[4]])
    task = tsv_task(path)
    assert not task.circular
    summary = evaluate(Fake(lambda p, i: "A"), task, tmp_path / "out", progress=False)
    # rows 1 (answer B), 1000001 (answer A), 2000001 (answer D): every row is scored, as mcq_vanilla_eval does
    assert summary["n"] == 3 and summary["overall"] == pytest.approx(1 / 3)


# ---- reading the file ----------------------------------------------------------------------------------------


def test_chained_image_references_are_followed(tmp_path):
    items = {it.index: it for it in read_tsv(pre_rotated(tmp_path))}
    for index in (2, 1000002, 2000002):  # 2000002 -> "2" -> "1" -> RED
        assert items[index].images[0].data is items[1].images[0].data
    assert items[2000002].images[0].load().getpixel((0, 0)) == (255, 0, 0)


def test_a_cycle_of_references_is_one_line(tmp_path):
    rows = [[1, "q", "x", "y", "", "", "A", "c", RED], [2, "q", "x", "y", "", "", "A", "c", "3"],
            [3, "q", "x", "y", "", "", "A", "c", "2"]]  # fmt: skip
    with pytest.raises(DataError, match=r"row 2 \(line 3\), column 'image': image references form a cycle "
                                        r"\(3 -> 2 -> 3\)"):  # fmt: skip
        read_tsv(write(tmp_path / "cycle.tsv", HEADER, rows))


def test_number_only_option_columns_read_as_pandas_types_them(tmp_path):
    header = ["index", "question", "A", "B", "C", "D", "answer", "image"]
    rows = [[1, "How many?", "1", "2.50", "3", "yes", "A", RED],
            [2, "How many?", "007", "5", "", "true", "B", RED]]  # fmt: skip
    first, second = read_tsv(write(tmp_path / "n.tsv", header, rows))
    # A: whole numbers, none missing -> int64; B: a decimal -> float64; C: a missing cell -> float64;
    # D: text stays text
    assert first.options == {"A": "1", "B": "2.5", "C": "3.0", "D": "yes"}
    assert second.options == {"A": "7", "B": "5.0", "D": "true"}
    assert build_mcq_prompt(first).startswith("How many?\nA. 1\nB. 2.5\nC. 3.0\nD. yes\n")
    # a column of True/False spellings is bool
    header = ["index", "question", "A", "B", "answer", "image"]
    (item,) = read_tsv(write(tmp_path / "b.tsv", header, [[1, "Is it?", "true", "FALSE", "A", RED]]))
    assert item.options == {"A": "True", "B": "False"}


@pytest.fixture
def three_places(tmp_path, monkeypatch):
    """g.png in the working directory (green), under $LMUData/images/bench (blue), next to the TSV (red)."""
    cwd, lmu, data = tmp_path / "cwd", tmp_path / "lmu", tmp_path / "data"
    for folder, color in ((cwd, "green"), (lmu / "images" / "bench", "blue"), (data, "red")):
        folder.mkdir(parents=True)
        Image.new("RGB", (3, 3), color).save(folder / "g.png")
    path = write(data / "bench.tsv", ["index", "question", "A", "B", "answer", "image_path"],
                 [[1, "q", "x", "y", "A", "g.png"]])  # fmt: skip
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LMUData", str(lmu))
    return path, cwd, lmu, data


def _color(path):
    return read_tsv(path)[0].images[0].load().getpixel((1, 1))


def test_relative_image_path_as_given_first(three_places):
    path, *_ = three_places
    assert _color(path) == (0, 128, 0)


def test_relative_image_path_then_the_lmudata_image_folder(three_places, tmp_path, monkeypatch):
    path, *_ = three_places
    monkeypatch.chdir(tmp_path)
    assert _color(path) == (0, 0, 255)


def test_relative_image_path_last_the_tsv_folder_then_one_line(three_places, tmp_path, monkeypatch):
    path, _, lmu, data = three_places
    monkeypatch.chdir(tmp_path)
    (lmu / "images" / "bench" / "g.png").unlink()
    assert _color(path) == (255, 0, 0)
    (data / "g.png").unlink()
    with pytest.raises(DataError, match=r"column 'image_path': image file 'g.png' not found as given nor under"):
        read_tsv(path)


# ---- answer extraction: VLMEvalKit's can_infer_option since June 2026 -----------------------------------------

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    "answer, choices, letter",
    [
        # several letters: the token rule infers nothing, "answer is B" settles it
        ("The answer is B. A is wrong because it is a cat.", CHOICES, "B"),
        # one letter, but too early for the token rule (first of 11 tokens)
        ("The correct answer is **C** because a bird sits on the left branch", CHOICES, "C"),
        ("B is right, and so the answer is B for the reason above", CHOICES, "B"),
        ("so the answer is b.", CHOICES, "B"),  # any case here
        # matched as VLMEvalKit matches it: "answer is a" is letter A, although the text names the dog
        ("the answer is a dog", CHOICES, "A"),
        # letters from E on are not in the pattern
        ("The answer is E, not A or B", {**CHOICES, "E": "frog"}, None),
        # a letter that is not an option is not taken
        ("The answer is D, not A or C", {"A": "x", "B": "y", "C": "z"}, None),
        # the earlier rules still come first
        ("Cannot determine the answer is B", CHOICES, "Z"),
        ("Failed to obtain answer via API. The answer is B", CHOICES, None),
        ("A or B", CHOICES, None),
    ],
)
def test_current_can_infer_option(answer, choices, letter):
    assert extract_choice(answer, choices) == letter


# ---- several images: the InternVL wrapper's tile budget -------------------------------------------------------


@pytest.mark.parametrize(
    "max_num, n, tiles",
    [(6, 1, 6), (6, 2, 6), (6, 11, 5), (12, 8, 8), (12, 3, 12), (6, 64, 1), (6, 100, 1), (1, 3, 1), (24, 1, 24)],
)
def test_tiles_per_image_is_max_1_min_max_num_64_over_n(max_num, n, tiles):
    assert tiles_per_image(max_num, n) == tiles


def test_a_two_image_question_gets_the_full_budget_per_image(tmp_path):
    header = ["index", "question", "A", "B", "answer", "image"]
    path = write(tmp_path / "multi.tsv", header, [[1, "Which?", "x", "y", "A", repr([RED, BLUE])],
                                                  [2, "Which?", "x", "y", "A", RED]])  # fmt: skip
    fake = Fake(lambda p, i: "A")
    evaluate(fake, tsv_task(path), tmp_path / "out", max_num=6, progress=False)
    assert sorted(fake.caps) == [(1, 6), (2, 6)]  # was 6 // 2 = 3 tiles per image


def test_the_synthetic_benchmark_shares_tiles_as_training(tmp_path):
    """The synthetic split's several-image questions (up to 8 video frames) share max_num tiles as in training
    (max(1, max_num // n) each), where a TSV benchmark gives each image min(max_num, 64 // n)."""
    from internvl.eval.synthetic import SyntheticTask
    from internvl.synth import generate_split

    generate_split(str(tmp_path / "split"), "test", 2, tasks=["multi_image", "video", "color"])
    fake = Fake(lambda p, i: "red")
    summary = evaluate(fake, SyntheticTask(tmp_path / "split", tasks=["multi_image", "video", "color"]), tmp_path / "out", max_num=4, progress=False)
    caps = {(n, cap) for n, cap in fake.caps}
    assert {cap for n, cap in caps if n == 1} == {4}
    assert all(cap == max(1, 4 // n) for n, cap in caps) and any(n > 1 for n, _ in caps)
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["total_max_num"] == 4
    assert summary["n"] == 6
