"""Preference pairs from a model's own samples: the MMPR data pipeline of MPO (arXiv 2411.10442).

For every question of a fine-tuning meta file the model answers N times (seeded sampling, batched through the
engine). Each answer is judged against the row's gold answer:
  - correctness pairs: a correct answer (chosen) against a wrong one (rejected), up to K distinct pairs per
    question, drawn at random from all (correct, wrong) combinations;
  - truncation pairs (Dropout-NTP): a correct answer cut after `truncate_ratio` of its words is continued by
    the same model WITHOUT the image; a continuation that is wrong (always, for a question whose answers cannot
    be checked) is rejected against the full answer.
Questions whose gold answer cannot be checked (long free-form text) use the model's own answers as chosen.

    OUT/pairs.jsonl   MMPR rows {image | video, question, chosen, rejected, kind, task, answer, source}
    OUT/meta.json     {name: {root, annotation, ...}}, root relative to OUT (the synthetic writer's layout)
    OUT/summary.json  questions, samples, correct rate, pairs by kind
    OUT/state.json    progress, so that an interrupted run continues with `resume`
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..engine.sampling import seed_of
from ..errors import DataError
from ..train.data import build_index, read_meta

SHORT_ANSWER_WORDS = 10  # a gold answer without "Answer:" is checked by exact match up to this many words
_FINAL = re.compile(r"answer:\s*(.*)", re.IGNORECASE)
_MEDIA = re.compile(r"(?:(?:Image|Frame)-?\d+:\s*)?<(?:image|video)>\n?")
KINDS = ("correctness", "truncation")


@dataclass
class PrefOptions:
    n: int = 8  # answers sampled per question
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 256
    pairs_per_question: int = 4  # correctness pairs
    truncate_ratio: float = 0.5
    truncations_per_question: int = 1  # correct answers cut and continued without the image
    tasks: list[str] | None = None  # keep rows whose "task" is one of these
    limit: int | None = None  # the first N questions
    seed: int = 0
    batch_size: int = 16  # requests per engine batch (questions per chunk: batch_size / n)

    def __post_init__(self) -> None:
        checks = [(self.n >= 1, f"--n must be at least 1, got {self.n}"),
                  (self.temperature > 0, f"--temperature must be positive to sample, got {self.temperature}"),
                  (self.pairs_per_question >= 0, "--pairs-per-question must be >= 0"),
                  (self.truncations_per_question >= 0, "--truncations-per-question must be >= 0"),
                  (0 < self.truncate_ratio < 1, f"--truncate-ratio must be in (0, 1), got {self.truncate_ratio}"),
                  (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
                  (self.batch_size >= 1, "--batch-size must be at least 1")]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise DataError(message)


@dataclass
class Question:
    """The first question of a fine-tuning row and its gold answer; media paths are absolute."""

    index: int
    source: str  # file:line
    text: str
    gold: str
    task: str | None = None
    row: dict = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    video: str | None = None


# ---- reading and judging ----------------------------------------------------------------------------


def read_questions(meta: str, tasks: Sequence[str] | None = None, limit: int | None = None):
    """(questions, dataset roots) of a fine-tuning meta file; bad rows raise `DataError` naming `file:line`."""
    specs = read_meta(meta)
    index = build_index(specs)
    out, seen = [], set()
    for i in range(len(index)):
        key = (int(index.ds[i]), int(index.line[i]))
        if key in seen:  # repeat_time > 1: ask each row once
            continue
        seen.add(key)
        row, spec, source = index.read(i)
        if tasks and row.get("task") not in tasks:
            continue
        human = next(t["value"] for t in row["conversations"] if t["from"] == "human")
        gold = next(t["value"] for t in row["conversations"] if t["from"] == "gpt")
        image = row.get("image") or []
        images = [os.path.join(spec.root, p) for p in ([image] if isinstance(image, str) else image)]
        video = os.path.join(spec.root, row["video"]) if row.get("video") else None
        out.append(Question(len(out), source, human, gold, row.get("task"), row, images, video))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{meta}: no questions" + (f" of task(s) {', '.join(tasks)}" if tasks else ""))
    return out, [s.root for s in specs]


def final_answer(text: str) -> str | None:
    """The text after the last "Answer:" ("Final Answer:" too), up to the end of its line."""
    found = _FINAL.findall(text)
    return found[-1].strip() if found else None


def _norm(text: str) -> str:
    text = " ".join(text.split())
    return text[:-1].rstrip().casefold() if text.endswith(".") else text.casefold()


def judge(answer: str, q: Question) -> bool | None:
    """True / False against the gold answer; None when the gold answer cannot be checked (free-form text).
    Synthetic rows use their task's metric; others compare the "Answer:" parts, else the whole answers."""
    from ..eval.synth_scoring import score
    from ..synth import TASKS

    if q.task in TASKS and isinstance(q.row.get("meta"), dict) and "answer" in q.row["meta"]:
        return score(q.task, answer, q.row)
    gold = final_answer(q.gold)
    if gold is not None:
        got = final_answer(answer)
        return got is not None and _norm(got) == _norm(gold)
    if len(q.gold.split()) <= SHORT_ANSWER_WORDS:
        return _norm(answer) == _norm(q.gold)
    return None


def truncate(answer: str, ratio: float) -> str:
    """The first `ratio` of the answer's words (split on spaces, as the reference), or "" when too short."""
    words = answer.split(" ")
    return " ".join(words[: int(len(words) * ratio)]).strip()


def without_media(question: str) -> str:
    """The question with its image / video placeholders (and their "Image-1: " labels) removed."""
    return _MEDIA.sub("", question).strip()


def _unique(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t.strip()))



# ---- sampling ---------------------------------------------------------------------------------------


class Sampler:
    """Seeded, batched generation from an `internvl.api.InternVL`: answers with the media, and continuations
    of an answer prefix without them."""

    def __init__(self, model, max_num: int | None = None):
        self.model, self.max_num = model, max_num

    def _params(self, o: PrefOptions, seed: int):
        from ..engine.sampling import SamplingParams

        return SamplingParams(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k,
                              top_p=o.top_p, seed=seed)  # fmt: skip

    def answers(self, requests: list[tuple[Question, int]], o: PrefOptions) -> list[str]:
        """One sampled answer per (question, seed)."""
        prompts = {}
        batch = []
        for q, seed in requests:
            if q.index not in prompts:
                prompts[q.index] = self.model.prepare(
                    q.text, q.images or None, video=q.video, max_num=self.max_num
                )
            ids, pv, _ = prompts[q.index]
            batch.append((ids, self._params(o, seed), pv))
        return [s.text.strip() for s in self.model.detok.generate(batch)]

    def continuations(self, requests: list[tuple[Question, str, int]], o: PrefOptions) -> list[str]:
        """The text that follows `prefix` in the assistant turn, asked without any image or video."""
        batch = []
        for q, prefix, seed in requests:
            ids, _, _ = self.model.prepare(without_media(q.text))
            ids = ids + self.model.tokenizer.encode(prefix, add_special_tokens=False)
            batch.append((ids, self._params(o, seed), None))
        return [s.text.rstrip() for s in self.model.detok.generate(batch)]


# ---- pairs ------------------------------------------------------------------------------------------


def correctness_pairs(correct: Sequence[str], wrong: Sequence[str], k: int, rng: random.Random):
    """Up to k distinct (chosen, rejected) pairs drawn from all (correct, wrong) combinations."""
    combos = [(c, w) for c in _unique(correct) for w in _unique(wrong) if c != w]
    return rng.sample(combos, min(k, len(combos)))


def build_chunk(questions: list[Question], sampler: Sampler, o: PrefOptions, stats: dict) -> list[dict]:
    """Sample, judge and pair a few questions (one engine batch for the answers, one for the continuations)."""
    texts = sampler.answers([(q, seed_of(o.seed, q.index, "a", k)) for q in questions for k in range(o.n)], o)
    plans, cuts = [], []
    for j, q in enumerate(questions):
        answers = texts[j * o.n : (j + 1) * o.n]
        verdicts = [judge(a, q) for a in answers]
        checkable = verdicts[0] is not None
        correct = [a for a, v in zip(answers, verdicts) if v or v is None]
        wrong = [a for a, v in zip(answers, verdicts) if v is False]
        stats["sampled"] += len(answers)
        if checkable:
            stats["checkable"] += 1
            stats["judged"] += len(answers)
            stats["correct"] += len(correct)
            stats["all_correct"] += not wrong
            stats["all_wrong"] += not correct
        rng = random.Random(seed_of(o.seed, q.index, "pairs"))
        pairs = correctness_pairs(correct, wrong, o.pairs_per_question, rng) if checkable else []
        plans.append([(c, r, "correctness") for c, r in pairs])
        full = rng.sample(_unique(correct), min(o.truncations_per_question, len(_unique(correct))))
        cuts += [(j, a, prefix, checkable) for a in full if (prefix := truncate(a, o.truncate_ratio))]
    stats["truncations_tried"] += len(cuts)
    if cuts:
        requests = [
            (questions[j], prefix, seed_of(o.seed, questions[j].index, "t", a)) for j, a, prefix, _ in cuts
        ]
        for (j, chosen, prefix, checkable), cont in zip(cuts, sampler.continuations(requests, o)):
            rejected = prefix + cont
            if rejected.strip() != chosen.strip() and (
                not checkable or judge(rejected, questions[j]) is False
            ):
                plans[j].append((chosen, rejected, "truncation"))
    rows = []
    for q, plan in zip(questions, plans):
        stats["with_pairs"] += bool(plan)
        for k, (chosen, rejected, kind) in enumerate(plan):
            stats["pairs"][kind] += 1
            rows.append(_pair_row(q, chosen, rejected, kind, k))
    return rows


def _pair_row(q: Question, chosen: str, rejected: str, kind: str, k: int) -> dict:
    row: dict = {"id": f"{q.row.get('id', q.index)}_{kind[0]}{k}"}
    if q.images:
        row["image"] = q.images[0] if isinstance(q.row.get("image"), str) else list(q.images)
    if q.video:
        row["video"] = q.video
    row.update(question=q.text, chosen=chosen, rejected=rejected, kind=kind, task=q.task, answer=q.gold,
               source=q.source)  # fmt: skip
    if "meta" in q.row:
        row["meta"] = q.row["meta"]
    return row


# ---- the run ----------------------------------------------------------------------------------------


def _new_stats() -> dict:
    keys = ("questions", "checkable", "sampled", "judged", "correct", "all_correct", "all_wrong", "with_pairs",
            "truncations_tried")  # fmt: skip
    return {**dict.fromkeys(keys, 0), "pairs": dict.fromkeys(KINDS, 0)}


def summarize(stats: dict) -> dict:
    return {**stats, "correct_rate": round(stats["correct"] / stats["judged"], 4) if stats["judged"] else None,
            "total_pairs": sum(stats["pairs"].values())}  # fmt: skip


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_prefs(sampler: Sampler, meta: str, out: str, options: PrefOptions | None = None, resume: bool = False,
                progress: bool = False, log: Callable[[str], None] = print, questions=None) -> dict:  # fmt: skip
    """Write OUT/pairs.jsonl, OUT/meta.json and OUT/summary.json; returns the summary. `questions`: the
    result of `read_questions(meta, ...)` when the caller has it already."""
    o = options or PrefOptions()
    questions, roots = questions or read_questions(meta, o.tasks, o.limit)
    os.makedirs(out, exist_ok=True)
    pairs_path, state_path = os.path.join(out, "pairs.jsonl"), os.path.join(out, "state.json")
    settings = {**asdict(o), "data": os.path.abspath(meta)}
    done, stats = 0, _new_stats()
    state = None
    if resume and os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    if state is not None:
        if state["settings"] != settings:
            changed = next(k for k in settings if state["settings"].get(k) != settings[k])
            raise DataError(f"cannot resume {out}: {changed} was {state['settings'].get(changed)!r}, now "
                            f"{settings[changed]!r}")  # fmt: skip
        done, stats = state["done"], state["stats"]
        with open(pairs_path, "r+b") as f:
            f.truncate(state["bytes"])  # drop pairs written after the last recorded chunk
        log(f"resuming {out} after {done} of {len(questions)} questions")
    elif os.path.exists(pairs_path) and not resume:
        raise DataError(f"{pairs_path} already exists; pass --resume to continue or choose another --out")
    else:
        open(pairs_path, "w").close()
    base = os.path.commonpath([os.path.abspath(r) for r in roots])
    chunk = max(1, -(-o.batch_size // o.n))
    from tqdm import tqdm

    bar = tqdm(total=len(questions), initial=done, unit="question", desc="build-prefs", disable=not progress)
    while done < len(questions):
        part = questions[done : done + chunk]
        rows = build_chunk(part, sampler, o, stats)
        stats["questions"] += len(part)
        with open(pairs_path, "a") as f:
            f.writelines(json.dumps(_relative(row, base), separators=(",", ":")) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
        done += len(part)
        _write_json(state_path, {"done": done, "bytes": os.path.getsize(pairs_path), "stats": stats,
                                 "settings": settings})  # fmt: skip
        _write_meta(out, base, stats)
        bar.update(len(part))
        bar.set_postfix(
            correct=f"{summarize(stats)['correct_rate'] or 0:.2f}", pairs=sum(stats["pairs"].values())
        )
    bar.close()
    summary = summarize(stats)
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _relative(row: dict, base: str) -> dict:
    row = dict(row)
    rel = lambda p: os.path.relpath(p, base)
    if "image" in row:
        row["image"] = rel(row["image"]) if isinstance(row["image"], str) else [rel(p) for p in row["image"]]
    if "video" in row:
        row["video"] = rel(row["video"])
    return row


def _write_meta(out: str, base: str, stats: dict) -> None:
    entry = {"root": os.path.relpath(base, os.path.abspath(out)), "annotation": "pairs.jsonl", "data_augment": False,
             "repeat_time": 1, "length": sum(stats["pairs"].values())}  # fmt: skip
    _write_json(os.path.join(out, "meta.json"), {"prefs": entry})
