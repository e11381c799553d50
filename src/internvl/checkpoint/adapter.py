"""LoRA adapter folders in PEFT's format, read and merged without PEFT: W += (alpha / r) * B @ A per target module
(alpha / sqrt(r) with use_rslora). Training writes these folders (train/lora.py, through PEFT); inference only reads
them, so `pip install internvl` without the training extra can chat with an adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's file keys: PREFIX + <module>.lora_A.weight / .lora_B.weight, or PREFIX + <parameter trained in full>
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.(weight|bias)")


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _read_config(folder: str | Path) -> dict:
    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable {ADAPTER_CONFIG} ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} is not a JSON object")
    return config


def adapter_base(folder: str | Path) -> str | None:
    """The base model folder (or Hub id) recorded in an adapter's config."""
    return _read_config(folder).get("base_model_name_or_path")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class AdapterConfig:
    """What the merge reads from `adapter_config.json` (PEFT's LoraConfig keys)."""

    r: int
    lora_alpha: float
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False  # GPT-2-style Conv1D weights stored [in, out]

    @classmethod
    def read(cls, folder: str | Path) -> AdapterConfig:
        c = _read_config(folder)
        if c.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(
                f"{folder}: a {c.get('peft_type')} adapter; only LoRA adapters can be merged"
            )
        for key in ("use_dora", "layer_replication"):
            if c.get(key):
                raise CheckpointError(f"{folder}: {key} adapters are not supported (plain LoRA only)")
        try:
            return cls(r=int(c["r"]), lora_alpha=float(c["lora_alpha"]), rank_pattern=dict(c.get("rank_pattern") or {}),
                       alpha_pattern=dict(c.get("alpha_pattern") or {}), use_rslora=bool(c.get("use_rslora")),
                       fan_in_fan_out=bool(c.get("fan_in_fan_out")))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{folder}: {ADAPTER_CONFIG} needs numbers r and lora_alpha ({e!r})"
            ) from None

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, scaling) of one target module, with PEFT's per-module patterns."""
        r = int(_pattern_value(self.rank_pattern, module, self.r))
        alpha = float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _split_keys(folder: Path, tensors: dict[str, torch.Tensor], model: nn.Module):
    """({module: {"lora_A.weight": A, "lora_B.weight": B, ...}}, {full parameter name: tensor}), every key checked
    against the model before anything changes."""
    modules = dict(model.named_modules())
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = _LORA_KEY.fullmatch(name)
        owner = m.group(1) if m else name.rsplit(".", 1)[0]
        if owner not in modules:
            raise CheckpointError(f"{folder}: adapter tensor {key!r} matches no module of the model "
                                  "(an adapter for another architecture?)")  # fmt: skip
        if m:
            lora.setdefault(owner, {})[f"{m.group(2)}.{m.group(3)}"] = t
        elif ".lora_" in name:
            raise CheckpointError(
                f"{folder}: adapter tensor {key!r} is not supported (plain LoRA on linear layers)"
            )
        elif name not in state or state[name].shape != t.shape:
            raise CheckpointError(f"{folder}: adapter tensor {key!r} {tuple(t.shape)} does not fit the model")
        else:
            full[name] = t
    return lora, full


def merge_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Fold a LoRA adapter folder into `model`'s weights in place (same class, no extra cost at inference) and copy
    the modules it trained in full; returns the model. Matches `peft.PeftModel.from_pretrained(...).merge_and_unload()`
    (tests/test_train_lora.py checks it)."""
    lm = getattr(model, "language_model", None)
    if lm is not None and getattr(lm, "fused", False):
        raise CheckpointError(
            "the model's projections were fused for decoding, so an adapter cannot be applied; "
            "load the base with internvl.load(..., optimize=False) or load_model()"
        )
    adapter_dir = Path(adapter_dir)
    if not is_adapter(adapter_dir) or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"{adapter_dir}: not a LoRA adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = AdapterConfig.read(adapter_dir)
    try:
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{adapter_dir}: unreadable {ADAPTER_WEIGHTS} ({e})") from None
    lora, full = _split_keys(adapter_dir, tensors, model)
    deltas = []
    for owner, parts in lora.items():
        module, (r, scale) = model.get_submodule(owner), config.rank_and_scale(owner)
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        weight = getattr(module, "weight", None)
        shape = (
            (b.shape[0], a.shape[1]) if a is not None and b is not None and a.dim() == b.dim() == 2 else None
        )
        if config.fan_in_fan_out and shape is not None:
            shape = shape[::-1]
        if (shape is None or a.shape[0] != r or b.shape[1] != r or not isinstance(weight, torch.Tensor)
                or tuple(weight.shape) != shape):  # fmt: skip
            raise CheckpointError(f"{adapter_dir}: the LoRA pair of {owner!r} (r={r}) does not fit its weight "
                                  f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else None}")  # fmt: skip
        bias = parts.get("lora_B.bias")
        if bias is not None and getattr(module, "bias", None) is None:
            raise CheckpointError(f"{adapter_dir}: {owner!r} has a LoRA bias but no bias of its own")
        deltas.append((module, a, b, bias, scale))
    with torch.no_grad():
        for module, a, b, bias, scale in deltas:
            w = module.weight
            work = torch.promote_types(
                w.dtype, torch.float32
            )  # half weights: the product in fp32, as PEFT on CPU
            delta = (b.to(w.device, work) @ a.to(w.device, work)) * scale
            w.add_((delta.T if config.fan_in_fan_out else delta).to(w.dtype))
            if bias is not None:
                module.bias.add_((bias.to(module.bias.device, work) * scale).to(module.bias.dtype))
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, t in full.items():
            state[name].copy_(t)
    return model


def load_adapter_model(adapter_dir: str | Path, base: str | Path | None = None, dtype: str | torch.dtype | None = None,
                       device: str | torch.device = "cpu"):  # fmt: skip
    """(model with the adapter merged, tokenizer, base folder) for a LoRA adapter folder; the base model is the
    one recorded in its adapter_config.json unless `base` is given. `dtype` None keeps the base's stored dtype.
    This is what a model loader calls when it is handed an adapter folder."""
    from ..tokenizer import Tokenizer
    from .hub import is_hub_id, resolve_model
    from .io import load_model, resolve_dtype

    base = base or adapter_base(adapter_dir)
    if base and is_hub_id(str(base)):  # PEFT adapters made elsewhere record their base's Hub id
        base = resolve_model(str(base))
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{adapter_dir}: the adapter's base model {base!r} is not a folder; pass the base "
                              "model explicitly (internvl merge-lora BASE ADAPTER OUT)")  # fmt: skip
    tokenizer = Tokenizer.from_dir(base)
    model, _ = load_model(base, dtype=None, image_token_id=tokenizer.image_context_id)
    stored = model.dtype
    merged = merge_adapter(model.float(), adapter_dir)
    merged.to(device=device, dtype=resolve_dtype(dtype) or stored)
    return merged.eval(), tokenizer, Path(base)
