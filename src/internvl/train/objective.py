"""Training objectives: what the loop minimizes, as a pluggable piece (SFT here; MPO plugs in the same way).

An objective returns the *sum* of its per-item losses over a micro-batch and says how much normalizer mass
the micro-batch carries; the loop divides by the mass of the whole global batch (all micro-steps, all ranks).
The loss of a step is therefore independent of how the global batch is split over ranks and accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .collate import Batch

REDUCTIONS = ("token", "sample", "square")


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # scalar, differentiable: sum of weighted per-item losses of the micro-batch
    # extra metrics as (sum, count) pairs; the loop reports sum over the step / count over the step
    metrics: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)


class Objective:
    """Base class. Subclasses implement `normalizer` and `__call__`; `setup` runs once before training."""

    name = "objective"

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Prepare extra state (e.g. a frozen reference model for preference optimization)."""

    def normalizer(self, batch: Batch) -> float:
        """The micro-batch's share of the denominator (host-side, from the collated batch)."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        raise NotImplementedError


def sample_weight(n: int, reduction: str) -> float:
    """Per-token weight of a sample with n supervised tokens: 1, 1/n or 1/sqrt(n) (0 when n == 0)."""
    if n == 0:
        return 0.0
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / n
    if reduction == "square":
        return 1.0 / math.sqrt(n)
    raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")


class SFTObjective(Objective):
    """Next-token cross-entropy on the assistant tokens: loss = sum(w * CE) / sum(w) over the global batch,
    w = 1 (token), 1/n_i (sample) or 1/sqrt(n_i) (square; InternVL 2.5+), n_i = supervised tokens of sample i."""

    name = "sft"

    def __init__(self, reduction: str = "square"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def normalizer(self, batch: Batch) -> float:
        return sum(n * sample_weight(n, self.reduction) for n in batch.sample_tokens)

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(batch.input_ids, pixel_values=batch.pixel_values, positions=batch.positions,
                    image_flags=batch.image_flags, seq_ids=batch.seq_ids)  # fmt: skip
        logits = out.logits.flatten(0, 1).index_select(0, batch.sup_index).float()
        targets = batch.targets.flatten().index_select(0, batch.sup_index)
        ce = F.cross_entropy(logits, targets, reduction="none")
        per_sample = [sample_weight(n, self.reduction) for n in batch.sample_tokens]
        weights = torch.tensor(per_sample, dtype=torch.float32).to(ce.device, non_blocking=True)
        w = weights[batch.sup_sample] if per_sample else ce.new_zeros(0)
        loss_sum = (ce * w).sum()
        if ce.numel() == 0:  # nothing to learn here: keep every parameter in the graph with a zero loss
            loss_sum = out.logits.sum() * 0.0
        return ObjectiveOutput(loss_sum, {"token_ce": (ce.detach().sum(), float(ce.numel()))})
