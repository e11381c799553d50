"""CPU acceleration of decoding, chosen in one place: the language model's linears swapped for the kernel
modules (bf16 weight streaming, weight-only int8, or group-wise int4), and the engine's decode step (the one-call
C step of `kernels.decode` where the CPU, the compiler and every layer allow it, else the model's own `decode`).

The kernel modules fall back to torch where they cannot run (prefill, no compiler, other CPUs, GPUs), and the
streamed weights move onto transparent huge pages where Linux allows (`kernels.memory`). `kernel_report` is
the one line that says which path runs (logged by `load()`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InternVLError
from ..kernels import build
from ..kernels.decode import FusedDecoder
from ..kernels.memory import collapse_to_hugepages
from ..kernels.modules import FastBf16Linear, Int4Linear, Int8Linear
from ..kernels.ops import QK4, describe

MODES = ("int8", "int4")
log = logging.getLogger("internvl")
DecodeStep = Callable[..., torch.Tensor]  # (tokens [B], cache, valid_lengths [B] | None) -> logits [B, vocab]


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


def _huge_pages(lm) -> None:
    streamed = [t for name, t in [*lm.named_parameters(), *lm.named_buffers()] if "embed_tokens" not in name]
    collapse_to_hugepages([t for t in streamed if t.device.type == "cpu"])


def _routers(lm) -> set[int]:
    """ids of the mixture-of-experts routers (`gate` or `router` beside `experts`): they stay unquantized, as
    a rounding there changes which experts a token goes to."""
    return {id(r) for m in lm.modules() if hasattr(m, "experts")
            for r in (getattr(m, "gate", None), getattr(m, "router", None)) if isinstance(r, nn.Linear)}  # fmt: skip


def _quantized(mode: str, linear: nn.Linear) -> nn.Module:
    """int8: one scale per output row. int4: a scale per QK4 weights of a row (a layer whose input size is not
    a multiple of QK4 takes int8 instead)."""
    if mode == "int4" and linear.in_features % QK4 == 0:
        return Int4Linear.from_linear(linear)
    return Int8Linear.from_linear(linear)


def quantize_model(model, mode: str = "int8") -> int:
    """Weight-only int8 or int4 for every linear layer of the language model but the mixture-of-experts
    routers. int4 without a kernel would dequantize every weight per token: int8 is used instead (torch has a
    fast weight-only int8 matmul), with one warning line."""
    if mode not in MODES:
        raise InternVLError(f"quantize: expected one of {list(MODES)}, got {mode!r}")
    if mode == "int4" and build.load() is None:
        log.warning("quantize int4: no int4 kernel on this machine (%s); using int8 weights instead",
                    build.load_error())
        mode = "int8"
    lm = model.language_model
    lm.fuse_projections()
    routers = _routers(lm)
    count = _replace_linears(lm, lambda lin: None if id(lin) in routers else _quantized(mode, lin))
    _huge_pages(lm)
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
    _huge_pages(lm)
    return count


class FusedStep:
    """The model's decode step with the C step in front: step.c answers what it covers (bf16 on the CPU,
    up to kernels.MAX_ROWS rows, no autograd or hooks), the model the rest."""

    def __init__(self, model, fused: FusedDecoder):
        self.model, self.fused = model, fused

    def __call__(self, tokens: torch.Tensor, cache, valid_lengths: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.fused(self.model.language_model.embed(tokens[:, None]), cache, valid_lengths)
        if logits is None:
            return self.model.decode(tokens, cache, valid_lengths)
        return logits[:, -1]


def decode_step(model) -> DecodeStep:
    """How an engine decodes one token per cache row of `model`: (tokens [B], cache, valid_lengths) ->
    logits [B, vocab]. The C step when the model's decoder was accelerated above and every part of it can
    run in C here, else `model.decode`. Models without a `language_model` (a test's mock) decode alone."""
    lm = getattr(model, "language_model", None)
    if lm is None or getattr(lm, "efficiency", None) is not None or not isinstance(  # pruned caches: torch
            getattr(lm, "lm_head", None), (FastBf16Linear, Int8Linear, Int4Linear)):
        return model.decode  # not accelerated: no reason to build (or compile) the kernels
    fused = FusedDecoder.build(lm)
    return model.decode if fused is None else FusedStep(model, fused)


def kernel_report(model) -> str:
    """One line: which kernels the language model's decoding runs on this machine, and what that costs when
    there are none (a CPU model never slows down silently)."""
    lm = getattr(model, "language_model", None)
    kinds = {type(m) for m in lm.modules()} if lm is not None else set()
    fmt = "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds else "bf16" if FastBf16Linear in kinds else None
    if fmt is None:
        return "decode: plain torch (kernels not in use for this model)"
    int8_x = fmt == "int4" and any(m.quantize_x for m in lm.modules() if isinstance(m, Int4Linear))
    line = f"decode ({fmt} weights{', int8 activations' if int8_x else ''}): {describe()}"
    if build.load() is None:
        slow = {"int4": "int4 dequantizes every weight per token (slow)", "int8": "torch's weight-only int8 matmul",
                "bf16": "torch's bf16 matmul"}[fmt]
        line += f"; no fast path on this CPU, decoding runs {slow}"
    return line
