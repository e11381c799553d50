"""`torch.compile` for training, by region: each vision layer whole, and each decoder layer's norms and
feed-forward block. The decoder's attention stays eager because packed rows run one SDPA call per sample
(`Spans`), a Python loop over data-dependent lengths that a whole-model graph would break on or recompile for
every pack. Shapes are compiled dynamic (packs and tile counts vary from step to step), so one graph per
region serves the whole run. Parameters and state-dict keys are unchanged: checkpoints read and write as
before.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_regions(model: nn.Module) -> int:
    """Compile the regions of `model` in place; returns how many modules were compiled."""
    from ..model.llm import MLP, DecoderLayer
    from ..model.vit import VisionLayer

    regions: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, VisionLayer):
            regions.append(module)
        elif isinstance(module, DecoderLayer):
            regions += [module.input_layernorm, module.post_attention_layernorm]
            if isinstance(module.mlp, MLP):  # mixture-of-experts blocks route by data: left eager
                regions.append(module.mlp)
    for module in regions:
        module.compile(dynamic=True)
    return len(regions)


def compile_for_training(model: nn.Module) -> int:
    """`--compile` of a training command: compile `model`'s regions, or a one-line TrainingError saying why this
    machine cannot; returns how many modules were compiled."""
    from ..errors import TrainingError

    if (why := compile_available()) is not None:
        raise TrainingError(f"--compile: {why}")
    return compile_regions(model)


def compile_available() -> str | None:
    """None when inductor can build kernels here, else why not (it needs a C++ compiler on a CPU)."""
    import shutil

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile needs a C++ compiler (g++ or clang++) on PATH to build CPU kernels"
    return None
