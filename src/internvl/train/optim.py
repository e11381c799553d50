"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule (warmup + cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:  # fmt: skip
    """AdamW over the trainable parameters; biases, norms, layer scales and other 1-D weights get no decay
    (as the transformers Trainer's grouping)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def warmup_steps(total: int, ratio: float, steps: int) -> int:
    """Explicit steps win; a ratio rounds up, as transformers does."""
    return steps if steps > 0 else math.ceil(total * ratio)


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """Multiplier of the peak rate for optimizer step `step` (0-based), as transformers'
    `get_cosine_schedule_with_warmup`: linear from 0 over `warmup` steps, then half a cosine to 0."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
