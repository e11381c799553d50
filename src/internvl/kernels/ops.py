"""Functional linear layers for decoding (bf16, int8 and int4 weights): the kernels for up to 16 rows, torch otherwise.

Each computes x @ W^T (+ bias) in x's dtype. The kernel path needs a contiguous 2-D CPU weight, x in bf16 or
fp32 with at most MAX_ROWS rows after flattening, and no autograd. On AVX-512 one row streams through FMA (or
VNNI) and 2 to 16 rows use AMX tiles when the CPU has them; the AVX2 variant takes 4 rows per pass.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading

import torch
import torch.nn.functional as F

from ..errors import InternVLError
from . import build

MAX_ROWS = 16  # one AMX tile of x columns; the decode step takes as many rows
_DT = {torch.float32: 0, torch.bfloat16: 1}
_OP_BF16, _OP_INT8, _OP_INT8_FAST, _OP_INT4, _OP_INT4_Q8 = 0, 1, 2, 3, 4
QK4 = 32  # int4: weights per group sharing one fp16 scale (llama.cpp's Q4_0 block)
SLICED_INT8_ROWS = 2 * MAX_ROWS  # int8 inputs up to this many rows still stream, in slices of MAX_ROWS
DENSE_BLOCK_BYTES = 16 << 20  # bound on the dequantized weight a large int8 input materializes at once
# One int64 parameter block per calling thread (ctypes releases the GIL during the call, so a block
# shared between Python threads could be overwritten mid-call); packing it is cheaper than passing
# thirteen converted ctypes arguments.
_PARAMS = struct.Struct("13q")
_tls = threading.local()


INT4_X_ENV = "INTERNVL_INT4_ACTIVATIONS"  # int8 (default): int4 layers quantize x; fp32: they keep it


def int4_quantize_x_default() -> bool:
    """Whether int4 layers built without an explicit choice quantize x to int8 (INTERNVL_INT4_ACTIVATIONS=int8,
    the default) or multiply it unrounded (=fp32, the slower exact path)."""
    value = os.environ.get(INT4_X_ENV, "").strip().lower()
    if value not in ("", "int8", "fp32"):
        raise InternVLError(f"{INT4_X_ENV}={value!r}: expected int8 or fp32")
    return value != "fp32"


def available() -> bool:
    """True when the compiled kernels can run here (an AVX-512 or AVX2 CPU, a C compiler, not disabled)."""
    return build.load() is not None


def unavailable_reason() -> str | None:
    return None if available() else build.load_error()


def describe() -> str:
    """One line naming the kernel path that runs here: the variant (and AMX), or torch and why."""
    lib, v = build.load(), build.variant()
    if lib is None or v is None:
        return f"CPU kernels: none, plain torch ({build.load_error()})"
    extra = " + AMX" if lib.ivl_amx_available() else ""
    return f"CPU kernels: {v.name}{extra}, one-call decode step"


def amx_available() -> bool:
    """True when the AMX tile path for batched rows is compiled in and the CPU and OS allow it."""
    lib = build.load()
    return lib is not None and bool(lib.ivl_amx_available())


def set_amx_min_rows(rows: int) -> int:
    """Use AMX from this many rows of x on (default 2; 0 never); returns the previous setting."""
    lib = build.load()
    return lib.ivl_set_amx_min_rows(rows) if lib is not None else 0


def _param_block():
    blk = getattr(_tls, "blk", None)
    if blk is None:
        buf = ctypes.create_string_buffer(_PARAMS.size)
        blk = _tls.blk = (buf, ctypes.addressof(buf))
    return blk


def gemv(lib, op: int, x: torch.Tensor, w_ptr: int, scale_ptr: int, n: int, bias_ptr: int = 0,
         bias_dt: int = 0) -> torch.Tensor | None:
    """Run the kernel on x [..., K] with at most MAX_ROWS rows; None when the caller must fall back.

    The caller vouches for the weight (contiguous [n, K] on the CPU) and the bias (contiguous [n],
    dtype code bias_dt, or bias_ptr 0). This is the per-token hot path: a few microseconds of Python.
    """
    dt = _DT.get(x.dtype)
    shape = x.shape
    k = shape[-1]
    if dt is None or not x.is_cpu or k == 0 or (x.requires_grad and torch.is_grad_enabled()):
        return None
    m = x.numel() // k
    if not 0 < m <= MAX_ROWS:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype)
    buf, addr = _param_block()
    _PARAMS.pack_into(buf, 0, op, x.data_ptr(), dt, m, k, w_ptr, scale_ptr, n, bias_ptr, bias_dt,
                      y.data_ptr(), dt, torch.get_num_threads())
    if lib.ivl_run(addr) != 0:
        return None
    return y if len(shape) == 2 else y.view(*shape[:-1], n)


def bias_args(bias: torch.Tensor | None) -> tuple[int, int] | None:
    """(pointer, dtype code) of a bias the kernel can read, (0, 0) for none, None for one it cannot."""
    if bias is None:
        return 0, 0
    if bias.dtype not in _DT or not bias.is_cpu or bias.dim() != 1 or not bias.is_contiguous() or (
            bias.requires_grad and torch.is_grad_enabled()):
        return None
    return bias.data_ptr(), _DT[bias.dtype]


def _weight_ok(w: torch.Tensor, k: int) -> bool:
    return (w.is_cpu and w.dim() == 2 and w.shape[1] == k and w.is_contiguous()
            and not (w.requires_grad and torch.is_grad_enabled()))


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16 or fp32) @ weight[N, K]^T (bf16) + bias, in x's dtype.

    The kernel forms exact products of the bf16 weights with x (bf16 or fp32) and sums them in fp32.
    Other inputs go to F.linear (an fp32 x against the weight widened to fp32).
    """
    lib = build.load()
    if lib is not None and weight.dtype == torch.bfloat16 and _weight_ok(weight, x.shape[-1]):
        b = bias_args(bias)
        if b is not None and (bias is None or bias.numel() == weight.shape[0]):
            y = gemv(lib, _OP_BF16, x, weight.data_ptr(), 0, weight.shape[0], *b)
            if y is not None:
                return y
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: scale = max|w_n| / 127, q = round(w / scale) in [-127, 127].

    Returns (qweight int8 [N, K], scale float32 [N]); an all-zero row gets scale 1.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    w = weight.detach()
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    lib = build.load()
    if lib is not None and w.device.type == "cpu" and w.dtype in _DT and n > 0 and k > 0:
        w = w.contiguous()
        lib.ivl_quantize_int8(w.data_ptr(), _DT[w.dtype], n, k, q.data_ptr(), scale.data_ptr(),
                              torch.get_num_threads())
        return q, scale
    for r0 in range(0, n, 4096):  # row blocks bound the fp32 temporary (the lm_head is 136M weights)
        blk = w[r0:r0 + 4096].to(device="cpu", dtype=torch.float32)
        amax = blk.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[r0:r0 + 4096] = torch.round(blk * (1.0 / s)[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r0:r0 + 4096] = s
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight qweight * scale[:, None] in dtype (the product formed in fp32, then rounded)."""
    lib = build.load()
    if (lib is not None and dtype in _DT and qweight.dtype == torch.int8 and qweight.dim() == 2
            and qweight.is_cpu and qweight.is_contiguous() and scale.dtype == torch.float32 and scale.is_cpu
            and scale.is_contiguous() and scale.numel() == qweight.shape[0] and qweight.numel() > 0):
        if out is None:
            out = torch.empty(qweight.shape, dtype=dtype)
        lib.ivl_dequantize_int8(qweight.data_ptr(), scale.data_ptr(), qweight.shape[0], qweight.shape[1],
                                out.data_ptr(), _DT[dtype], torch.get_num_threads())
        return out
    w = (qweight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)
    return w if out is None else out.copy_(w)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                *, quantize_x: bool = False) -> torch.Tensor:
    """x [..., K] @ (qweight[N, K] * scale[N, None])^T + bias, in x's dtype.

    By default the kernel widens the weights in registers and multiplies the unrounded x (exact
    products, fp32 sums, the row scale applied once). quantize_x=True first rounds each row of x to
    16 bits (scale max|x| / 32639) and multiplies with VNNI integer dot products: fewer instructions
    per weight byte, an error of at most max|x| / 65278 per element of x, far below the int8 weights'
    own. Up to SLICED_INT8_ROWS rows stream the weight once per MAX_ROWS rows; larger inputs
    (prefill) multiply by the weight dequantized to x's dtype, DENSE_BLOCK_BYTES at a time.
    """
    lib = build.load()
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (lib is not None and 0 < rows <= SLICED_INT8_ROWS and qweight.dtype == torch.int8
            and scale.dtype == torch.float32 and scale.is_cpu and scale.is_contiguous()
            and scale.numel() == qweight.shape[0] and _weight_ok(qweight, k)):
        b = bias_args(bias)
        if b is not None and (bias is None or bias.numel() == qweight.shape[0]):
            op, n = _OP_INT8_FAST if quantize_x else _OP_INT8, qweight.shape[0]
            ptrs = (qweight.data_ptr(), scale.data_ptr(), n, *b)
            if rows <= MAX_ROWS:
                y = gemv(lib, op, x, *ptrs)
            else:
                parts = [gemv(lib, op, xs, *ptrs) for xs in x.reshape(rows, k).split(MAX_ROWS)]
                y = None if any(p is None for p in parts) else torch.cat(parts).view(*x.shape[:-1], n)
            if y is not None:
                return y
    if 0 < rows <= SLICED_INT8_ROWS:  # no kernel: torch's own weight-only int8 matmul streams the weight once
        y = _torch_int8_mm(x, qweight, scale, bias)
        if y is not None:
            return y
    return _dense(x, qweight.shape[0], lambda r0, r1, dt, out: dequantize_int8(qweight[r0:r1], scale[r0:r1],
                                                                                 dt, out), bias)


def _torch_int8_mm(x, qweight, scale, bias):
    """aten._weight_int8pack_mm (x in bf16 or fp32 against int8 rows with per-row scales in x's dtype), or None
    where it does not apply. Without it, each decoded token would dequantize every weight (20x slower)."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if (op is None or x.dtype not in _DT or not x.is_cpu or not qweight.is_cpu or qweight.dim() != 2
            or (x.requires_grad and torch.is_grad_enabled())):
        return None
    n, k = qweight.shape
    if n % 16 or k % 32 or k < 64:  # torch 2.13's CPU kernel reads garbage or crashes off these shapes
        return None
    try:
        y = op(x.reshape(-1, k).contiguous(), qweight.contiguous(), scale.to(x.dtype))
    except RuntimeError:  # an older torch without this dtype or shape: the dense path
        return None
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], n)


def _dense(x, n, dequantize, bias):
    """Prefill: F.linear against the weight dequantized (dequantize(r0, r1, dtype, out) gives rows r0:r1),
    a block of rows at a time in a buffer kept per thread (a fresh allocation of that size pays a page
    fault per 4 KiB on every call)."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    k = x.shape[-1]
    bias = None if bias is None else bias.to(dtype)
    block = max(1, DENSE_BLOCK_BYTES // max(1, k * torch.finfo(dtype).bits // 8))
    if n <= block // 4:  # small weights: a plain temporary
        return F.linear(x, dequantize(0, n, dtype, None), bias)
    buf = getattr(_tls, "dense", None)
    if buf is None or buf.dtype != dtype or buf.numel() < block * k:
        buf = _tls.dense = torch.empty(block * k, dtype=dtype)
    if n <= block:  # one block: the matmul writes the output itself
        return F.linear(x, dequantize(0, n, dtype, buf[:n * k].view(n, k)), bias)
    y = torch.empty((*x.shape[:-1], n), dtype=dtype)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        w = dequantize(r0, r1, dtype, buf[:(r1 - r0) * k].view(r1 - r0, k))
        y[..., r0:r1] = F.linear(x, w, None if bias is None else bias[r0:r1])
    return y


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric int4 as llama.cpp's Q4_0 (and gguf's quantizer) forms it: per group of QK4 weights
    of a row, d = (the weight of largest magnitude) / -8, u = min(15, trunc(w / d + 8.5)); the weight is
    (u - 8) * fp16(d). Returns (qweight uint8 [N, K / 2]: byte i of a group holds u[i] low and u[i + 16]
    high, scale float16 [N, K / QK4]). K must be a multiple of QK4."""
    if weight.dim() != 2 or weight.shape[1] % QK4:
        raise ValueError(f"quantize_int4 expects a 2-D weight [N, K] with K a multiple of {QK4}, "
                         f"got shape {tuple(weight.shape)}")
    w = weight.detach()
    n, k = w.shape
    q = torch.empty((n, k // 2), dtype=torch.uint8)
    scale = torch.empty((n, k // QK4), dtype=torch.float16)
    for r0 in range(0, n, 1024):  # row blocks bound the float64 temporary
        blk = w[r0:r0 + 1024].to(device="cpu", dtype=torch.float32).reshape(-1, k // QK4, QK4)
        mx = blk.gather(-1, blk.abs().argmax(-1, keepdim=True))
        d = mx / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        u = torch.trunc(blk.double() * inv.double() + 8.5).clamp_(0, 15).to(torch.uint8)
        q[r0:r0 + 1024] = (u[..., :QK4 // 2] | (u[..., QK4 // 2:] << 4)).reshape(-1, k // 2)
        scale[r0:r0 + 1024] = d[..., 0].to(torch.float16)
    return q, scale


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight (u - 8) * scale of quantize_int4's format, in dtype (formed in fp32, then rounded)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    lib = build.load()
    if (lib is not None and dtype in _DT and qweight.dtype == torch.uint8 and qweight.is_cpu
            and qweight.is_contiguous() and scale.dtype == torch.float16 and scale.is_cpu and scale.is_contiguous()
            and scale.shape == (n, k // QK4) and qweight.numel() > 0):
        if out is None:
            out = torch.empty((n, k), dtype=dtype)
        lib.ivl_dequantize_int4(qweight.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), _DT[dtype],
                                torch.get_num_threads())
        return out
    g = qweight.reshape(n, k // QK4, QK4 // 2)
    u = torch.cat([g & 15, g >> 4], dim=-1).to(torch.float32) - 8
    w = (u * scale.to(torch.float32)[..., None]).reshape(n, k).to(dtype)
    return w if out is None else out.copy_(w)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, quantize_x: bool = False) -> torch.Tensor:
    """x [..., K] @ dequantize_int4(qweight, scale)^T + bias, in x's dtype: the kernel widens the weights in
    registers (exact products, fp32 sums) for up to SLICED_INT8_ROWS rows; without it, or for more rows
    (prefill), F.linear against the weight dequantized DENSE_BLOCK_BYTES at a time.

    quantize_x=True makes the kernel round x to int8 per group of QK4 first, as llama.cpp's Q8_0 does
    (d = max|x| / 127, q = round(x / d)), and multiply bytes with integer dot products: several times less
    arithmetic per weight, an error of at most d / 2 per element of x. The torch paths keep x as it is."""
    lib = build.load()
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    n = qweight.shape[0]
    if (lib is not None and 0 < rows <= SLICED_INT8_ROWS and qweight.dtype == torch.uint8
            and scale.dtype == torch.float16 and scale.is_cpu and scale.is_contiguous()
            and scale.shape == (n, k // QK4) and k % QK4 == 0 and _weight_ok(qweight, k // 2)):
        b = bias_args(bias)
        if b is not None and (bias is None or bias.numel() == n):
            op, ptrs = _OP_INT4_Q8 if quantize_x else _OP_INT4, (qweight.data_ptr(), scale.data_ptr(), n, *b)
            if rows <= MAX_ROWS:  # one call (the split and view below cost more than the kernel on small weights)
                y = gemv(lib, op, x, *ptrs)
                if y is not None:
                    return y
            else:
                parts = [gemv(lib, op, xs, *ptrs) for xs in x.reshape(rows, k).split(MAX_ROWS)]
                if all(p is not None for p in parts):
                    return torch.cat(parts).view(*x.shape[:-1], n)
    return _dense(x, n, lambda r0, r1, dt, out: dequantize_int4(qweight[r0:r1], scale[r0:r1], dt, out), bias)


def argmax_rows(x: torch.Tensor) -> list[int]:
    """torch.argmax(x, -1).tolist() for a 2-D CPU x (bf16 or fp32; the first maximum, or the first NaN),
    in one pass of the kernel where it can run (torch's argmax is several times slower)."""
    lib = build.load()
    dt = _DT.get(x.dtype)
    if (lib is None or dt is None or x.dim() != 2 or not x.is_cpu or x.shape[1] == 0 or x.stride(1) != 1
            or x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        return torch.argmax(x, -1).tolist()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if lib.ivl_argmax_rows(x.data_ptr(), dt, x.shape[0], x.shape[1], max(x.stride(0), x.shape[1]),
                           out.data_ptr(), torch.get_num_threads()) != 0:
        return torch.argmax(x, -1).tolist()
    return out.tolist()


def read_pass(buf: torch.Tensor, threads: int | None = None) -> float:
    """Read every byte of a contiguous CPU tensor once (the bandwidth ceiling); returns a checksum."""
    lib = build.load()
    if lib is None:
        raise RuntimeError(f"kernels unavailable: {build.load_error()}")
    return lib.ivl_read_pass(buf.data_ptr(), buf.numel() * buf.element_size(),
                             threads or torch.get_num_threads())
