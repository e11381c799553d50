"""The MPO losses (arXiv 2411.10442) per pair, the running BCO reward shift, and the run's preference settings:
loss = w1 * DPO sigmoid + w2 * BCO pair + w3 * NLL on the chosen answers (0.8 / 0.2 / 1.0, beta 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import TrainingError

LOSSES = ("sigmoid", "bco_pair", "nll")  # the order of --loss-weights


@dataclass
class MPOArgs:
    """The preference part of an MPO run (the rest is a `TrainArgs`)."""

    beta: float = 0.1
    loss_weights: tuple[float, float, float] = (0.8, 0.2, 1.0)  # DPO sigmoid, BCO pair, NLL on chosen

    def __post_init__(self) -> None:
        w = self.loss_weights
        if isinstance(w, str):
            w = w.split(",")
        try:
            w = tuple(float(x) for x in w)
        except (TypeError, ValueError):
            raise TrainingError(
                f"loss_weights must be three numbers W1,W2,W3, got {self.loss_weights!r}"
            ) from None
        if len(w) != len(LOSSES) or any(x < 0 or not math.isfinite(x) for x in w) or not any(w):
            raise TrainingError(f"loss_weights must be three non-negative numbers (for {', '.join(LOSSES)}), "
                                f"not all 0, got {self.loss_weights!r}")  # fmt: skip
        self.loss_weights = w
        if not (isinstance(self.beta, (int, float)) and self.beta > 0 and math.isfinite(self.beta)):
            raise TrainingError(f"beta must be a positive number, got {self.beta!r}")
        self.beta = float(self.beta)


# ---- the losses, per pair ---------------------------------------------------------------------------


def sigmoid_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta * ((pc - pr) - (rc - rr))); p* policy, r* reference log-probs of chosen / rejected."""
    return -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))


def bco_pair_loss(pc, pr, rc, rr, beta: float, delta) -> torch.Tensor:
    """BCO pair: -log sigmoid(beta (pc - rc) - delta) - log sigmoid(-(beta (pr - rr) - delta))."""
    return -F.logsigmoid(beta * (pc - rc) - delta) - F.logsigmoid(-(beta * (pr - rr) - delta))


def nll_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every chosen answer token of the micro-batch, one mean (TRL's "sft" term, `rpo_alpha`
    before it): sum of the chosen log-prob sums over the number of their tokens, not a mean of per-pair means."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


class RunningMean:
    """The mean of TRL's `RunningMoments`, the BCO reward shift delta: each update brings the batch means of
    `n` ranks (their sum), so delta is the average of every batch mean seen so far, counted from 1e-24."""

    def __init__(self, mean: float = 0.0, count: float = 1e-24):
        self.mean, self.count = mean, count

    def update(self, total, n):
        """Add `n` batch means whose sum is `total` (tensors or floats); returns the new mean."""
        count = self.count + n
        self.mean = self.mean + (total - n * self.mean) / count  # mean += (total / n - mean) * n / count
        self.count = count
        return self.mean

    def state(self) -> dict:
        return {"mean": float(self.mean), "count": float(self.count)}
