"""Step scores from a process reward model: p(+) from the softmax over the `+` and `-` logits at every answer slot,
all steps of a solution in one forward pass (the reference `generate_steps_with_soft_score_v2`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InternVLError
from .prompt import MINUS, PLUS, PRM_SYSTEM_PROMPT, answer_slots, prm_conversation, split_steps

AGGREGATES = ("mean", "sum", "min", "last")


def aggregate(scores: Sequence[float], how: str = "mean") -> float:
    """A solution's score from its step scores: mean (the reference's soft scoring), sum (its hard scoring), min
    (the weakest step) or last (the final step alone, an outcome-only reading)."""
    if not scores:
        raise InternVLError("no step scores to aggregate")
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "sum":
        return float(sum(scores))
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    raise InternVLError(f"unknown aggregation {how!r}; expected one of: {', '.join(AGGREGATES)}")


def plus_probability(logits: torch.Tensor, plus_id: int, minus_id: int) -> torch.Tensor:
    """p(+) at each row of `logits` [..., vocab]: the softmax over the two logits of `+` and `-` only."""
    pair = logits[..., [plus_id, minus_id]].float()
    return pair.softmax(dim=-1)[..., 0]


class PRM:
    """A loaded InternVL model (`internvl.load`) used as a process reward model.

    `system_message`: the system prompt the PRM was trained with (default: the official one); `max_steps` merges
    longer solutions as the reference does; `batch_size`: candidates in one forward pass."""

    def __init__(self, model, system_message: str | None = PRM_SYSTEM_PROMPT, max_steps: int | None = None,
                 batch_size: int = 8):  # fmt: skip
        self.model, self.system_message, self.max_steps, self.batch_size = model, system_message, max_steps, batch_size
        tok = model.tokenizer
        self.plus_id, self.minus_id = tok.require(PLUS), tok.require(MINUS)
        self.template = model.template.name
        self.pad_id = next(i for i in (tok.eos_id, 0, 1) if i is not None and i != tok.image_context_id)

    def encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text, add_special_tokens=False)

    def inputs(self, question: str, steps: Sequence[str], images: Any = None, max_num: int | None = None):
        """(prompt ids, pixel values, answer positions) of one solution given as its steps."""
        turns = prm_conversation(question, steps, image=images is not None)
        ids, pv, _ = self.model.prepare(turns[-1][0], images, history=turns[:-1], system_message=self.system_message,
                                        max_num=max_num)  # fmt: skip
        slots = answer_slots(ids, self.template, self.encode)
        if len(slots) != len(steps):
            raise InternVLError(f"the PRM prompt has {len(slots)} answer slots for {len(steps)} steps: the "
                                f"{self.template!r} template's `+` answers do not tokenize on their own")  # fmt: skip
        return ids, pv, slots

    @torch.inference_mode()
    def score_steps(self, question: str, solutions: Sequence[str | Sequence[str]], images: Any = None,
                    max_num: int | None = None, orm: bool = False) -> list[list[float]]:  # fmt: skip
        """p(+) of every step of every solution (a text, split by `split_steps`, or a list of steps) to one question
        about `images`. `orm`: the whole text is one step (the reference's ORM layout), one score per solution."""
        step_lists = []
        for s in solutions:
            if orm:
                step_lists.append([s if isinstance(s, str) else "\n".join(s)])
            else:
                step_lists.append(split_steps(s, self.max_steps) if isinstance(s, str) else list(s))
        built = [self.inputs(question, steps, images, max_num) for steps in step_lists]
        model = self.model.model
        device = model.device
        embeds = None
        if built and built[0][1] is not None:  # every candidate shows the same image: encode it once
            embeds = model.extract_feature(built[0][1].to(device))
        out = []
        for start in range(0, len(built), self.batch_size):
            chunk = built[start : start + self.batch_size]
            width = max(len(ids) for ids, _, _ in chunk)
            # right padding: causal attention keeps every real position's logits as without it
            rows = [ids + [self.pad_id] * (width - len(ids)) for ids, _, _ in chunk]
            ids = torch.tensor(rows, dtype=torch.long, device=device)
            image_embeds = None if embeds is None else embeds.repeat(len(chunk), *([1] * (embeds.dim() - 1)))
            logits = model(ids, image_embeds=image_embeds).logits
            for b, (_, _, slots) in enumerate(chunk):
                out.append(plus_probability(logits[b, slots], self.plus_id, self.minus_id).tolist())
        return out

    def score(self, question: str, solutions: Sequence[str], images: Any = None, aggregate_by: str = "mean",
              max_num: int | None = None, orm: bool = False) -> list[float]:  # fmt: skip
        """One score per solution: its step scores aggregated (`aggregate`)."""
        return [aggregate(s, aggregate_by) for s in self.score_steps(question, solutions, images, max_num, orm)]
