"""Circular evaluation (MMBench): every question asked once per rotation of its options, and scoring.

VLMEvalKit's MMBench files already hold the rotated copies (index = base + k * 1e6); their groups are read as
`mcq_circular_eval` reads them (g_index, else index % 1e6). Files without copies are expanded here by the rule
of VLMEvalKit's `CIRCULAR` tool (vlmeval/tools.py, February 2025 on). Scoring mirrors `mcq_circular_eval`,
`mcq_vanilla_eval` and `report_acc` (vlmeval/dataset/utils/multiple_choice.py) under exact matching.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from internvl.errors import DataError
from internvl.eval.extract import extract_choice
from internvl.eval.items import EvalItem

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


def _words(text: str) -> list[str]:
    # the tool's `proc_str`: every character but an ASCII letter or a space becomes a space
    return "".join(c if c in string.ascii_letters or c == " " else " " for c in text).split()


def rotation_count(item: EvalItem) -> int:
    """How many copies the tool makes of an item: one per option (A..), or 1 (kept as is) for what it calls
    an abnormal entry: an option text naming two or more option letters ("A and B", "Both A, C"), an option
    text that is a run of capital letters (`text in string.ascii_uppercase`, e.g. "B" or "CD"), fewer than two
    options, or an answer that is not one of them. Options must be consecutive letters from A."""
    letters = list(item.options)
    n = len(letters)
    if letters != list(string.ascii_uppercase[:n]):
        raise DataError(f"index {item.index!r}: options {', '.join(letters)} are not consecutive letters from A; "
                        f"circular evaluation cannot rotate them")  # fmt: skip
    for text in item.options.values():
        if len({w for w in _words(text) if w in item.options}) > 1 or text in string.ascii_uppercase:
            return 1
    return n if n >= 2 and item.answer in item.options else 1


def _rotate(item: EvalItem, k: int, n: int, offset: int) -> EvalItem:
    # The tool's k-th `deque.rotate(1)`: the option at letter j moves to letter j - k (k=1: 'BCDA' -> 'ABCD').
    letters = string.ascii_uppercase[:n]
    options = {letters[j]: item.options[letters[(j + k) % n]] for j in range(n)}
    answer = letters[(letters.index(item.answer) - k) % n]
    index = item.index + k * offset
    raw = {**item.raw, **options, "index": str(index), "answer": answer, "g_index": str(item.index)}
    return replace(item, index=index, options=options, answer=answer, g_index=item.index, raw=raw)


def group_of(item: EvalItem) -> int | str:
    """The circular group of an item: its g_index, else index % 1e6 (VLMEvalKit's default)."""
    if item.g_index is not None:
        return item.g_index
    if not isinstance(item.index, int):
        raise DataError(f"index {item.index!r} is not an integer; circular scoring needs integer indices")
    return int(item.index % CIRCULAR_OFFSET)


def has_copies(items: Iterable[EvalItem]) -> bool:
    """Whether a file already holds rotated copies (some row's group is not its own index), as MMBench's do."""
    return any(isinstance(it.index, int) and group_of(it) != it.index for it in items)


def circular_expand(items: Iterable[EvalItem], offset: int | None = None) -> list[EvalItem]:
    """Each item followed by its rotations k = 1..n-1, with index = orig + k*offset and g_index = orig.

    The offset is 1e6, multiplied by 10 while any index reaches it, as in the tool. Abnormal entries (see
    `rotation_count`) are kept once. Images are shared with the original, as the tool's rotated rows
    reference the original index. A file that already holds copies (`has_copies`) is not expanded again.
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
        n = rotation_count(it)
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


def circular_hits(records: Iterable[Record]) -> list[Hit]:
    """One hit per group of rotations: 1 only if every rotation's extracted letter is its answer.

    Groups are keyed by g_index and reported in the order of their unrotated question; rotations
    whose unrotated question is absent are ignored, as in VLMEvalKit.
    """
    groups: dict[int, list[Record]] = {}
    for item, pred in records:
        groups.setdefault(group_of(item), []).append((item, pred))
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


def mcq_report(records: Iterable[Record], circular: bool = True) -> dict:
    """Both scores on one prediction set: vanilla over the unrotated questions only, circular over groups,
    so the two numbers describe the same questions. Not circular: vanilla over every record, as VLMEvalKit's
    `mcq_vanilla_eval` scores every row whatever its index."""
    records = list(records)
    if not circular:
        return {"vanilla": vanilla_score(records), "circular": None}
    originals = [(it, p) for it, p in records if not isinstance(it.index, int) or it.index == group_of(it)]
    return {"vanilla": vanilla_score(originals), "circular": circular_score(records)}


def _mean(hits: Sequence[Hit]) -> float:
    return sum(h.hit for h in hits) / len(hits) if hits else 0.0
