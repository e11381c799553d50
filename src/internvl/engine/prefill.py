"""How a prefill (the vision encoder and the prompt's forward) runs on a CPU: its matmuls in fp32 where the CPU has
no native bf16 matmul (torch would emulate bf16 GEMMs, many times slower), and a progress line when it is long.

fp32 compute keeps no second copy of the weights: each matmul, convolution, norm and attention of a bf16 model
widens its operands for that call (one layer's weight at a time), and activations stay fp32 until the KV cache
stores them in the model's dtype. Decoding keeps the bf16/int8/int4 kernels. INTERNVL_PREFILL_DTYPE=auto|bf16|fp32.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TextIO

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..errors import InternVLError
from ..kernels import build

ENV = "INTERNVL_PREFILL_DTYPE"
CHOICES = ("auto", "bf16", "fp32")
# /proc/cpuinfo flags of a native (not emulated) matmul in each half-precision dtype
NATIVE = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
MIN_ROWS = 16  # fewer rows of one dtype are left alone: widening a weight for a GEMV costs more than it saves
# the calls that widen: each multiplies (or normalizes) many rows by a weight
WIDENED = {F.linear, F.conv2d, F.conv1d, F.layer_norm, F.group_norm, F.scaled_dot_product_attention,
           torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
           torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum}  # fmt: skip


def native_matmul(dtype: torch.dtype, flags: set[str] | None) -> bool | None:
    """Whether a CPU with these feature flags multiplies `dtype` natively (None: flags unknown)."""
    if flags is None:
        return None
    return any(f in flags for f in NATIVE.get(dtype, ()))


def choose(model_dtype: torch.dtype, device: torch.device, want: str | None = None,
           flags: tuple[set[str] | None, str] | None = None) -> tuple[torch.dtype | None, str]:  # fmt: skip
    """The dtype prefill computes in (None: the model's own) and the words saying why. `want`: auto, bf16 or fp32
    (default: $INTERNVL_PREFILL_DTYPE, else auto); `flags`: build.cpu_flags()'s answer (read when None)."""
    want = (want or os.environ.get(ENV) or "auto").strip().lower()
    if want not in CHOICES:
        raise InternVLError(f"prefill dtype {want!r} ({ENV} or load(prefill_dtype=...)): expected one of "
                            f"{', '.join(CHOICES)}")  # fmt: skip
    if device.type != "cpu" or model_dtype not in NATIVE:
        return None, f"{_name(model_dtype)}, the model's dtype"
    if want == "fp32":
        return torch.float32, "fp32 (forced)"
    if want == "bf16":
        return None, f"{_name(model_dtype)} (forced)"
    cpu, why = flags if flags is not None else build.cpu_flags()
    native = native_matmul(model_dtype, cpu)
    needs = " or ".join(f.upper() for f in NATIVE[model_dtype])
    if native is None:
        return None, f"{_name(model_dtype)} (CPU features unknown: {why})"
    if native:
        have = " and ".join(f.upper() for f in NATIVE[model_dtype] if f in cpu)
        return None, f"{_name(model_dtype)} (native on this CPU: {have})"
    return torch.float32, f"fp32 (this CPU has no {needs}: {_name(model_dtype)} matmuls would be emulated)"


def _name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


class Widen(TorchFunctionMode):
    """Within it, the WIDENED calls on half-precision tensors run in `dtype` (their result too), and embedding
    lookups return `dtype`: from the token embeddings on, the activations are in `dtype`."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:  # token embeddings: the rows looked up are widened, not the table
            return self._widen(func(*args, **kwargs))
        if func in WIDENED:
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if tensors and (len({t.dtype for t in tensors}) > 1 or _rows(tensors[0]) >= MIN_ROWS):
                args, kwargs = tree_map(self._widen, (args, kwargs))
        return func(*args, **kwargs)

    def _widen(self, t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t


def _rows(t: torch.Tensor) -> int:
    return t.numel() // max(1, t.shape[-1]) if t.dim() else 1


class Progress:
    """One line on a console stream while a long prefill runs: shown once it has run `after_s` seconds, moved on
    at every encoder and decoder layer, erased when the prefill ends (the answer then prints on a clean line)."""

    def __init__(self, stream: TextIO | None = None, after_s: float = 2.0):
        self.stream, self.after_s = stream or sys.stderr, after_s
        self.label, self.total, self.done, self.t0, self.shown = "", 0, 0, 0.0, False

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.t0, self.shown = label, total, 0, time.perf_counter(), False

    def tick(self, *_) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        if elapsed >= self.after_s:
            pct = 100 * min(self.done, self.total) // max(1, self.total)
            self.stream.write(f"\r{self.label}: {pct:3d}% ({elapsed:.0f} s)")
            self.stream.flush()
            self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (len(self.label) + 16) + "\r")
            self.stream.flush()


def console_progress(stream: TextIO | None = None) -> Progress | None:
    """The CLI's progress line: on when `stream` (stderr) is a terminal, never in piped or JSON output.
    INTERNVL_PROGRESS=1 forces it on, 0 off; INTERNVL_PROGRESS_AFTER sets the seconds before it shows (2)."""
    stream = stream or sys.stderr
    forced = os.environ.get("INTERNVL_PROGRESS", "").strip()
    if forced == "0" or (forced != "1" and not (hasattr(stream, "isatty") and stream.isatty())):
        return None
    return Progress(stream, float(os.environ.get("INTERNVL_PROGRESS_AFTER", "2")))


def _layers(model, with_images: bool) -> list[torch.nn.Module]:
    vit = getattr(getattr(getattr(model, "vision_model", None), "encoder", None), "layers", None)
    llm = getattr(getattr(getattr(model, "language_model", None), "model", None), "layers", None)
    return [*(vit if with_images and vit is not None else ()), *(llm if llm is not None else ())]


class PrefillRun:
    """What the engine wraps around every model.prefill: `dtype` (None: the model's own) and `progress`."""

    def __init__(self, dtype: torch.dtype | None = None, progress: Progress | None = None):
        self.dtype, self.progress = dtype, progress

    @classmethod
    def for_model(cls, model) -> PrefillRun:
        """The automatic choice (or $INTERNVL_PREFILL_DTYPE's) for `model`'s dtype and device."""
        dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(device, torch.device):  # a test's mock model
            return cls()
        return cls(choose(dtype, device)[0])

    @contextlib.contextmanager
    def __call__(self, model, tokens: int, tiles: int):
        with contextlib.ExitStack() as stack:
            if self.dtype is not None:
                stack.enter_context(Widen(self.dtype))
            if self.progress is not None:
                layers = _layers(model, tiles > 0)
                images = f"{tiles} image tile{'s' if tiles > 1 else ''} and " if tiles else ""
                label = f"reading {images}{tokens} prompt tokens"
                self.progress.start(label, len(layers))
                for layer in layers:
                    stack.callback(layer.register_forward_hook(self.progress.tick).remove)
                stack.callback(self.progress.finish)
            yield
