"""Inference drop-ins for nn.Linear (bf16, int8, int4 weights): the streaming kernels for decode-sized inputs,
torch for prefill.

Weights are buffers, not parameters: these layers are for inference only (an input that requires grad
under autograd goes through torch). Both keep nn.Linear's state-dict key for the bias.
"""

from __future__ import annotations

import torch
from torch import nn

from . import build
from .ops import (
    _OP_BF16,
    _OP_INT4,
    _OP_INT4_Q8,
    _OP_INT8,
    _OP_INT8_FAST,
    MAX_ROWS,
    QK4,
    bias_args,
    gemv,
    int4_quantize_x_default,
    linear_bf16,
    linear_int4,
    linear_int8,
    quantize_int4,
    quantize_int8,
)


def _check_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return bias.detach().contiguous()


class FastBf16Linear(nn.Module):
    """y = x @ weight^T + bias with a bf16 weight [out, in]; at most MAX_ROWS rows of x use the kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", _check_bias(bias, self.out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FastBf16Linear:
        """Shares the weight storage when it already is a contiguous bf16 tensor."""
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bufs = self._buffers  # one attribute lookup instead of two nn.Module.__getattr__ calls
        w, b = bufs["weight"], bufs["bias"]
        lib = build.load()
        if lib is not None and x.shape[-1] == self.in_features and w.is_cpu and w.is_contiguous():
            ba = bias_args(b)
            if ba is not None:
                y = gemv(lib, _OP_BF16, x, w.data_ptr(), 0, self.out_features, *ba)
                if y is not None:
                    return y
        return linear_bf16(x, w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Int8Linear(nn.Module):
    """y = x @ (qweight * scale[:, None])^T + bias: int8 weight [out, in] with one fp32 scale per output.

    Up to MAX_ROWS rows of x run the kernel, which reads half the bytes of a bf16 weight; quantize_x
    selects its VNNI variant. Larger inputs go through `linear_int8`: a few more rows stream in
    slices, prefill multiplies by the weight dequantized per call (memory stays at int8).
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 quantize_x: bool = False):
        super().__init__()
        self.quantize_x = quantize_x
        self._op = _OP_INT8_FAST if quantize_x else _OP_INT8
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        self.out_features, self.in_features = qweight.shape
        if scale.shape != (self.out_features,):
            raise ValueError(f"scale must have shape ({self.out_features},), got {tuple(scale.shape)}")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.detach().to(torch.float32).contiguous())
        self.register_buffer("bias", _check_bias(bias, self.out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize_x: bool = False) -> Int8Linear:
        q, s = quantize_int8(linear.weight)
        return cls(q, s, linear.bias, quantize_x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bufs = self._buffers
        q, s, b = bufs["qweight"], bufs["scale"], bufs["bias"]
        lib = build.load()
        if (lib is not None and x.shape[-1] == self.in_features and q.is_cpu and s.is_cpu
                and q.is_contiguous()):
            ba = bias_args(b)
            if ba is not None:
                y = gemv(lib, self._op, x, q.data_ptr(), s.data_ptr(), self.out_features, *ba)
                if y is not None:
                    return y
        return linear_int8(x, q, s, b, quantize_x=self.quantize_x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quantize_x={self.quantize_x}, max_kernel_rows={MAX_ROWS}")


class Int4Linear(nn.Module):
    """y = x @ dequantize_int4(qweight, scale)^T + bias: group-wise int4 (ops.quantize_int4, llama.cpp's Q4_0
    layout) with qweight uint8 [out, in / 2] and one fp16 scale per QK4 weights. Decode-sized inputs run the
    kernel, which reads about a quarter of a bf16 weight's bytes; prefill multiplies by the weight dequantized
    a block at a time (memory stays at int4).

    quantize_x (default: ops.int4_quantize_x_default(), INTERNVL_INT4_ACTIVATIONS) has the kernel round x to
    int8 per group of QK4 and multiply bytes, as llama.cpp's Q4_0 x Q8_0; False keeps the exact fp32 x path."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 quantize_x: bool | None = None):
        super().__init__()
        self.quantize_x = int4_quantize_x_default() if quantize_x is None else bool(quantize_x)
        self._op = _OP_INT4_Q8 if self.quantize_x else _OP_INT4
        if qweight.dtype != torch.uint8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        self.out_features, self.in_features = qweight.shape[0], 2 * qweight.shape[1]
        if scale.dtype != torch.float16 or scale.shape != (self.out_features, self.in_features // QK4):
            raise ValueError(f"scale must be float16 of shape ({self.out_features}, {self.in_features // QK4}), "
                             f"got {scale.dtype} {tuple(scale.shape)}")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", _check_bias(bias, self.out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize_x: bool | None = None) -> Int4Linear:
        q, s = quantize_int4(linear.weight)
        return cls(q, s, linear.bias, quantize_x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bufs = self._buffers
        q, s, b = bufs["qweight"], bufs["scale"], bufs["bias"]
        lib = build.load()
        if lib is not None and x.shape[-1] == self.in_features and q.is_cpu and s.is_cpu and q.is_contiguous():
            ba = bias_args(b)
            if ba is not None:
                y = gemv(lib, self._op, x, q.data_ptr(), s.data_ptr(), self.out_features, *ba)
                if y is not None:
                    return y
        return linear_int4(x, q, s, b, quantize_x=self.quantize_x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group={QK4}, quantize_x={self.quantize_x}")
