"""The binding loss: supervised attention from a word that names an object of a synthetic scene to the image
tokens that show it.

A question such as "What color is the triangle?" can only be answered by looking up the triangle among the
image tokens. Trained on the language loss alone, the nano model never learns that lookup: its attention puts
as much weight on the other objects as on the named one, in every layer (runs/attention_probe.py). This loss
teaches it directly. For each mention of an object in a scene question (a shape word or "object", after a color
or not), the chosen heads' attention from the mention's last token is pushed onto the image tokens
whose cell overlaps the objects it names (the scene's `meta.objects` boxes, mapped through dynamic tiling); other
heads may be pushed, from the position that predicts the answer, onto every object the question names:

    loss = w * sum over queries and their heads of  -log( sum_target p / sum_image p )

with p the head's attention probabilities, so only the distribution over the image's tokens is supervised, not
how much the head looks at the image at all. A count question's COUNT query instead spreads the head evenly over
one token per named object (its centre's) and the `<img>` token before the image, so that the sink's share,
1 / (n + 1), says how many there are: loss = w * KL(t || p / sum p) with t even over those n + 1 keys. A count
head may weigh `<img>` m times an object instead (t = m / (n + m) there): its share m / (n + m) changes most with
n near m, so a second head with m = 4 separates 5 objects from 6 better than the first's 1 / (n + 1) does.
The place loss (`place_xy_layer`, `place_xy_weight`) is a training-only readout: at the position that predicts a
scene question's answer, the residual stream where one layer's MLP reads it (after the attention), RMS-normalized
and projected on four fixed orthonormal directions U, is pushed towards the centres (x, y in [-1, 1] of the
canvas) of the question's first- and last-named objects (a relation question's two, a position question's one
twice). A relation answer compares two places and a position answer reads one; the readout makes both places
linear in the state that the MLP turns into the answer:

    loss = w_xy * sum over questions of  || U^T norm(h) - (x1, y1, x2, y2) ||^2

With `place_xy_word_layer` the same readout runs at each mention's last token too, at that layer's MLP input, on
the first two directions only: the centre (x, y) of the objects it names (which the WORD heads look at). The
place then travels along the heads already trained to look: object -> mention -> answer. With
`count_xy_layer` it runs at each count question's answer position too, at that layer's MLP input, on a fifth
fixed direction orthogonal to the four: the count n as 2n/9 - 1 (0-9 onto [-1, 1]). The count heads leave n in
their `<img>` share, m / (n + m), which no linear map reads off (runs/count_probe.py); this readout asks the layers
after them for n itself, on one line.

A count head at the answer position has only what the earlier heads brought there to tell it what to count; on the
nano model after stage 2m its attention over examples/circles.png is the same whatever the question names. So the
same spread can be asked from the count question's mention itself (COUNT_WORD queries, `count_word_heads`: the word
naming what to count, from which the WORD heads find those objects), with the count readout there too
(`count_xy_word_layer`, the fifth direction); the HOP heads then carry it to the answer.

A count is read off a ratio: with the nano model of stage 2q (run 28) one count head's `<img>` share rounds to the
right n for 39% of held-out count items, the answers are right for 58.5%, and the count readout at layer 5 has R^2
0.94 (0.72 objects RMS). `count_weight` multiplies both losses on count questions' rows (COUNT and COUNT_WORD:
the heads' spread and the count readouts) so that a stage can ask for a sharper spread and a finer readout without
pushing every other head harder; the metric `count_ce` is the binding loss on those rows alone.

A mention's last token is the shape word ("circles" in "How many yellow circles are there?"); on the nano model
after stage 2p the heads that look from it attend the same way whatever color word comes before it. COLOR queries
(`color_heads`) push a head from it onto the color word among the question's tokens, so that it takes the color in.

A multiple-choice question ("What color is the star?\nA. red\nB. blue...", answered with a letter) is its scene
question followed by options; the answer must fetch the letter of the option that says what the model found. Two
lookups over the question's tokens teach it: from each option's last token onto its letter (LETTER heads, early,
so that the option's last token carries its letter) and from the answer position onto the right option's last
token (OPTION heads, late, once the answer is known there), whose letter the head then copies. On the 6-layer
nano model the LETTER head learns its lookup but an OPTION head in the last layer stays at chance: the answer is
not yet formed at that layer's input (README, run 24). So the comparison can move to the options: from each
option's last token CHOICE heads look up the question's mentions (which the WORD heads have filled with the named
object's color and shape), and with `match_xy_layer` the place loss's readout at that layer's MLP input asks each
option's last token for +1 when it is the right option and -1 otherwise (a sixth direction); the OPTION head then
only has to find the option that says it matches. After stage 2q it does, for color questions 81% of the time, but
the answers do not follow (a third right): the letter does not travel from the option to the answer. With
`letter_xy_layer` the readout asks the answer position for the right letter's code (A (1, 1), B (1, -1), C (-1, 1),
D (-1, -1), on a seventh and an eighth direction), which any one linear map turns into the letter's logit.
That readout did not learn (run 29), and a probe of the shipped model (run 33) says why: the option head puts 0.86
of its attention on the right option's last token for color questions (among every key before the answer, not
just the options), yet its direct effect on the four letters' logits picks the right one for a third of the items
and answers are right for 29%. The option's letter is there (a fresh probe reads it from the head's value vectors
80% of the time) but faintly, in directions the head's output projection never learnt to use. With
`option_letter_xy_layer` the same readout runs at each option's last token, at that layer's MLP input, for the
option's own letter's code on the same two directions: the letter becomes a large signal there, in the directions
the answer's readout asks for, so the option head only has to copy those two directions.

A grounding answer writes the named object's box as digits (`<box>[[x1, y1, x2, y2]]</box>`, 0-1000) many tokens
after the answer position; the shipped 8-layer model's boxes had nothing to do with the object. With `box_xy_layer`
each position that predicts one of those digits is a PLACE_FIRST query onto the object's thumbnail cells and a
place-loss row for its box (x1, y1, x2, y2 in [-1, 1] of the canvas, the first four directions) at that layer's
MLP input (BOX rows), so the layers after it only have to turn a linear code into digits.

A count head selects what it counts by its keys, and the shipped model counts "How many {shape}s" right 44% of the
time against 80% for "How many objects", which selects nothing: whether an object is the named shape is only faintly
and unevenly in its tokens. With `object_xy_layer` each object's centre token among the image's (the token a COUNT
query spreads onto) is a place-loss row for its shape's and color's codes (+1 its own, -1 the others) on 12 more
fixed directions at that layer's MLP input (OBJECT rows), so that every later layer's keys can carry them;
`object_weight` multiplies their squared error (12 codes of every object of a scene: at first ~10 times the language
loss).

A multiple-choice position question is answered at chance (25%) by the shipped model although it places the named
object right 87.5% of the time when asked directly: the option head (answer position onto the right option's last
token) must match the object's place against words ("top left") whose cell nothing in an option's tokens says.
With `region_xy_layer` each option's last token of a position question is a place-loss row for the centre of the
grid cell its words name, (x, y, x, y) on the first four directions (REGION rows): the same code the answer
position's readout holds for a one-object question, so that the option head's keys and query can carry the same
place.

It needs rows of the Synthetic Visual World's scene tasks (color, shape, count, position, relation, grounding,
and mc over the first four) with the contract's `meta.objects` and, for several questions, `meta.turns` (each
question's task); other rows and questions train on the language loss only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import TrainingError
from ..model.rope import apply_rope
from ..processing.image import choose_grid
from ..processing.template import get_template
from ..synth.questions import POSITIONS
from ..synth.scene import COLOR_NAMES, SHAPES
from ..tokenizer import Tokenizer
from .objective import ObjectiveOutput, SFTObjective
from .tokenize import render_turn

SCENE_TASKS = ("color", "shape", "count", "position", "relation", "grounding")
_COLOR = "|".join(COLOR_NAMES)
_SHAPE = "|".join(SHAPES)
# "[color] shape[s]" or "[color] object[s]": the objects a question names
MENTION = re.compile(rf"\b(?:({_COLOR}) )?(?:({_SHAPE})s?|objects?)\b")


def parse_heads(spec: str, flag: str = "--binding-heads") -> list[tuple[int, int]]:
    """Layer:head pairs: "1:0,2:0" -> [(1, 0), (2, 0)]."""
    pairs = []
    for part in spec.split(","):
        layer, sep, head = part.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
            raise TrainingError(f"{flag} must be layer:head pairs like 1:0,2:0, got {spec!r}")
        pairs.append((int(layer), int(head)))
    return pairs


def check_count_sinks(sinks: Sequence[float], heads: int, given: str, flag: str = "--binding-count") -> None:
    """FLAG-sinks (`given`, parsed: `sinks`) must be one positive weight per FLAG-heads pair."""
    if len(sinks) != heads or any(m <= 0 for m in sinks):
        raise TrainingError(f"{flag}-sinks must be one positive number per {flag}-heads pair "
                            f"({heads}), got {given!r}")  # fmt: skip


def mentions(question: str) -> list[tuple[str | None, str | None, int]]:
    """(color or None, shape or None, end offset of the mention's last word) for each object a question names."""
    out = []
    for m in MENTION.finditer(question):
        out.append((m.group(1), m.group(2), m.end()))
    return out


def cell_tokens(box: Sequence[float], sx: float, sy: float, ox: float, oy: float, image_size: int,
                side: int) -> set[int]:  # fmt: skip
    """Token indices (row-major side x side) of one tile whose cell overlaps `box` scaled by (sx, sy) and shifted
    by (ox, oy) into the tile's pixels."""
    x0, x1 = box[0] * sx - ox, box[2] * sx - ox
    y0, y1 = box[1] * sy - oy, box[3] * sy - oy
    if x1 <= 0 or y1 <= 0 or x0 >= image_size or y0 >= image_size:
        return set()
    cell = image_size / side
    c0, c1 = max(0, int(x0 // cell)), min(side - 1, int((x1 - 1e-6) // cell))
    r0, r1 = max(0, int(y0 // cell)), min(side - 1, int((y1 - 1e-6) // cell))
    return {r * side + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)}


def object_tokens(box: Sequence[float], width: int, height: int, grid: tuple[int, int], image_size: int,
                  num_image_token: int, thumbnail: bool = True) -> set[int]:  # fmt: skip
    """Offsets among an image's tokens (its tiles row-major, then the thumbnail) whose cell overlaps `box`
    (canvas pixels) when the width x height image is cut into `grid` = (cols, rows) tiles."""
    side = math.isqrt(num_image_token)
    cols, rows = grid
    sx, sy = cols * image_size / width, rows * image_size / height
    out: set[int] = set()
    for k in range(cols * rows):
        cells = cell_tokens(box, sx, sy, (k % cols) * image_size, (k // cols) * image_size, image_size, side)
        out |= {k * num_image_token + t for t in cells}
    if thumbnail and cols * rows > 1:
        cells = cell_tokens(box, image_size / width, image_size / height, 0, 0, image_size, side)
        out |= {cols * rows * num_image_token + t for t in cells}
    return out


# the kinds of query: a mention's last token (onto the named objects' image tokens), the position that predicts
# the answer (onto them too), and that position again over the question's tokens: onto all its mentions (HOP), onto
# the first one only (FIRST) or the last one only (LAST; a relation question names two objects, and its answer
# compares their places, so each needs a head of its own), and for a count question that position again onto one
# token per named object and the `<img>` token (COUNT: spread evenly over them), and that position onto the image
# tokens that show the question's first-named objects (PLACE_FIRST) or its last-named ones (PLACE_LAST) at
# whole-image scale (the thumbnail's, whose cells say where on the image an object is; a tile's, where in the tile);
# for a multiple-choice question, each option's last token onto its letter (LETTER) and the answer position onto
# the right option's last token (OPTION), an option's last token onto the question's mentions (CHOICE), and the
# place loss's row at an option's last token that says whether the option is the right one (MATCH), and a count
# question's mention spread like its answer position's COUNT query (COUNT_WORD), and a mention's last token onto
# its color word (COLOR), and each position that predicts a digit of a grounding answer's box (BOX: the place loss's
# row with the object's box, and the same position onto the object's whole-image cells for the place-first heads when
# the box readout is on), and each object's centre token among the image's (OBJECT: the place loss's row with its
# shape and color codes), and each option's last token of a multiple-choice position question (REGION: the place
# loss's row with the centre of the grid cell its words name)
WORD, ANSWER, HOP, FIRST, LAST, COUNT, PLACE_FIRST, PLACE_LAST, LETTER, OPTION, CHOICE, MATCH, COUNT_WORD, COLOR, BOX, OBJECT, REGION = range(17)
# how many fixed directions the place loss reads (readout_directions)
NUM_DIRECTIONS = 8 + len(SHAPES) + len(COLOR_NAMES)
# the code of a multiple-choice answer's letter that the place loss reads at the answer position (OPTION rows)
LETTER_CODES = {"A": (1.0, 1.0), "B": (1.0, -1.0), "C": (-1.0, 1.0), "D": (-1.0, -1.0)}
# an option line of a multiple-choice question: "\nA. text" (the contract's mc rows)
OPTION_LINE = re.compile(r"\n([A-Z])\. ([^\n]+)")
# the box of a grounding answer: <box>[[x1, y1, x2, y2]]</box>, integers in 0..1000
BOX_DIGITS = re.compile(r"<box>\[\[(\d+), (\d+), (\d+), (\d+)\]\]")
# the centre (x, y in [-1, 1] of the canvas, y down) of the 3 x 3 grid cell each position answer names
REGION_CENTRES = {name: ((c - 1) * 2 / 3, (r - 1) * 2 / 3) for r, row in enumerate(POSITIONS) for c, name in enumerate(row)}


def centre_token(box: Sequence[float], width: int, height: int, grid: tuple[int, int], image_size: int,
                 num_image_token: int) -> int:  # fmt: skip
    """Offset among an image's tokens of the tile cell that holds `box`'s centre (canvas pixels) when the
    width x height image is cut into `grid` = (cols, rows) tiles."""
    side = math.isqrt(num_image_token)
    cols, rows = grid
    x = (box[0] + box[2]) / 2 * cols * image_size / width
    y = (box[1] + box[3]) / 2 * rows * image_size / height
    col, row = min(cols - 1, int(x // image_size)), min(rows - 1, int(y // image_size))
    cell = image_size / side
    c = min(side - 1, int((x - col * image_size) // cell))
    r = min(side - 1, int((y - row * image_size) // cell))
    return (row * cols + col) * num_image_token + r * side + c


def scene_queries(item: dict, turns: Sequence[tuple[str, str]], ids: Sequence[int], tokenizer: Tokenizer,
                  template: str, context_id: int, min_num: int, max_num: int, image_size: int,
                  num_image_token: int, thumbnail: bool = True,
                  xy: list[tuple[int, list[float], int]] | None = None) -> list[tuple[int, list[int], list[bool], int]]:  # fmt: skip
    """(query position, the image's token positions, which of them show the named objects, kind) for every object
    mention of the scene questions of a one-image row with `meta.objects` (kind WORD), and for the position that
    predicts each such question's answer, whose targets are all the objects the question names (kind ANSWER) and,
    among the question's own tokens, its first mention (FIRST), its last (LAST) and all of them (HOP), and for a
    count question, over the `<img>` token and the image's, that token and one per named object (COUNT; left out
    when two named objects' centres fall in one cell), the same from its mention (COUNT_WORD), and for a mention
    with a color word, its last token onto that word among the question's tokens (COLOR); [] for any other row.
    A multiple-choice question (task "mc", its scene task in `meta.category`) is that question with options: its
    mentions are those before the options, and over the question's tokens each option's last token queries its
    letter (LETTER) and the mentions (CHOICE), and the answer position the right option's last token (OPTION, the
    option the reply's letter names).

    `turns` are the row's turns with the image placeholder expanded, `ids` their tokens. A mention's query is the
    last token of its last word; one whose tokens cannot be found where expected is left out, as is one that
    names no object of the scene (a count of 0). When `xy` is a list, the place loss's rows are appended to it: each
    such question's answer position with the centres of its first and last mention's objects, (x1, y1, x2, y2) in
    [-1, 1] of the canvas (kind ANSWER), each mention's query with its objects' centre twice (kind WORD), and each
    count question's answer position and its mention with (2n/9 - 1, 0, 0, 0), n its count (kinds COUNT and
    COUNT_WORD), and each option's last token with (+1 or -1, 0, 0, 0), whether it is the right option (kind MATCH),
    and with its own letter's code (kind LETTER), and a multiple-choice question's answer position with the right
    letter's code (kind OPTION; `option_queries`)."""
    meta = item.get("meta") or {}
    objects, size = meta.get("objects"), meta.get("size")
    if not objects or not size or not isinstance(item.get("image"), str):
        return []
    listed = meta.get("turns")  # the task of each question (the contract's multi-turn rows)
    tasks = [t.get("task") for t in listed] if isinstance(listed, list) else [item.get("task")]
    # a multiple-choice question asks its scene task's question
    tasks = [meta.get("category") if task == "mc" else task for task in tasks]
    image = [i for i, t in enumerate(ids) if t == context_id]
    width, height = size
    grid = choose_grid(width, height, min_num, max_num, image_size)
    tiles = grid[0] * grid[1] + (1 if thumbnail and grid[0] * grid[1] > 1 else 0)
    if len(image) != tiles * num_image_token:
        return []
    # the first token of the whole-image view: the thumbnail (the last tile) or the one tile; none without either
    whole = (tiles - 1) * num_image_token if tiles == 1 or thumbnail else len(image)
    if xy is not None:
        xy += object_rows(objects, image, width, height, grid, image_size, num_image_token)
    t = get_template(template)
    head = tokenizer.encode(t.roles[0], add_special_tokens=False)
    answer_head = tokenizer.encode(t.roles[1], add_special_tokens=False)
    starts = [i for i in range(len(ids) - len(head) + 1) if list(ids[i : i + len(head)]) == head]
    humans = [text for who, text in turns if who == "human"]
    replies = [text for who, text in turns if who == "gpt"]
    out = []
    for turn, (start, text, task) in enumerate(zip(starts, humans, tasks)):
        if task not in SCENE_TASKS:
            continue
        asked: set[int] = set()
        words: list[int] = []
        places: list[set[int]] = []  # whole-image cells of each supervised mention's objects
        centres: list[list[float]] = []  # the mean centre of each supervised mention's objects, in [-1, 1]
        boxes: list[list[float]] = []  # the box around each supervised mention's objects, in [-1, 1]
        named_all: list = []  # every object the question names, once a mention
        said = None  # the last mention's query position, when its tokens are where expected (it may name nothing)
        options = list(OPTION_LINE.finditer(text))
        question = text[: options[0].start()] if options else text
        for color, shape, end in mentions(question):
            named = [o for o in objects if color in (None, o[0]) and shape in (None, o[1])]
            named_all += named
            prefix = tokenizer.encode(t.roles[0] + text[:end], add_special_tokens=False)
            found = list(ids[start : start + len(prefix)]) == prefix
            said = start + len(prefix) - 1 if found else said
            if found and color is not None:  # the color word's last token, which the mention's must take in
                before = tokenizer.encode(t.roles[0] + text[: text.rfind(color + " ", 0, end) + len(color)],
                                          add_special_tokens=False)  # fmt: skip
                if list(ids[start : start + len(before)]) == before:
                    keys = list(range(start, said + 1))
                    out.append((said, keys, [k == start + len(before) - 1 for k in keys], COLOR))
            if not named or not found:
                continue
            cells = set().union(*(object_tokens(o[2], width, height, grid, image_size, num_image_token, thumbnail)
                                  for o in named))  # fmt: skip
            if cells:
                out.append((start + len(prefix) - 1, image, [k in cells for k in range(len(image))], WORD))
                asked |= cells
                words.append(start + len(prefix) - 1)
                places.append({k for k in cells if k >= whole})
                centres.append([sum(o[2][0] + o[2][2] for o in named) / len(named) / width - 1,
                                sum(o[2][1] + o[2][3] for o in named) / len(named) / height - 1])  # fmt: skip
                boxes.append([min(o[2][0] for o in named) * 2 / width - 1, min(o[2][1] for o in named) * 2 / height - 1,
                              max(o[2][2] for o in named) * 2 / width - 1, max(o[2][3] for o in named) * 2 / height - 1])  # fmt: skip
                if xy is not None:
                    xy.append((words[-1], centres[-1] * 2, WORD))
        # the answer follows the question's segment: <|im_start|>assistant\n, then its first token
        answer = start + len(tokenizer.encode(render_turn(t.name, "human", text), add_special_tokens=False))
        if list(ids[answer : answer + len(answer_head)]) != answer_head:
            continue
        query = answer + len(answer_head) - 1
        if asked:
            out.append((query, image, [k in asked for k in range(len(image))], ANSWER))
            question = list(range(start, query + 1))
            for targets, kind in (([words[0]], FIRST), ([words[-1]], LAST), (words, HOP)):
                out.append((query, question, [k in targets for k in question], kind))
            for cells, kind in ((places[0], PLACE_FIRST), (places[-1], PLACE_LAST)):
                if cells:
                    out.append((query, image, [k in cells for k in range(len(image))], kind))
            if xy is not None:
                xy.append((query, centres[0] + centres[-1], ANSWER))
            if task == "grounding" and turn < len(replies):
                for at in box_queries(replies[turn], answer, ids, tokenizer, t.roles[1]):
                    if places[0]:
                        out.append((at, image, [k in places[0] for k in range(len(image))], BOX))
                    if xy is not None:
                        xy.append((at, boxes[0], BOX))
        if options and turn < len(replies):
            out += option_queries(options, replies[turn], start, query, ids, tokenizer, t.roles[0], text, words, xy,
                                  task)  # fmt: skip
        if task != "count":
            continue
        tokens = {centre_token(o[2], width, height, grid, image_size, num_image_token) for o in named_all}
        n = [2 * len(named_all) / 9 - 1, 0.0, 0.0, 0.0]
        # at the answer position and at the mention (which names what to count); a count of 0 too: all on `<img>`,
        # the token before the image's
        for at, kind in ((query, COUNT), (said, COUNT_WORD)):
            if at is None:
                continue
            if len(tokens) == len(named_all):
                out.append((at, [image[0] - 1, *image], [True] + [k in tokens for k in range(len(image))], kind))
            if xy is not None:
                xy.append((at, n, kind))
    return out


def object_rows(objects: Sequence, image: Sequence[int], width: int, height: int, grid: tuple[int, int],
                image_size: int, num_image_token: int) -> list[tuple[int, list[float], int]]:  # fmt: skip
    """The place loss's OBJECT rows of a scene: each object's centre token (among the image's token positions
    `image`) with its shape's and its color's codes, +1 for its own and -1 for the others (SHAPES, then COLOR_NAMES);
    objects whose centres share a cell are left out."""
    cells = [centre_token(o[2], width, height, grid, image_size, num_image_token) for o in objects]
    out = []
    for o, cell in zip(objects, cells):
        if cells.count(cell) == 1:
            code = [1.0 if o[1] == s else -1.0 for s in SHAPES] + [1.0 if o[0] == c else -1.0 for c in COLOR_NAMES]
            out.append((image[cell], code, OBJECT))
    return out


def box_queries(reply: str, answer: int, ids: Sequence[int], tokenizer: Tokenizer, role: str) -> list[int]:
    """The positions that predict the digits of the box in a grounding answer `reply` whose turn (opened by
    `role`) starts at token `answer`: one per digit of x1, y1, x2 and y2; [] when the reply has no box or its
    tokens are not where its text puts them."""
    m = BOX_DIGITS.search(reply)
    if m is None:
        return []
    out = []
    for k in range(1, 5):
        for j in range(m.start(k), m.end(k)):
            prefix = tokenizer.encode(role + reply[:j], add_special_tokens=False)
            if list(ids[answer : answer + len(prefix)]) != prefix:
                return []
            out.append(answer + len(prefix) - 1)
    return out


def option_queries(options: Sequence[re.Match], reply: str, start: int, query: int, ids: Sequence[int],
                   tokenizer: Tokenizer, role: str, text: str, words: Sequence[int] = (),
                   xy: list[tuple[int, list[float], int]] | None = None,
                   task: str | None = None) -> list[tuple[int, list[int], list[bool], int]]:  # fmt: skip
    """The LETTER, CHOICE and OPTION queries of a multiple-choice question `text` whose turn starts at token `start`
    and whose answer is predicted at `query`: `options` are its option lines (OPTION_LINE matches), `reply` the
    answer (its first character the right letter), `role` the turn's opening, `words` the query positions of the
    question's mentions. Each option's last token queries its letter (LETTER) and the mentions (CHOICE) among the
    question's tokens up to it. When `xy` is a list, each option's last token is appended to it as a MATCH row with
    +1 for the right option and -1 for the others and as a LETTER row with its own letter's code, and the answer
    position as an OPTION row with the right letter's code (LETTER_CODES; none for a letter after D), and, for a
    position question (`task`), each option naming a grid cell as a REGION row with that cell's centre twice,
    (x, y, x, y) as the answer position's row holds its object's centre. An option whose letter or last token is
    not where its text puts it is left out."""
    def last_token(end: int) -> int | None:  # the token that ends text[:end], if the tokens agree
        prefix = tokenizer.encode(role + text[:end], add_special_tokens=False)
        return start + len(prefix) - 1 if list(ids[start : start + len(prefix)]) == prefix else None

    out, right = [], None
    for m in options:
        letter, end = last_token(m.end(1)), last_token(m.end(2))
        if letter is None or end is None or letter >= end:
            continue
        keys = list(range(start, end + 1))  # what the option's last token can see
        out.append((end, keys, [k == letter for k in keys], LETTER))
        if words:
            out.append((end, keys, [k in words for k in keys], CHOICE))
        chosen = reply.strip()[:1] == m.group(1)
        if chosen:
            right = end
        if xy is not None:
            xy.append((end, [1.0 if chosen else -1.0, 0.0, 0.0, 0.0], MATCH))
            own = LETTER_CODES.get(m.group(1))
            if own is not None:
                xy.append((end, [*own, 0.0, 0.0], LETTER))
            region = REGION_CENTRES.get(m.group(2).strip()) if task == "position" else None
            if region is not None:
                xy.append((end, [*region, *region], REGION))
    if right is not None:
        keys = list(range(start, query + 1))
        out.append((query, keys, [k == right for k in keys], OPTION))
        code = LETTER_CODES.get(reply.strip()[:1])
        if xy is not None and code is not None:
            xy.append((query, [*code, 0.0, 0.0], OPTION))
    return out


class BindingObjective(SFTObjective):
    """SFT plus the binding loss, weighted by `weight` (see the module): the (layer, head) pairs of `heads` attend
    from the mentions (WORD queries), those of `answer_heads` from the answer positions (ANSWER queries), those of
    `hop_heads` from the answer positions onto the question's mentions (HOP queries), those of `first_heads` and
    `last_heads` from there onto its first or its last mention only (FIRST and LAST queries), those of
    `count_heads` from a count question's answer position evenly over its objects and `<img>` (COUNT queries), those
    of `place_first_heads` and `place_last_heads` from the answer position onto the thumbnail's tokens of the first
    or the last mention's objects (PLACE_FIRST and PLACE_LAST queries), those of `letter_heads`, `option_heads` and
    `choice_heads` over a multiple-choice question's tokens (LETTER, OPTION and CHOICE queries), and, when
    `place_xy_weight` > 0, the place loss at the MLP input of layer `place_xy_layer` (and of `place_xy_word_layer`
    at the mentions, `count_xy_layer` at count answers, `match_xy_layer` at the options and `letter_xy_layer` at
    multiple-choice answers; see the module).

    The scores are computed in a forward pre-hook of each supervised layer's attention, from the same normed
    hidden states and rotary tables the layer uses, for the batch's query rows and image keys only."""

    name = "sft+binding"
    bar_metrics = ("bind_ce", "bind_top1", "count_ce", "xy_mse", "xy_word_mse", "count_mse", "match_mse",
                   "count_word_mse", "letter_mse", "option_letter_mse", "box_mse", "object_mse", "region_mse")

    def __init__(self, reduction: str, weight: float, heads: Sequence[tuple[int, int]],
                 answer_heads: Sequence[tuple[int, int]] = (), hop_heads: Sequence[tuple[int, int]] = (),
                 first_heads: Sequence[tuple[int, int]] = (), last_heads: Sequence[tuple[int, int]] = (),
                 count_heads: Sequence[tuple[int, int]] = (), place_first_heads: Sequence[tuple[int, int]] = (),
                 place_last_heads: Sequence[tuple[int, int]] = (), letter_heads: Sequence[tuple[int, int]] = (),
                 option_heads: Sequence[tuple[int, int]] = (), choice_heads: Sequence[tuple[int, int]] = (),
                 count_sinks: Sequence[float] = (), place_xy_layer: int = -1, place_xy_weight: float = 0.0,
                 place_xy_word_layer: int = -1, count_xy_layer: int = -1, match_xy_layer: int = -1,
                 count_word_heads: Sequence[tuple[int, int]] = (), count_word_sinks: Sequence[float] = (),
                 count_xy_word_layer: int = -1, color_heads: Sequence[tuple[int, int]] = (),
                 letter_xy_layer: int = -1, count_weight: float = 1.0,
                 option_letter_xy_layer: int = -1, box_xy_layer: int = -1, object_xy_layer: int = -1,
                 object_weight: float = 1.0, region_xy_layer: int = -1):  # fmt: skip
        super().__init__(reduction)
        self.weight = weight
        self.count_weight = count_weight  # on count questions' rows, both losses
        self.xy_weight = place_xy_weight
        self.object_weight = object_weight  # on the object readout's rows
        # the place loss's rows and metric by the layer whose MLP input it reads: answer rows, mention rows, count
        # rows, option rows
        xy_layers = [(place_xy_layer, ANSWER, "xy_mse"), (place_xy_word_layer, WORD, "xy_word_mse"),
                     (count_xy_layer, COUNT, "count_mse"), (match_xy_layer, MATCH, "match_mse"),
                     (count_xy_word_layer, COUNT_WORD, "count_word_mse"), (letter_xy_layer, OPTION, "letter_mse"),
                     (option_letter_xy_layer, LETTER, "option_letter_mse"), (box_xy_layer, BOX, "box_mse"),
                     (object_xy_layer, OBJECT, "object_mse"), (region_xy_layer, REGION, "region_mse")]  # fmt: skip
        self.xy_layers = [(la, kind, name) for la, kind, name in xy_layers if la >= 0 and place_xy_weight > 0]
        self._xy: dict[int, list[torch.Tensor]] = {}  # by layer: its input and its attention's output, place rows
        kinds = [(heads, WORD), (answer_heads, ANSWER), (hop_heads, HOP)]
        kinds += [(first_heads, FIRST), (last_heads, LAST)]
        kinds += [(place_first_heads, PLACE_FIRST), (place_last_heads, PLACE_LAST)]
        # a grounding answer's digits look where the answer position's place heads look, with the box readout only
        kinds += [(place_first_heads if box_xy_layer >= 0 else (), BOX)]
        kinds += [(letter_heads, LETTER), (option_heads, OPTION), (choice_heads, CHOICE), (color_heads, COLOR)]
        self.heads = [(la, h, kind, 1.0) for pairs, kind in kinds for la, h in pairs]
        sinks = list(count_sinks) or [1.0] * len(count_heads)
        check_count_sinks(sinks, len(count_heads), ",".join(f"{m:g}" for m in sinks))
        self.heads += [(la, h, COUNT, m) for (la, h), m in zip(count_heads, sinks)]
        sinks = list(count_word_sinks) or [1.0] * len(count_word_heads)
        check_count_sinks(sinks, len(count_word_heads), ",".join(f"{m:g}" for m in sinks), "--binding-count-word")
        self.heads += [(la, h, COUNT_WORD, m) for (la, h), m in zip(count_word_heads, sinks)]
        self._batch = None
        self._scores: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # scores, counted, sinks

    def setup(self, model: nn.Module, device: torch.device) -> None:
        lm = getattr(model, "language_model", model)
        layers = lm.model.layers
        by_layer: dict[int, list[tuple[int, int, float]]] = {}
        for layer, head, kind, sink in self.heads:
            if layer >= len(layers):
                raise TrainingError(f"--binding-heads: layer {layer} does not exist "
                                    f"(the model has {len(layers)})")  # fmt: skip
            if head >= layers[layer].self_attn.num_heads:
                raise TrainingError(f"--binding-heads: head {head} does not exist "
                                    f"(layer {layer} has {layers[layer].self_attn.num_heads})")  # fmt: skip
            by_layer.setdefault(layer, []).append((head, kind, sink))
        for layer, pairs in by_layer.items():
            layers[layer].self_attn.register_forward_pre_hook(self._hook(pairs))
        self.directions = readout_directions(layers[0].post_attention_layernorm.weight.shape[0]).to(device)
        flags = {ANSWER: "--binding-place-xy-layer", WORD: "--binding-place-xy-word-layer",
                 COUNT: "--binding-count-xy-layer", MATCH: "--binding-match-xy-layer",
                 COUNT_WORD: "--binding-count-xy-word-layer", OPTION: "--binding-letter-xy-layer",
                 LETTER: "--binding-option-letter-xy-layer", BOX: "--binding-box-xy-layer",
                 OBJECT: "--binding-object-xy-layer", REGION: "--binding-region-xy-layer"}  # fmt: skip
        for index, kind, _ in self.xy_layers:
            flag = flags[kind]
            if index >= len(layers):
                raise TrainingError(f"{flag}: layer {index} does not exist (the model has {len(layers)})")
            layer = layers[index]
            # the MLP's input is the norm of the layer's input plus its attention's output: both taken at the place
            # rows from hooks on modules that run eagerly (torch.compile compiles the norms and the MLP)
            if index not in self._xy:
                self._xy[index] = []
                layer.register_forward_pre_hook(lambda module, args, i=index: self._xy_capture(i, module, args[0]))
                layer.self_attn.register_forward_hook(lambda module, args, out, i=index: self._xy_capture(i, module, out))

    def _xy_capture(self, index: int, module: nn.Module, x: torch.Tensor) -> None:
        batch = self._batch
        if batch is None or batch.place_query is None or not module.training:
            return
        if x.shape[:2] != batch.input_ids.shape:  # not this batch's forward
            return
        self._xy[index].append(x.flatten(0, 1)[batch.place_query])

    def _hook(self, pairs: list[tuple[int, int, float]]):
        heads = [h for h, _, _ in pairs]
        kinds = torch.tensor([k for _, k, _ in pairs])
        sinks = torch.tensor([m for _, _, m in pairs])

        def capture(attn, args):
            batch, x = self._batch, args[0]
            if batch is None or batch.bind_query is None or not attn.training:
                return
            if x.shape[:2] != batch.input_ids.shape:  # not this batch's forward
                return
            cos, sin = args[1], args[2]
            scores = binding_scores(attn, x, cos, sin, batch.bind_query, batch.bind_keys, heads)
            # which (query, head) pairs count: a head learns from its kind of query only
            counted = batch.bind_kind[:, None] == kinds.to(scores.device)[None]
            self._scores.append((scores, counted, sinks.to(scores.device)))

        return capture

    def __call__(self, model: nn.Module, batch) -> ObjectiveOutput:
        # The batch stays set after the forward: with gradient checkpointing the backward pass runs each layer
        # again, and the hook must compute what it computed the first time (the recomputed scores are dropped).
        self._batch, self._scores = batch, []
        self._xy = {index: [] for index in self._xy}
        out = super().__call__(model, batch)
        scores, self._scores = self._scores, []
        out = self._place_loss(out, batch)
        if not scores:
            return out
        s = torch.cat([sc for sc, _, _ in scores], dim=1).float()  # [Q, heads, K]
        counted = torch.cat([m for _, m, _ in scores], dim=1)  # [Q, heads]
        sinks = torch.cat([m for _, _, m in scores])  # [heads]
        spread = (batch.bind_kind == COUNT) | (batch.bind_kind == COUNT_WORD)
        losses = query_losses(s, batch.bind_valid, batch.bind_target, spread, sinks)  # [Q, heads]
        ce = losses[counted]
        count_rows = counted & spread[:, None]
        scale = torch.where(spread, self.count_weight, 1.0)[:, None].expand_as(losses)[counted]
        valid, target = batch.bind_valid[:, None], batch.bind_target[:, None]
        neg = torch.finfo(s.dtype).min
        best = s.masked_fill(~valid, neg).argmax(-1, keepdim=True)
        top1 = target.expand_as(s).gather(-1, best).squeeze(-1)[counted].float()
        metrics = dict(out.metrics)
        metrics["bind_ce"] = (ce.detach().sum(), float(ce.numel()))
        metrics["bind_top1"] = (top1.sum(), float(top1.numel()))
        metrics["count_ce"] = (losses[count_rows].detach().sum(), float(count_rows.sum()))
        return ObjectiveOutput(out.loss_sum + self.weight * (scale * ce).sum(), metrics)

    def _place_loss(self, out: ObjectiveOutput, batch) -> ObjectiveOutput:
        """`out` plus the place loss (metrics `xy_mse`, `xy_word_mse`, `count_mse`, `match_mse`, `count_word_mse` and
        `letter_mse`: the mean squared error per coordinate at the rows of each readout in `self.xy_layers`)."""
        captured, self._xy = self._xy, {index: [] for index in self._xy}
        loss, metrics = out.loss_sum, dict(out.metrics)
        for index, kind, name in self.xy_layers:
            rows = batch.place_kind == kind if batch.place_query is not None else None
            if rows is None or not bool(rows.any()):
                metrics[name] = (loss.new_zeros(()), 0.0)
                continue
            xy = captured[index]
            h = (xy[0] + xy[1])[rows].float()  # the residual after the attention (the first forward's)
            h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
            # an answer's (x1, y1, x2, y2) on the first four directions, a mention's (x, y) on the first two, a
            # count on the fifth, an option's match on the sixth, a multiple-choice answer's letter on the last two,
            # a grounding answer's box (x1, y1, x2, y2) at its digits on the first four, an object's shape and color
            # codes at its centre token on the 12 after those
            u, dims = {ANSWER: (self.directions[:, :4], 4), WORD: (self.directions[:, :2], 2),
                       COUNT: (self.directions[:, 4:5], 1), MATCH: (self.directions[:, 5:6], 1),
                       COUNT_WORD: (self.directions[:, 4:5], 1), OPTION: (self.directions[:, 6:8], 2),
                       LETTER: (self.directions[:, 6:8], 2), BOX: (self.directions[:, :4], 4),
                       OBJECT: (self.directions[:, 8:NUM_DIRECTIONS], NUM_DIRECTIONS - 8),
                       REGION: (self.directions[:, :4], 4)}[kind]  # fmt: skip
            err = (h @ u - batch.place_xy[rows, :dims].to(h.device)).square()
            scale = {COUNT: self.count_weight, COUNT_WORD: self.count_weight, OBJECT: self.object_weight}.get(kind, 1.0)
            loss = loss + self.xy_weight * scale * err.sum()
            metrics[name] = (err.detach().sum(), float(err.numel()))
        return ObjectiveOutput(loss, metrics)


def readout_directions(hidden: int) -> torch.Tensor:
    """The place loss's fixed orthonormal directions [hidden, NUM_DIRECTIONS] (the same in every run and process):
    four for places, one for counts, one for an option's match, two for a multiple-choice answer's letter, 12 for an
    object's shape and color (each later set its own draw, so the earlier ones are those of runs made before it was
    added)."""
    draws = [torch.randn(hidden, k, generator=torch.Generator().manual_seed(seed))
             for seed, k in ((0, 4), (1, 1), (2, 1), (3, 2), (4, len(SHAPES) + len(COLOR_NAMES)))]  # fmt: skip
    return torch.linalg.qr(torch.cat(draws, 1))[0]


def query_losses(s: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, count: torch.Tensor,
                 sinks: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The binding loss [Q, heads] of attention logits `s` [Q, heads, K] over keys `valid` [Q, K]: -log of the
    targets' share (`target` [Q, K]), or, for the rows `count` [Q], the KL divergence from the spread over the
    targets with key 0 (`<img>`) weighted `sinks` [heads] times an object."""
    valid, target = valid[:, None], target[:, None]
    neg = torch.finfo(s.dtype).min
    image_lse = torch.logsumexp(s.masked_fill(~valid, neg), -1)
    ce = image_lse - torch.logsumexp(s.masked_fill(~target, neg), -1)
    if bool(count.any()):
        t = target.to(s.dtype).expand_as(s).clone()
        t[..., 0] *= sinks
        t = t / t.sum(-1, keepdim=True)
        kl = image_lse - (t * s.masked_fill(~target, 0)).sum(-1) + torch.xlogy(t, t).sum(-1)
        ce = torch.where(count[:, None], kl, ce)
    return ce


def binding_scores(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query: torch.Tensor,
                   keys: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """Attention logits [Q, len(heads), K] of the rows `query` (flat [B*T] indices of x [B, T, H]) over the keys
    `keys` [Q, K] (flat indices), as `attn` computes them: q/k projections, the optional q/k norm, RoPE.

    Queries of one sample share its image tokens as keys, so each distinct key is projected once and only on the
    key heads that `heads` read; the logits are taken against all distinct keys and then gathered per query (a
    step of the nano recipe projected ~4x its sequence's tokens through k_proj before)."""
    if getattr(attn, "q_proj", None) is None:
        raise TrainingError("the binding loss needs unfused q/k projections (training models are not fused)")
    hq, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    flat = x.flatten(0, 1)
    cos, sin = cos.flatten(0, 2), sin.flatten(0, 2)  # [B, 1, T, D] -> [B*T, D]
    distinct, where = keys.unique(return_inverse=True)  # [U], and [Q, K] positions in it
    h = torch.tensor(list(heads), device=x.device)
    kv, kv_of = (h // (hq // hk)).unique(return_inverse=True)  # the key heads read, and each head's among them
    q = attn.q_proj(flat[query]).view(len(query), hq, d)[:, h]  # [Q, heads, d]
    k = attn.k_proj(flat[distinct]).view(len(distinct), hk, d)[:, kv]  # [U, kv, d]
    if hasattr(attn, "q_norm"):  # per head, over d
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = apply_rope(q, cos[query][:, None], sin[query][:, None])
    k = apply_rope(k, cos[distinct][:, None], sin[distinct][:, None])
    logits = torch.einsum("qhd,uhd->qhu", q, k[:, kv_of]) / math.sqrt(d)  # [Q, heads, U]
    return logits.gather(-1, where[:, None, :].expand(-1, len(heads), -1))
