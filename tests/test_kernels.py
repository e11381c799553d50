"""The AVX-512 decode kernels against torch in fp32, their fallbacks, and the compiled-library cache."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from internvl import kernels
from internvl.kernels import FastBf16Linear, Int8Linear, build

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"kernels unavailable: {kernels.unavailable_reason()}")

# (N, K): odd sizes exercise the masked tails (K % 32, K % 64, K % 16) and the thread split of N.
SHAPES = [(1, 1), (7, 33), (33, 77), (130, 100), (129, 896), (300, 4864), (2000, 513)]


def _data(m, n, k, xdtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(xdtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


def _assert_close(y, ref, x_dtype):
    """bf16 outputs are rounded once (<= 2^-8 relative); fp32 outputs carry only accumulation error."""
    scale = ref.abs().max().item() + 1e-6
    if x_dtype == torch.bfloat16:
        torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=2**-8 * scale)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * scale)


@needs_kernels
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_linear_bf16_matches_fp32_reference(m, x_dtype):
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _data(m, n, k, x_dtype, bias=i % 2 == 0, seed=i)
        y = kernels.linear_bf16(x, w, b)
        assert y.dtype == x_dtype and y.shape == (m, n)
        _assert_close(y, F.linear(x.float(), w.float(), b), x_dtype)


@needs_kernels
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_linear_int8_matches_dequantized_reference(m, x_dtype):
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _data(m, n, k, x_dtype, bias=i % 2 == 1, seed=100 + i)
        q, s = kernels.quantize_int8(w)
        y = kernels.linear_int8(x, q, s, b)
        assert y.dtype == x_dtype and y.shape == (m, n)
        _assert_close(y, F.linear(x.float(), kernels.dequantize_int8(q, s), b), x_dtype)


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_linear_int8_quantize_x_error_is_bounded(m):
    """Rounding x to 16 bits per row moves each product by at most |w| * max|x| / 65278."""
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _data(m, n, k, torch.float32, bias=i % 2 == 0, seed=200 + i)
        x[0, 0] = 30.0  # an outlier sets the row's quantization step
        q, s = kernels.quantize_int8(w)
        wd = kernels.dequantize_int8(q, s)
        y = kernels.linear_int8(x, q, s, b, quantize_x=True)
        ref = F.linear(x.double(), wd.double(), None if b is None else b.double())
        bound = wd.abs().sum(1).double() * x.abs().amax(1, keepdim=True).double() / 65278
        assert ((y.double() - ref).abs() <= bound * 1.01 + 1e-5 * (1 + ref.abs())).all()
        yb = kernels.linear_int8(x.bfloat16(), q, s, b, quantize_x=True)
        _assert_close(yb, F.linear(x.bfloat16().float(), wd, b), torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("m", [9, 13, 16])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_9_to_16_rows_match_the_references(m, x_dtype):
    """Beyond the vector loops' 8 rows: AMX takes all rows in one tile (two for quantized x); the vector
    path, where AMX is off or for the last rows of W, runs blocks of 8 rows over the same weights."""
    old = kernels.ops.set_amx_min_rows(2)
    try:
        for amx in (2, 0):
            kernels.ops.set_amx_min_rows(amx)
            for i, (n, k) in enumerate(SHAPES[1:]):
                x, w, b = _data(m, n, k, x_dtype, bias=i % 2 == 0, seed=400 + i)
                q, s = kernels.quantize_int8(w)
                wd = kernels.dequantize_int8(q, s)
                _assert_close(kernels.linear_bf16(x, w, b), F.linear(x.float(), w.float(), b), x_dtype)
                _assert_close(kernels.linear_int8(x, q, s, b), F.linear(x.float(), wd, b), x_dtype)
                fast, ref = kernels.linear_int8(x, q, s, b, quantize_x=True), F.linear(x.float(), wd, b)
                torch.testing.assert_close(fast.float(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())
    finally:
        kernels.ops.set_amx_min_rows(old)


@needs_kernels
def test_argmax_rows_matches_torch():
    """The first maximum (ties), the first NaN, all -inf rows, fp32 and bf16, a row stride from slicing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 1001, generator=g).bfloat16()[:, 1]  # rows 3 * 1001 elements apart
    x[1, 10] = x[1, 900] = 40
    x[2] = float("-inf")
    x[3, 5], x[3, 50] = float("nan"), float("nan")
    x[4, -1] = 40  # in the masked tail
    for t in (x, x.float(), x[:, :17], x[:1]):
        assert kernels.argmax_rows(t) == torch.argmax(t, -1).tolist()
    assert kernels.argmax_rows(x)[1:4] == [10, 0, 5]


@pytest.mark.skipif(not kernels.ops.amx_available(), reason="no AMX on this CPU/kernel: one kernel path only")
@pytest.mark.parametrize("m", [2, 3, 4, 8, 12, 16])
def test_amx_tiles_match_vector_path(m):
    """Batched rows run AMX tiles (bf16 x, or quantized x); the AVX-512 path must give the same outputs."""
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _data(m, n, k, torch.bfloat16, bias=i % 2 == 0, seed=300 + i)
        q, s = kernels.quantize_int8(w)
        calls = [partial(kernels.linear_bf16, x, w, b), partial(kernels.linear_int8, x, q, s, b),
                 partial(kernels.linear_int8, x, q, s, b, quantize_x=True)]
        tiles = [f() for f in calls]
        old = kernels.ops.set_amx_min_rows(0)
        try:
            vector = [f() for f in calls]
        finally:
            kernels.ops.set_amx_min_rows(old)
        for t, v in zip(tiles, vector):  # summation order differs: at most one bf16 rounding step apart
            torch.testing.assert_close(t.float(), v.float(), rtol=2**-8, atol=2**-8 * v.abs().max().item())


@needs_kernels
def test_bias_in_bf16_and_leading_dims_and_noncontiguous_x():
    x, w, b = _data(6, 129, 96, torch.bfloat16, bias=True)
    x3 = x.t().contiguous().t().reshape(2, 3, 96)  # leading dims, built from a transposed copy
    xs = torch.randn(96, 6).to(torch.bfloat16).t()  # non-contiguous
    ref = F.linear(x3.float(), w.float(), b.bfloat16().float())
    _assert_close(kernels.linear_bf16(x3, w, b.bfloat16()), ref, torch.bfloat16)
    _assert_close(kernels.linear_bf16(xs, w), F.linear(xs.float(), w.float()), torch.bfloat16)


@needs_kernels
def test_concurrent_callers_get_their_own_results():
    """Each Python thread has its own parameter block and x scratch (ctypes drops the GIL)."""
    jobs = [_data(m, 300, 257, torch.bfloat16, bias=True, seed=m) for m in range(1, 9)]
    refs = [kernels.linear_bf16(x, w, b) for x, w, b in jobs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            outs = list(pool.map(lambda job: kernels.linear_bf16(*job), jobs))
            assert all(torch.equal(o, r) for o, r in zip(outs, refs))


def test_quantize_int8_kernel_matches_torch(monkeypatch):
    w = torch.randn(70, 133) * torch.rand(70, 1)
    w[3] = 0  # an all-zero row gets scale 1
    q, s = kernels.quantize_int8(w.bfloat16())
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.abs().max() <= 127
    assert s[3] == 1 and (q[3] == 0).all()
    monkeypatch.setattr(build, "load", lambda: None)  # the plain torch path
    q2, s2 = kernels.quantize_int8(w.bfloat16())
    assert torch.equal(q, q2) and torch.equal(s, s2)
    err = (kernels.dequantize_int8(q, s) - w.bfloat16().float()).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_int8_matches_torch(dtype):
    q, s = kernels.quantize_int8(torch.randn(37, 70))
    ref = (q.float() * s[:, None]).to(dtype)
    assert torch.equal(kernels.dequantize_int8(q, s, dtype), ref)


@pytest.mark.parametrize("m", [9, 16, 40])
@pytest.mark.parametrize("quantize_x", [False, True])
def test_linear_int8_many_rows(monkeypatch, m, quantize_x):
    """Beyond MAX_ROWS: slices of the streaming kernel, then (prefill) the dequantized weight in blocks."""
    monkeypatch.setattr(kernels.ops, "DENSE_BLOCK_BYTES", 32 * 96 * 2)  # 32-row blocks of 130: the loop runs
    x, w, b = _data(m, 130, 96, torch.bfloat16, bias=True, seed=m)
    q, s = kernels.quantize_int8(w)
    y = kernels.linear_int8(x.view(1, m, 96), q, s, b, quantize_x=quantize_x)
    assert y.shape == (1, m, 130) and y.dtype == torch.bfloat16
    ref = F.linear(x.float(), kernels.dequantize_int8(q, s), b)
    torch.testing.assert_close(y[0].float(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


def test_more_rows_than_max_use_torch(monkeypatch):
    results = []
    real = kernels.ops.gemv
    monkeypatch.setattr(kernels.ops, "gemv", lambda *a: results.append(real(*a)) or results[-1])
    x, w, b = _data(kernels.MAX_ROWS + 1, 40, 64, torch.bfloat16, bias=True)
    y = kernels.linear_bf16(x, w, b)
    assert all(r is None for r in results)  # the kernel declined; F.linear answered
    torch.testing.assert_close(y, F.linear(x, w, b.bfloat16()))


def test_autograd_input_falls_back_with_gradients():
    x, w, _ = _data(2, 16, 32, torch.float32, bias=False)
    x.requires_grad_(True)
    kernels.linear_bf16(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.float().sum(0).expand(2, -1))


@pytest.mark.parametrize("m", [1, 5, 17])
def test_modules_match_nn_linear(m):
    torch.manual_seed(0)
    lin = nn.Linear(200, 150).to(torch.bfloat16)
    x = torch.randn(m, 200).to(torch.bfloat16)
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    fast = FastBf16Linear.from_linear(lin)
    assert fast.weight.data_ptr() == lin.weight.data_ptr()  # shares storage
    with torch.no_grad():
        _assert_close(fast(x), ref, torch.bfloat16)
        for quantize_x in (False, True):
            q8 = Int8Linear.from_linear(lin, quantize_x=quantize_x)
            ref8 = F.linear(x.float(), kernels.dequantize_int8(q8.qweight, q8.scale), lin.bias.float())
            y8 = q8(x)
            assert y8.dtype == torch.bfloat16 and y8.shape == (m, 150)
            torch.testing.assert_close(y8.float(), ref8, rtol=2**-7, atol=2**-7 * ref8.abs().max().item())
    assert set(q8.state_dict()) == {"qweight", "scale", "bias"}


def test_disabled_by_env_uses_torch(monkeypatch):
    monkeypatch.setenv("INTERNVL_NO_KERNELS", "1")
    build.reset()
    try:
        assert not kernels.available()
        assert "INTERNVL_NO_KERNELS" in kernels.unavailable_reason()
        x, w, b = _data(3, 50, 40, torch.bfloat16, bias=True)
        torch.testing.assert_close(kernels.linear_bf16(x, w, b), F.linear(x, w, b.bfloat16()))
        q, s = kernels.quantize_int8(w)
        y = kernels.linear_int8(x, q, s, b)
        ref = F.linear(x, kernels.dequantize_int8(q, s, torch.bfloat16), b.bfloat16())
        torch.testing.assert_close(y, ref)
        with torch.no_grad():
            y2 = Int8Linear(q, s, b)(x.float())
        assert y2.dtype == torch.float32
    finally:
        monkeypatch.delenv("INTERNVL_NO_KERNELS")
        build.reset()


@needs_kernels
def test_cache_build_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERNVL_CACHE", str(tmp_path))
    build.reset()
    try:
        assert kernels.available()
        built = list((tmp_path / "kernels").glob("gemv-*.so"))
        assert len(built) == 1 and not list((tmp_path / "kernels").glob("*.tmp"))
        mtime = built[0].stat().st_mtime_ns

        def no_compile(*a):
            raise AssertionError("recompiled although the cached library exists")

        monkeypatch.setattr(build, "build", no_compile)
        build.reset()
        assert kernels.available() and built[0].stat().st_mtime_ns == mtime
    finally:
        monkeypatch.undo()
        build.reset()


def test_compile_failure_means_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERNVL_CACHE", str(tmp_path))  # empty cache: load() must compile
    monkeypatch.setattr(build, "_compiler", lambda: "false")  # a "compiler" that always fails
    build.reset()
    try:
        assert not kernels.available() and kernels.unavailable_reason()
        assert not list(tmp_path.rglob("*.so*")) and not list(tmp_path.rglob("*.o"))
        x, w, _ = _data(1, 8, 8, torch.bfloat16, bias=False)
        torch.testing.assert_close(kernels.linear_bf16(x, w), F.linear(x, w))
    finally:
        monkeypatch.undo()
        build.reset()


# ---- the one-call decode step (kernels/decode.c) against the modules it stands in for ----

def _tiny_lm(seed=0, **over):
    from internvl.config import LLMConfig
    from internvl.model.llm import CausalLM

    kw = {"vocab_size": 97, "hidden_size": 40, "intermediate_size": 72, "num_hidden_layers": 2,
          "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 24, "max_position_embeddings": 4096}
    cfg = LLMConfig(**{**kw, **over})
    torch.manual_seed(seed)
    lm = CausalLM(cfg)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return lm.to(torch.bfloat16).eval()


def _accelerated(lm, mode):
    from internvl.engine.accelerate import quantize_model, use_decode_kernels

    fast = copy.deepcopy(lm)
    (quantize_model if mode == "int8" else use_decode_kernels)(SimpleNamespace(language_model=fast))
    return fast


def _step(lm):
    """The decode step an engine chooses for this language model (engine/accelerate.py)."""
    from internvl.engine.accelerate import decode_step

    return decode_step(SimpleNamespace(language_model=lm, decode=lm.decode))


def _prefill(lm, prompts, step=None):
    """One cache row per prompt, each prefilled alone and joined (as the engine does, which runs a 1-token
    prompt as a decode `step`); capacity 16 makes decoding grow the cache."""
    cache = None
    for p in prompts:
        c = lm.new_cache(1, capacity=16)
        if len(p) == 1 and step is not None:
            step(torch.tensor(p), c)
        else:
            lm(lm.embed(torch.tensor([p])), cache=c, logits_to_keep=1)
        if cache is None:
            cache = c
        else:
            cache.concat(c)
    return cache


class _Spy:
    """Counts the decode steps the fused decoder of a FusedStep answered."""

    def __init__(self, step):
        self.real, self.hits = step.fused, 0
        step.fused = self

    def __call__(self, embeds, cache, valid_lengths=None):
        out = self.real(embeds, cache, valid_lengths)
        self.hits += out is not None
        return out


def _decode_both(ref, fast, prompts, steps, finished_row=None):
    """The same random tokens fed to both (model, decode step) pairs after their prompts; the logits of
    each step."""
    caches = [_prefill(m, prompts, step) for m, step in (ref, fast)]
    tokens = torch.randint(0, ref[0].config.vocab_size, (steps, len(prompts)), generator=torch.Generator().manual_seed(9))
    outs = ([], [])
    for i in range(steps):
        valid = torch.ones(len(prompts), dtype=torch.long)
        if finished_row is not None and i >= 2:
            valid[finished_row] = 0  # a finished row stays in the batch without advancing
        for (_, step), c, out in zip((ref, fast), caches, outs):
            out.append(step(tokens[i], c, valid).float())
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    return torch.stack(outs[0]), torch.stack(outs[1]), caches


CONFIGS = {
    "qwen2 gqa3 head24": {},
    "llama gqa5 head80 linear-rope": {
        "family": "llama", "hidden_size": 72, "intermediate_size": 100, "num_attention_heads": 10,
        "num_key_value_heads": 2, "head_dim": 80, "qkv_bias": False, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "qwen2 mha head16 o-bias dynamic-rope": {
        "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
        "o_bias": True, "max_position_embeddings": 24, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
}


@needs_kernels
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_fused_decode_step_is_as_accurate_as_the_torch_modules(config, rows):
    """Rows of different lengths (one stops advancing), odd head and hidden sizes, GQA, biases and RoPE
    scalings: the one-call step stays as close to an fp32 model as the bf16 torch modules are."""
    lm = _tiny_lm(seed=rows, **CONFIGS[config])
    fast = _accelerated(lm, "bf16")
    step = _step(fast)
    spy = _Spy(step)
    truth = copy.deepcopy(lm).float()
    g = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (rows,), generator=g)]
    finished = rows - 1 if rows > 1 else None
    with torch.inference_mode():
        want, got, caches = _decode_both((lm, lm.decode), (fast, step), prompts, steps=6, finished_row=finished)
        exact, _, _ = _decode_both((truth, truth.decode), (truth, truth.decode), prompts, steps=6, finished_row=finished)
    assert spy.hits == 6 + sum(len(p) == 1 for p in prompts)  # a 1-token prompt's prefill is a step too
    scale = exact.abs().max()
    err_fast, err_torch = (got - exact).abs().max() / scale, (want - exact).abs().max() / scale
    assert err_fast <= 2 * err_torch + 2**-7, (err_fast, err_torch)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # the cache rows written in C
        torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05 * a.abs().max().item())


def _fast_and_modules(lm, dtype: str, quantize_x: bool = False):
    """The accelerated model with its C decode step (int8 with quantized activations when asked), and a copy
    of it that decodes through its modules; (model, step) pairs."""
    fast = _accelerated(lm, dtype)
    if quantize_x:
        for m in fast.modules():
            if isinstance(m, Int8Linear):
                m.quantize_x, m._op = True, kernels.ops._OP_INT8_FAST
    modules = copy.deepcopy(fast)
    return (fast, _step(fast)), (modules, modules.decode)


@needs_kernels
@pytest.mark.parametrize("quantize_x", [False, True])
def test_fused_decode_step_int8_matches_the_int8_modules(quantize_x):
    fast, modules = _fast_and_modules(_tiny_lm(seed=3), "int8", quantize_x)
    spy = _Spy(fast[1])
    prompts = [[1, 2, 3], list(range(5, 25)), [7]]
    with torch.inference_mode():
        want, got, _ = _decode_both(modules, fast, prompts, steps=5)
    assert spy.hits == 5 + 1  # and the prefill of [7]
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * want.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("rows", [9, 16])
@pytest.mark.parametrize("mode", ["bf16", "int8", "int8 quantized x"])
def test_fused_decode_step_takes_up_to_16_rows(rows, mode):
    """9 to 16 rows (different cache lengths, one row finished) run in C, never the per-module path, and
    give what the modules give."""
    fast, modules = _fast_and_modules(_tiny_lm(seed=rows), "bf16" if mode == "bf16" else "int8",
                                      mode == "int8 quantized x")  # fmt: skip
    spy = _Spy(fast[1])
    g = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(0, 97, (2 + 3 * i,), generator=g).tolist() for i in range(rows)]
    with torch.inference_mode():
        want, got, caches = _decode_both(modules, fast, prompts, steps=4, finished_row=rows // 2)
    assert spy.hits == 4
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * want.abs().max().item())
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05 * a.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_decode_step_any_thread_count(threads):
    """The phases split rows, heads and columns among however many threads run the step."""
    lm = _tiny_lm(seed=5, **CONFIGS["llama gqa5 head80 linear-rope"])
    fast, modules = _fast_and_modules(lm, "bf16")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            want, got, _ = _decode_both(modules, fast, [[1, 2, 3], list(range(40)), [5, 6]], steps=3)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * want.abs().max().item())


@needs_kernels
def test_fused_decode_declines_what_it_does_not_cover():
    from internvl.engine.accelerate import FusedStep

    lm = _tiny_lm()
    fast = _accelerated(lm, "bf16")
    step = _step(fast)
    spy = _Spy(step)
    prompts = [[1, 2, 3]] * (kernels.MAX_ROWS + 1)
    tok = torch.tensor([4])
    with torch.no_grad():
        want, got, _ = _decode_both((lm, lm.decode), (fast, step), prompts, steps=2)  # more rows than it takes
        assert spy.hits == 0
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
        cache = _prefill(fast, [[1, 2, 3]])
        fast(fast.embed(tok[:, None]), cache=cache, positions=torch.tensor([[3]]))  # the modules' forward: never C
        calls = []
        handle = fast.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
        step(tok, cache)  # a hook added after the decoder was built
        handle.remove()
        assert calls == [1] and spy.hits == 0
        step(tok, cache)
        assert spy.hits == 1
    with torch.enable_grad():
        step(tok, cache)  # autograd: the modules
    assert spy.hits == 1 and cache.lengths.tolist() == [7]
    twin = copy.deepcopy(fast)  # a copy's step reads the copy's weights
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
        twin_step = _step(twin)
        a = step(tok, _prefill(fast, [[1, 2, 3]]))
        b = twin_step(tok, _prefill(twin, [[1, 2, 3]]))
    assert isinstance(twin_step, FusedStep) and twin_step.fused.bound and torch.equal(b, -a)
    hits = spy.hits
    fast.float()  # new tensors: the decoder binds again, and an fp32 model has none
    with torch.no_grad():
        step(tok, _prefill(fast, [[1, 2, 3]]))
    assert spy.hits == hits and not spy.real.bound
    lm32 = _accelerated(lm.float(), "bf16")
    assert not isinstance(_step(lm32), FusedStep)


def test_fused_decode_off_without_kernels(monkeypatch):
    from internvl.engine.accelerate import FusedStep

    monkeypatch.setenv("INTERNVL_NO_KERNELS", "1")
    build.reset()
    try:
        lm = _tiny_lm()
        fast = _accelerated(lm, "bf16")
        step = _step(fast)
        assert not isinstance(step, FusedStep)
        with torch.inference_mode():
            want, got, _ = _decode_both((lm, lm.decode), (fast, step), [[1, 2, 3], [4]], steps=3)
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
    finally:
        monkeypatch.delenv("INTERNVL_NO_KERNELS")
        build.reset()


def test_collapse_to_hugepages_keeps_addresses_and_contents():
    from internvl.kernels.memory import HUGE, collapse_to_hugepages

    ts = [torch.randn(3 * HUGE // 4 + 17), torch.randn(1000), torch.empty(0)]
    before = [(t.data_ptr(), t.clone()) for t in ts]
    done = collapse_to_hugepages(ts)
    assert 0 <= done <= ts[0].numel() * 4 and done % HUGE == 0
    assert all(t.data_ptr() == p and torch.equal(t, c) for t, (p, c) in zip(ts, before))
