"""Sampling settings and the next-token samplers: one sequence at a time (repetition penalty, temperature,
top-k, top-p), or one argmax for a batch of plain greedy rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import InternVLError
from ..kernels.ops import argmax_rows


@dataclass
class SamplingParams:
    """How one request generates. temperature 0 (or do_sample False) is greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (text), not included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InternVLError(message)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits, so a batched argmax serves it."""
        return self.temperature == 0.0 and self.repetition_penalty == 1.0


# The keyword options the Python API takes (`model.chat(..., temperature=0.7)`); `do_sample` is transformers'.
OPTION_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
                         "min_new_tokens", "do_sample"})  # fmt: skip


def sampling_params(defaults: SamplingParams | None = None, **options: object) -> SamplingParams:
    """`defaults` with the keyword options that are not None applied, checked once. The transformers-style
    `do_sample=False` means greedy, `do_sample=True` without a temperature samples at 1."""
    unknown = set(options) - OPTION_KEYS
    if unknown:
        raise InternVLError(f"unknown generation option(s): {sorted(unknown)}; known: {sorted(OPTION_KEYS)}")
    base = dict(vars(defaults)) if defaults else {}
    do_sample = options.pop("do_sample", None)
    base.update({k: v for k, v in options.items() if v is not None})
    if do_sample is False:
        base["temperature"] = 0.0
    elif do_sample and not base.get("temperature"):
        base["temperature"] = 1.0
    return SamplingParams(**base)


def apply_repetition_penalty(logits: torch.Tensor, previous: list[int], penalty: float) -> torch.Tensor:
    """The CTRL rule as in transformers: divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0 or not previous:
        return logits
    idx = torch.tensor(sorted(set(previous)), device=logits.device)
    seen = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the first token always stays
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, previous: list[int],
                generator: torch.Generator | None, suppress: list[int] | None = None) -> int:  # fmt: skip
    """One token from 1-D logits for one sequence. `suppress` ids are excluded (e.g. stops before min tokens)."""
    logits = logits.float()
    if suppress:
        logits = logits.clone()
        logits[suppress] = float("-inf")
    logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy_batch(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of logits [B, vocab] (the first maximum), in one pass over the batch."""
    return argmax_rows(logits)


def seed_of(*parts) -> int:
    """A sampling seed that depends only on what is sampled (question, sample number), not on batching."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1
