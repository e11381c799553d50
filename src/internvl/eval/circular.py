"""Circular evaluation (MMBench): every question asked once per rotation of its options, and scoring.

Expansion mirrors VLMEvalKit's `CIRCULAR` (vlmeval/tools.py); scoring mirrors `mcq_circular_eval`,
`mcq_vanilla_eval` and `report_acc` (vlmeval/dataset/utils/multiple_choice.py) under exact matching.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from internvl.errors import DataError
from internvl.eval.extract import extract_choice
from internvl.eval.tsv import EvalItem

CIRCULAR_OFFSET = 1_000_000
# MMBench ability names as VLMEvalKit abbreviates them in its accuracy tables.
MMB_ABBRS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
Record = tuple[EvalItem, str]  # an item and the model's raw prediction text


def _can_move_last(text: str, n: int) -> bool:
    """VLMEvalKit's `okn`: a last option such as "All of the above", "None of these" or "A, B and C" only
    makes sense in last place, so it stays fixed and only the options before it rotate."""
    words = text.replace(",", " ").split()
    if all(c in words for c in string.ascii_uppercase[: n - 1]):
        return False
    low = text.lower().replace(",", " ").split()
    return "all" not in low and "none" not in low


def rotating_count(options: dict[str, str]) -> int:
    """How many leading options (A, B, ...) take part in the rotation."""
    n = 0
    while n < len(string.ascii_uppercase) and string.ascii_uppercase[n] in options:
        n += 1
    while n > 2 and not _can_move_last(options[string.ascii_uppercase[n - 1]], n):
        n -= 1
    return n


def _rotate(item: EvalItem, k: int, n: int, offset: int) -> EvalItem:
    letters = string.ascii_uppercase[:n]
    # Rotation k moves the option at letter i to letter i+k (VLMEvalKit's map 'ABCD' -> 'BCDA' for k=1).
    move = {letters[i]: letters[(i + k) % n] for i in range(n)}
    options = {move.get(c, c): t for c, t in item.options.items()}
    options = dict(sorted(options.items()))
    answer = move.get(item.answer, item.answer) if item.answer is not None else None
    index = item.index + k * offset
    raw = {**item.raw, **options, "index": str(index), "answer": answer or "", "g_index": str(item.index)}
    return replace(item, index=index, options=options, answer=answer, g_index=item.index, raw=raw)


def circular_expand(items: Iterable[EvalItem], offset: int | None = None) -> list[EvalItem]:
    """Each item followed by its rotations k = 1..n-1, with index = orig + k*offset and g_index = orig.

    The offset is 1e6, multiplied by 10 while any index reaches it. Options before a fixed last option
    rotate among themselves (see `rotating_count`); items with fewer than 2 options are not rotated.
    Unlike VLMEvalKit, which asserts at most 4 options, any number of options rotates. Images are
    shared with the original, as VLMEvalKit's rotated rows reference the original index.
    """
    items = list(items)
    for it in items:
        if not isinstance(it.index, int):
            raise DataError(f"circular_expand: index {it.index!r} is not an integer; circular groups need "
                            f"integer indices")
    if offset is None:
        offset = CIRCULAR_OFFSET
        while items and max(it.index for it in items) >= offset:
            offset *= 10
    out = []
    for it in items:
        out.append(replace(it, g_index=it.index))
        n = rotating_count(it.options)
        out.extend(_rotate(it, k, n, offset) for k in range(1, n))
    return out


@dataclass(frozen=True)
class Hit:
    """The score of one question (vanilla) or one circular group, with the reason in `log`."""

    item: EvalItem  # the question, or the group's unrotated question
    hit: int
    log: str


def _judge(item: EvalItem, prediction: str) -> tuple[bool, str | None]:
    if item.answer is None:
        raise DataError(f"index {item.index!r}: no answer to score against (a test split?)")
    choice = extract_choice(prediction, item.options)
    return choice == item.answer, choice


def vanilla_hits(records: Iterable[Record]) -> list[Hit]:
    """One hit per record: the extracted letter equals the answer."""
    hits = []
    for item, pred in records:
        ok, choice = _judge(item, pred)
        hits.append(Hit(item, int(ok), f"answer {item.answer}, extracted {choice}, prediction {pred!r}"))
    return hits


def _group_of(item: EvalItem) -> int:
    if item.g_index is not None:
        return item.g_index
    if not isinstance(item.index, int):
        raise DataError(f"index {item.index!r} is not an integer; circular scoring needs integer indices")
    return int(item.index % CIRCULAR_OFFSET)  # VLMEvalKit's default when there is no g_index column


def circular_hits(records: Iterable[Record]) -> list[Hit]:
    """One hit per group of rotations: 1 only if every rotation's extracted letter is its answer.

    Groups are keyed by g_index and reported in the order of their unrotated question; rotations
    whose unrotated question is absent are ignored, as in VLMEvalKit.
    """
    groups: dict[int, list[Record]] = {}
    for item, pred in records:
        groups.setdefault(_group_of(item), []).append((item, pred))
    hits = []
    for key, members in groups.items():
        main = [it for it, _ in members if it.index == key]
        if not main:
            continue
        hit, log = 1, f"all {len(members)} rotations correct"
        for k, (item, pred) in enumerate(sorted(members, key=lambda r: r[0].index)):
            ok, choice = _judge(item, pred)
            if not ok:  # early exit on the first miss, as VLMEvalKit does
                hit = 0
                log = (f"rotation {k} (index {item.index}): answer {item.answer}, extracted {choice}, "
                       f"prediction {pred!r}")
                break
        hits.append(Hit(main[0], hit, log))
    return hits


def accuracy_table(hits: Sequence[Hit]) -> dict[str, dict[str, float]]:
    """VLMEvalKit's `report_acc`: rows "Overall", then each l2-category, then each category (sorted, MMBench
    names abbreviated), columns per split ("none" when items carry no split). Empty cells are left out."""
    def split_of(h: Hit) -> str:
        return h.item.split if h.item.split is not None else "none"

    splits = sorted({split_of(h) for h in hits})

    def row(sel: list[Hit]) -> dict[str, float]:
        out = {}
        for sp in splits:
            vals = [h.hit for h in sel if split_of(h) == sp]
            if vals:
                out[sp] = sum(vals) / len(vals)
        return out

    table = {"Overall": row(list(hits))}
    for attr in ("l2_category", "category"):
        names = sorted({getattr(h.item, attr) for h in hits} - {None})
        for name in names:
            table[MMB_ABBRS.get(name, name)] = row([h for h in hits if getattr(h.item, attr) == name])
    return table


def vanilla_score(records: Iterable[Record]) -> dict:
    """{"hits": per-record hits, "accuracy": overall fraction, "table": accuracy_table}."""
    hits = vanilla_hits(records)
    return {"hits": hits, "accuracy": _mean(hits), "table": accuracy_table(hits)}


def circular_score(records: Iterable[Record]) -> dict:
    """{"hits": per-group hits, "accuracy": overall fraction, "table": accuracy_table}."""
    hits = circular_hits(records)
    return {"hits": hits, "accuracy": _mean(hits), "table": accuracy_table(hits)}


def mcq_report(records: Iterable[Record]) -> dict:
    """Both scores on one prediction set: vanilla over the unrotated questions only, circular over groups,
    so the two numbers describe the same questions."""
    records = list(records)
    originals = [(it, p) for it, p in records if not isinstance(it.index, int) or it.index == _group_of(it)]
    return {"vanilla": vanilla_score(originals), "circular": circular_score(records)}


def _mean(hits: Sequence[Hit]) -> float:
    return sum(h.hit for h in hits) / len(hits) if hits else 0.0
