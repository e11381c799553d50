"""LoRA training through PEFT: the reference targets, LoRA layers injected and merged back, adapters saved in PEFT's
format (reading and merging a saved adapter needs no PEFT: checkpoint/adapter.py).

Targets (alpha 2r, dropout 0.05 by default), as the reference `wrap_llm_lora` / `wrap_backbone_lora`:
    language model: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj
    vision encoder: attn.qkv, attn.proj, mlp.fc1, mlp.fc2
InternLM2's fused `attention.wqkv` / `feed_forward.w1..3` are split into the Qwen2/Llama names when a checkpoint
is loaded, so InternLM2 models get the same q/k/v/o/gate/up/down targets here (an adapter trained by the
reference on `wqkv` does not load onto this module tree).

Saved adapters are `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
(`base_model.model.<module>.lora_A.weight`); parameters trained in full alongside LoRA (the projector, for
example) are saved as PEFT `modules_to_save`, so `peft.PeftModel.from_pretrained(model, folder)` restores
everything, and so does `checkpoint.adapter.merge_adapter(model, folder)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint.adapter import ADAPTER_WEIGHTS, PREFIX
from ..errors import TrainingError

LLM_TARGETS = r"language_model\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
VISION_TARGETS = r"vision_model\.encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def lora_config(llm_r: int = 0, vision_r: int = 0, alpha: float | None = None, dropout: float = 0.05,
                modules_to_save: list[str] | None = None, base_model: str | None = None):  # fmt: skip
    """A `peft.LoraConfig` with rank `llm_r` on the language model and `vision_r` on the vision encoder."""
    from peft import LoraConfig

    if llm_r <= 0 and vision_r <= 0:
        raise TrainingError("LoRA needs a positive rank for the language model or the vision encoder")
    targets = [t for r, t in ((llm_r, LLM_TARGETS), (vision_r, VISION_TARGETS)) if r > 0]
    main_r = llm_r if llm_r > 0 else vision_r
    rank_pattern, alpha_pattern = {}, {}
    if llm_r > 0 and vision_r > 0 and vision_r != llm_r:
        rank_pattern[VISION_TARGETS] = vision_r
    if alpha is None and vision_r > 0 and llm_r > 0:
        alpha_pattern[VISION_TARGETS] = 2 * vision_r
    return LoraConfig(
        r=main_r, lora_alpha=alpha if alpha is not None else 2 * main_r, lora_dropout=dropout,
        target_modules="(" + "|".join(targets) + ")", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        modules_to_save=modules_to_save or None, base_model_name_or_path=base_model,
    )  # fmt: skip


def add_lora(model: nn.Module, config) -> None:
    """Inject the LoRA layers in place (the module tree keeps its names; only LoRA weights are trainable)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name


def full_modules(model: nn.Module) -> list[str]:
    """The smallest set of modules whose parameters are exactly the trainable non-LoRA ones (PEFT's
    `modules_to_save`). Raises when a trainable parameter sits in a module that also holds frozen or LoRA
    parameters, which a PEFT adapter cannot express."""
    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.named_parameters())
        if not any(p.requires_grad and not is_lora_param(prefix + n) for n, p in params):
            return
        if all(p.requires_grad and not is_lora_param(prefix + n) for n, p in params):
            out.append(prefix.rstrip("."))
            return
        for n, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                raise TrainingError(f"{prefix}{n} is trained in full inside a module with frozen or LoRA weights; "
                                    "a LoRA adapter cannot store it (freeze it or train without LoRA)")  # fmt: skip
        for n, child in module.named_children():
            visit(f"{prefix}{n}.", child)

    visit("", model)
    return out


def adapter_tensors(state: dict[str, torch.Tensor], modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """Trainable weights (internal names) -> PEFT file keys."""
    out = {}
    for k, v in state.items():
        if is_lora_param(k):
            out[PREFIX + k.replace(".default.", ".")] = v
        elif any(k == m or k.startswith(m + ".") for m in modules_to_save):
            out[PREFIX + k] = v
    return out


def save_adapter(
    folder: str | Path, state: dict[str, torch.Tensor], config, dtype: torch.dtype | None = None
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (state: trainable weights, internal names)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(state, list(config.modules_to_save or []))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"}
    )
    tmp.replace(folder / ADAPTER_WEIGHTS)
    config.save_pretrained(str(folder))
    return folder


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA layers injected by `add_lora` into their base weights, in place; returns the model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer()
            )
    return model
