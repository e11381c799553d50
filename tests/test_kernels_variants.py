"""Every kernel variant (AVX-512 and AVX2) against fp32 references, forced through INTERNVL_KERNELS so an AVX-512
machine runs the AVX2 code too: the linears and the one-call decode step with bf16, int8 and int4 weights; how the
variant is chosen; and a compile-only check of every variant (issue 16)."""

from __future__ import annotations

import copy
import platform
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_kernels_int4 import _q8_0_reference

from internvl import kernels
from internvl.kernels import build

FLAGS = build.cpu_flags()[0] or set()
HERE = [v.name for v in build.VARIANTS.values() if set(v.cpu_flags) <= FLAGS]
SHAPES = [(7, 64), (33, 96), (130, 160), (129, 896), (300, 4864), (2000, 512)]  # K % 32 == 0 (int4)


@pytest.fixture(params=list(build.VARIANTS))
def variant(request, monkeypatch):
    """The kernels forced to one variant (skipped where the CPU lacks it)."""
    if request.param not in HERE:
        pytest.skip(f"the CPU lacks the {request.param} variant's features")
    monkeypatch.setenv(build.ENV, request.param)
    build.reset()
    assert build.variant() is not None and build.variant().name == request.param, build.load_error()
    yield request.param
    monkeypatch.undo()
    build.reset()


def _data(m, n, k, xdtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(xdtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    return x, w, torch.randn(n, generator=g)


def _close(y, ref, x_dtype):
    scale = ref.abs().max().item() + 1e-6
    if x_dtype == torch.bfloat16:  # one bf16 rounding of the output
        torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=2**-8 * scale)
    else:  # fp32 sums in another order
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_linears_match_fp32_references(variant, m, x_dtype):
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _data(m, n, k, x_dtype, seed=10 * m + i)
        b = b if i % 2 else None
        _close(kernels.linear_bf16(x, w, b), F.linear(x.float(), w.float(), b), x_dtype)
        q, s = kernels.quantize_int8(w)
        _close(kernels.linear_int8(x, q, s, b), F.linear(x.float(), kernels.dequantize_int8(q, s), b), x_dtype)
        q4, s4 = kernels.quantize_int4(w)
        _close(kernels.linear_int4(x, q4, s4, b), F.linear(x.float(), kernels.dequantize_int4(q4, s4), b), x_dtype)


@pytest.mark.parametrize("m", [1, 3, 9, 16, 20])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_int4_with_int8_x_matches_the_same_rounding_in_torch(variant, m, x_dtype):
    """linear_int4(quantize_x=True): x rounded to int8 per group of 32 (Q8_0), integer dot products with the
    nibbles, fp32 sums. Against torch doing that same rounding (_q8_0_reference), in float64: fp32 sums in
    another order (one bf16 rounding of a bf16 output). Against the unrounded x: within the rounding's bound,
    sum over k of |w_k| * d_k / 2 (d_k the scale of x_k's group), and clearly not the unrounded path."""
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _data(m, n, k, x_dtype, seed=20 * m + i)
        b = b if i % 2 else None
        q4, s4 = kernels.quantize_int4(w)
        deq = kernels.dequantize_int4(q4, s4).double()
        y = kernels.linear_int4(x, q4, s4, b, quantize_x=True)
        bias = None if b is None else b.double()
        same, exact = F.linear(_q8_0_reference(x), deq, bias), F.linear(x.double(), deq, bias)
        scale = exact.abs().max().item()
        tol = 2**-8 if x_dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y.double(), same, rtol=tol, atol=tol * scale)
        d = x.float().abs().reshape(m, -1, 32).amax(-1) / 127
        bound = deq.abs() @ d.repeat_interleave(32, -1).double().T / 2  # [n, m]
        assert ((y.double() - exact).abs() <= bound.T * 1.001 + tol * (scale + exact.abs())).all()
        if x_dtype == torch.float32:
            assert (y.double() - exact).abs().max() > 20 * (y.double() - same).abs().max()


def test_int4_with_int8_x_edge_groups(variant):
    """One group (K = 32) and odd group counts (K = 288: a last block of one group past 8 scales), an all-zero group
    (scale 0: contributes 0), a group of one outlier, and non-finite x: NaN or inf in a row's x gives NaN in that
    row only."""
    g = torch.Generator().manual_seed(3)
    for k in (32, 64, 96, 160, 288):
        x = torch.randn(4, k, generator=g)
        x[1, :32] = 0
        x[2, 32 % k:32 % k + 32] = 0
        x[2, (32 % k) + 5] = 1e4
        w = torch.randn(24, k, generator=g) * 0.05
        q4, s4 = kernels.quantize_int4(w)
        y = kernels.linear_int4(x, q4, s4, quantize_x=True)
        same = F.linear(_q8_0_reference(x), kernels.dequantize_int4(q4, s4).double())
        torch.testing.assert_close(y.double(), same, rtol=1e-5, atol=1e-5 * same.abs().max().item())
        for bad in (float("nan"), float("inf")):
            xb = x.clone()
            xb[3, k - 1] = bad
            yb = kernels.linear_int4(xb, q4, s4, quantize_x=True)
            assert yb[3].isnan().all() and torch.equal(yb[:3], y[:3])


def test_odd_k_bf16_and_int8_tails(variant):
    """K not a multiple of the vector width: the scalar tails of the AVX2 loops, the masked ones of AVX-512."""
    for k in (1, 17, 33, 77, 513):
        x, w, b = _data(3, 40, k, torch.float32, seed=k)
        _close(kernels.linear_bf16(x, w, b), F.linear(x, w.float(), b), torch.float32)
        q, s = kernels.quantize_int8(w)
        _close(kernels.linear_int8(x, q, s, b), F.linear(x, kernels.dequantize_int8(q, s), b), torch.float32)


def test_argmax_and_dequantize_agree_with_torch(variant, monkeypatch):
    x = torch.randn(5, 1001).bfloat16()
    x[1, 10] = x[1, 900] = 40
    x[2] = float("-inf")
    x[3, 5], x[3, 50] = float("nan"), float("nan")
    for t in (x, x.float()):
        assert kernels.argmax_rows(t) == torch.argmax(t, -1).tolist()
    q, s = kernels.quantize_int8(torch.randn(37, 70))
    assert torch.equal(kernels.dequantize_int8(q, s, torch.bfloat16), (q.float() * s[:, None]).bfloat16())
    q4, s4 = kernels.quantize_int4(torch.randn(37, 96))
    got = [kernels.dequantize_int4(q4, s4, dt) for dt in (torch.float32, torch.bfloat16)]
    monkeypatch.setattr(build, "load", lambda: None)  # the torch formulas
    assert all(torch.equal(g, kernels.dequantize_int4(q4, s4, g.dtype)) for g in got)


def test_describe_names_the_variant_and_its_decode_step(variant):
    assert kernels.describe() == f"CPU kernels: {variant}{' + AMX' if kernels.ops.amx_available() else ''}, " \
                                 "one-call decode step"


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4", "int4 fp32 x"])
def test_fused_decode_step_matches_a_torch_model_of_the_same_weights(variant, mode, monkeypatch):
    """Each variant's one-call decode step (C answers every step: a spy counts) with bf16, int8 and int4 weights
    (int4 against x rounded to int8, and unrounded), three cache rows of different lengths: its logits are as
    close to an fp32 torch model of the same (dequantized) weights and x rounding as the per-module path's, and
    its greedy choice is the reference's wherever the reference's top two logits are clearly apart."""
    from test_kernels import _decode_both, _Spy, _step, _tiny_lm
    from test_kernels_int4 import _plain_reference

    from internvl.engine.accelerate import FusedStep, kernel_report, quantize_model, use_decode_kernels

    lm = _tiny_lm(seed=5, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16)
    fast = copy.deepcopy(lm)
    monkeypatch.setenv(kernels.ops.INT4_X_ENV, "fp32" if mode == "int4 fp32 x" else "int8")
    if mode == "bf16":
        use_decode_kernels(SimpleNamespace(language_model=fast))
    else:
        quantize_model(SimpleNamespace(language_model=fast), mode.split()[0])
    assert mode != "int4 fp32 x" or not fast.lm_head.quantize_x
    assert ("int8 activations" in kernel_report(SimpleNamespace(language_model=fast))) == (mode == "int4")
    modules, ref = copy.deepcopy(fast), _plain_reference(fast) if mode != "bf16" else copy.deepcopy(lm).float()
    step = _step(fast)
    assert isinstance(step, FusedStep)
    spy = _Spy(step)
    prompts = [[3, 14, 15, 92, 65], list(range(20, 40)), [7, 8]]
    with torch.inference_mode():
        exact, got, _ = _decode_both((ref, ref.decode), (fast, step), prompts, steps=6)
        _, want, _ = _decode_both((ref, ref.decode), (modules, modules.decode), prompts, steps=6)
    assert spy.hits == 6
    scale = exact.abs().max()
    err_fast, err_modules = (got - exact).abs().max() / scale, (want - exact).abs().max() / scale
    assert err_fast <= 2 * err_modules + 2**-7, (err_fast, err_modules)
    top = exact.topk(2, -1).values
    clear = (top[..., 0] - top[..., 1]) > 0.05 * scale
    assert clear.sum() >= 6, "too many near-ties to judge: pick another seed"
    assert torch.equal(got.argmax(-1)[clear], exact.argmax(-1)[clear])


def test_an_avx2_only_cpu_gets_avx2_and_a_forced_avx512_is_refused(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: ({"avx", "avx2", "fma", "f16c", "sse4_2"}, ""))
    monkeypatch.delenv(build.ENV, raising=False)
    assert build.choose().name == "avx2"
    monkeypatch.setenv(build.ENV, "avx512")
    with pytest.raises(RuntimeError, match="avx512: CPU lacks avx512f"):
        build.choose()
    monkeypatch.setattr(build, "cpu_flags", lambda: ({"avx", "sse4_2"}, ""))
    monkeypatch.setenv(build.ENV, "auto")
    with pytest.raises(RuntimeError, match="avx2: CPU lacks avx2, fma, f16c"):
        build.choose()


@pytest.mark.parametrize("value, reason", [("torch", "INTERNVL_KERNELS=torch"), ("sse", "expected one of")])
def test_override_torch_or_unknown_means_no_kernels(monkeypatch, value, reason):
    monkeypatch.setenv(build.ENV, value)
    build.reset()
    try:
        assert not kernels.available() and reason in kernels.unavailable_reason()
        assert kernels.describe().startswith("CPU kernels: none, plain torch")
    finally:
        monkeypatch.undo()
        build.reset()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("gcc") is None,
                    reason="compile-only check needs gcc on x86-64 (it checks the C, not the CPU)")
@pytest.mark.parametrize("name", list(build.VARIANTS))
def test_every_variant_compiles(name, tmp_path):
    objs = build.compile_objects(build.VARIANTS[name], shutil.which("gcc"), build.HERE, str(tmp_path / name))
    assert len(objs) == len(build.VARIANTS[name].sources) and all((tmp_path / o).exists() for o in objs)
