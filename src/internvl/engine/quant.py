"""Inference-time replacement of the language model's linear layers: weight-only int8, or the bf16 kernel.

Both use the AVX-512 weight-streaming kernels of `internvl.kernels` for decode-sized inputs and fall back
to plain torch elsewhere (prefill, no compiler, other CPUs, GPUs). Where every layer qualifies (bf16
activations on the CPU), a decoding step with one new token per row runs as one C call
(`kernels.decode.FusedDecoder`), the modules staying in place for everything else. The streamed weights
are moved onto transparent huge pages where Linux allows (`kernels.memory`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import InternVLError
from ..kernels.decode import FusedDecoder
from ..kernels.memory import collapse_to_hugepages
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


def _prepare_decoding(lm) -> None:
    """The one-call decode step where the model qualifies, and huge pages under the weights it streams."""
    lm.fast_decoder = FusedDecoder.build(lm)
    streamed = [t for name, t in [*lm.named_parameters(), *lm.named_buffers()] if "embed_tokens" not in name]
    collapse_to_hugepages([t for t in streamed if t.device.type == "cpu"])


def quantize_model(model, mode: str = "int8") -> int:
    """Weight-only int8 (one scale per output row) for every linear layer of the language model."""
    if mode not in MODES:
        raise InternVLError(f"quantize: expected one of {list(MODES)}, got {mode!r}")
    lm = model.language_model
    lm.fuse_projections()
    count = _replace_linears(lm, Int8Linear.from_linear)
    _prepare_decoding(lm)
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
    _prepare_decoding(lm)
    return count
