"""Inference-time replacement of the language model's linear layers: weight-only int8, or the bf16 kernel.

Both use the AVX-512 weight-streaming kernels of `internvl.kernels` for decode-sized inputs and fall back
to plain torch elsewhere (prefill, no compiler, other CPUs, GPUs). Where every layer qualifies (bf16
activations on the CPU), a decoding step with one new token per row runs as one C call
(`kernels.decode.FusedDecoder`), the modules staying in place for everything else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import InternVLError
from ..kernels.decode import FusedDecoder
from ..kernels.modules import FastBf16Linear, Int8Linear

MODES = ("int8",)


def _replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> int:
    """Replace every nn.Linear below `module` by make(linear) when that returns a module."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            new = make(child)
            if new is not None:
                setattr(module, name, new)
                count += 1
        else:
            count += _replace_linears(child, make)
    return count


def quantize_model(model, mode: str = "int8") -> int:
    """Weight-only int8 (one scale per output row) for every linear layer of the language model."""
    if mode not in MODES:
        raise InternVLError(f"quantize: expected one of {list(MODES)}, got {mode!r}")
    lm = model.language_model
    lm.fuse_projections()
    count = _replace_linears(lm, Int8Linear.from_linear)
    lm.fast_decoder = FusedDecoder.build(lm)
    return count


def use_decode_kernels(model) -> int:
    """Fuse the projections and route a bf16 language model's decode-sized matmuls through the streaming
    kernel (CPU weights only; other layers keep torch)."""

    def fast(linear: nn.Linear) -> nn.Module | None:
        w = linear.weight
        return FastBf16Linear.from_linear(linear) if w.dtype == torch.bfloat16 and w.device.type == "cpu" else None

    lm = model.language_model
    lm.fuse_projections()
    count = _replace_linears(lm, fast)
    lm.fast_decoder = FusedDecoder.build(lm)
    return count
