"""Best-of-N: sample N answers, keep the one a reward model scores highest (VisualPRM's test-time scaling), against
greedy decoding, majority vote over the final answers and an outcome-only reward, on a synthetic split."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling import SamplingParams, seed_of
from ..errors import DataError
from ..eval.tasks import markdown, pct
from .score import AGGREGATES, aggregate

METHODS = ("greedy", "sample", "majority", "orm", "prm", "pass")
LABELS = {"greedy": "greedy", "sample": "one sample", "majority": "majority@{n}", "orm": "ORM-BoN@{n}",
          "prm": "PRM-BoN@{n} ({agg})", "pass": "pass@{n}"}  # fmt: skip


def best_index(scores: Sequence[float]) -> int:
    """The highest score's index; the earliest on ties."""
    if not scores:
        raise DataError("no candidates to choose from")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def majority_index(answers: Sequence[Any]) -> int:
    """A candidate whose final answer (None: none found) is the most common; ties go to the answer seen first,
    and with no answer at all, to the first candidate."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


@dataclass
class BestOf:
    answer: str
    candidates: list[str]
    scores: list[float]
    step_scores: list[list[float]] = field(default_factory=list)


def best_of(policy, prm, question: str, images: Any = None, n: int = 8, aggregate_by: str = "mean", seed: int = 0,
            temperature: float = 0.7, top_k: int = 50, max_new_tokens: int = 512, **generation: Any) -> BestOf:  # fmt: skip
    """`n` seeded samples of `policy` (an `internvl.load` model) ranked by `prm` (a `PRM`): the best answer, the
    candidates, their scores (step scores aggregated by mean, sum, min or last) and their step scores."""
    candidates = policy.samples(question, images, n=n, seed=seed, temperature=temperature, top_k=top_k,
                                max_new_tokens=max_new_tokens, **generation)  # fmt: skip
    steps = prm.score_steps(question, candidates, images)
    scores = [aggregate(s, aggregate_by) for s in steps]
    return BestOf(candidates[best_index(scores)], candidates, scores, steps)



@dataclass
class BonOptions:
    n: int = 8
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    aggregate: str = "mean"
    batch_size: int = 16  # generation requests in the engine at once
    max_num: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.temperature <= 0 or self.batch_size < 1:
            raise DataError("best-of-N needs --n >= 1, a positive --temperature and --batch-size >= 1")
        if self.aggregate not in AGGREGATES:
            raise DataError(f"unknown aggregation {self.aggregate!r}; expected one of: {', '.join(AGGREGATES)}")


def generate(policy, examples, o: BonOptions) -> list[tuple[str, list[str]]]:
    """(greedy answer, N samples) of every example, through the engine in batches of `batch_size` requests."""
    requests = []
    for ex in examples:
        ids, pv, _ = policy.prepare(ex.prompt, ex.images or None, max_num=o.max_num)
        requests.append((ids, SamplingParams(max_new_tokens=o.max_new_tokens), pv))
        for k in range(o.n):
            params = SamplingParams(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k,
                                    top_p=o.top_p, seed=seed_of(o.seed, ex.key, k))  # fmt: skip
            requests.append((ids, params, pv))
    texts = []
    for start in range(0, len(requests), o.batch_size):
        texts += [c.text.strip() for c in policy.detok.generate(requests[start : start + o.batch_size])]
    per = o.n + 1
    return [(texts[i * per], texts[i * per + 1 : (i + 1) * per]) for i in range(len(examples))]


def _key(extracted: Any) -> Any:
    return None if extracted is None else json.dumps(extracted, sort_keys=True)


def judge_item(part, ex, greedy: str, samples: list[str], prm_steps, orm_scores, agg: str) -> dict:
    """Which answer each method keeps for one item, and whether it is right (`part.judge`: the benchmark's metric)."""
    judged = [part.judge(ex, s) for s in samples]
    hits = [j["hit"] for j in judged]
    picks = {f"prm_{a}": best_index([aggregate(s, a) for s in prm_steps]) for a in AGGREGATES}
    picks.update(majority=majority_index([_key(j["extracted"]) for j in judged]), orm=best_index(orm_scores))
    out = {"key": ex.key, "greedy": part.judge(ex, greedy)["hit"], "sample": sum(hits) / len(hits),
           "pass": int(any(hits)), **{m: hits[i] for m, i in picks.items()}, "prm": hits[picks[f"prm_{agg}"]]}  # fmt: skip
    out["answers"] = {"greedy": greedy, "samples": samples, "prm_steps": prm_steps, "orm": orm_scores}
    return out


def run_bon(policy, prm, orm, task, o: BonOptions, progress: bool = False) -> dict:
    """Best-of-N on a `SyntheticTask` (eval/synthetic.py): per task, the accuracy of every method. `orm`: an
    outcome reward model (a `PRM` scoring the whole answer as one step); None scores the same way with `prm`."""
    from tqdm import tqdm

    orm = orm or prm
    summary: dict = {"n": o.n, "aggregate": o.aggregate, "tasks": {}, "items": []}
    for name, part in task.parts.items():
        if name == "mc":
            raise DataError("best-of-N runs on the free-answer tasks; the mc task has no steps to score")
        start = time.perf_counter()
        drawn = generate(policy, part.examples, o)
        sampled = time.perf_counter() - start
        items = []
        for ex, (greedy, samples) in tqdm(list(zip(part.examples, drawn)), desc=f"bon {name}", unit="item",
                                          disable=not progress):  # fmt: skip
            images = ex.images or None
            steps = prm.score_steps(ex.prompt, samples, images, max_num=o.max_num)
            outcome = [s[0] for s in orm.score_steps(ex.prompt, samples, images, max_num=o.max_num, orm=True)]
            items.append(judge_item(part, ex, greedy, samples, steps, outcome, o.aggregate) | {"task": name})
        acc = {m: sum(i[m] for i in items) / len(items) for m in [*METHODS, *(f"prm_{a}" for a in AGGREGATES)]}
        summary["tasks"][name] = {"items": len(items), "accuracy": acc, "sample_seconds": round(sampled, 1),
                                  "score_seconds": round(time.perf_counter() - start - sampled, 1)}  # fmt: skip
        summary["items"] += items
    return summary


def bon_table(summary: dict) -> str:
    """Markdown: accuracy (%) of every method by task."""
    n, agg = summary["n"], summary["aggregate"]
    head = ["task", "items", *(LABELS[m].format(n=n, agg=agg) for m in METHODS)]
    rows = [[name, t["items"], *(pct(t["accuracy"][m]) for m in METHODS)] for name, t in summary["tasks"].items()]
    return markdown(head, rows)
