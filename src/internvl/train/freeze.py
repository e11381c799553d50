"""Which parameters train: the reference knobs (freeze_backbone / freeze_mlp / freeze_llm, unfreeze_vit_layers,
unfreeze_lm_head) combined with LoRA.

With LoRA on a part, that part's base weights are frozen and only its LoRA weights train, as the reference's
PEFT wrapping does; parts without LoRA follow their freeze flags (the reference LoRA recipe trains the
projector in full). `unfreeze_lm_head` really unfreezes lm_head (the reference sets an attribute on the
module instead, a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import TrainingError
from .lora import add_lora, is_lora_param, lora_config


@dataclass(frozen=True)
class TuneSpec:
    freeze_vision: bool = False
    freeze_mlp: bool = False
    freeze_llm: bool = False
    unfreeze_vit_layers: int = 0  # layers[k:] train; negative = the last |k|
    unfreeze_lm_head: bool = False
    lora_r: int = 0  # language model
    vision_lora_r: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.05

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0 or self.vision_lora_r > 0


def configure_trainable(model: nn.Module, spec: TuneSpec):
    """Inject LoRA when asked and set `requires_grad` on every parameter. Returns the LoRA config or None."""
    n_vit = len(model.vision_model.encoder.layers)
    if not -n_vit <= spec.unfreeze_vit_layers <= n_vit:
        raise TrainingError(f"unfreeze_vit_layers {spec.unfreeze_vit_layers} is out of range for a "
                            f"{n_vit}-layer vision encoder")  # fmt: skip
    if spec.vision_lora_r > 0 and spec.unfreeze_vit_layers:
        raise TrainingError("vision LoRA and unfreeze_vit_layers cannot be combined (a LoRA adapter cannot "
                            "store vision layers that are also trained in full)")  # fmt: skip
    config = None
    if spec.uses_lora:
        config = lora_config(spec.lora_r, spec.vision_lora_r, spec.lora_alpha, spec.lora_dropout)
        add_lora(model, config)
    k = spec.unfreeze_vit_layers
    vit_from = n_vit if k == 0 else (k if k > 0 else n_vit + k)
    for name, p in model.named_parameters():
        p.requires_grad_(_trainable(name, spec, vit_from))
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("nothing to train: every parameter is frozen")
    return config


def _trainable(name: str, spec: TuneSpec, vit_from: int) -> bool:
    if is_lora_param(name):
        return True
    if name.startswith("vision_model."):
        if name.startswith("vision_model.encoder.layers.") and int(name.split(".")[3]) >= vit_from:
            return True
        return not spec.freeze_vision and spec.vision_lora_r <= 0
    if name.startswith("mlp1."):
        return not spec.freeze_mlp
    if name.startswith("language_model.lm_head.") and spec.unfreeze_lm_head:
        return True
    return not spec.freeze_llm and spec.lora_r <= 0


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
