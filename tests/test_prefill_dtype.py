"""Prefill and the vision encoder on a CPU without native bf16 matmuls compute in fp32 (issue 16): the automatic
choice follows the CPU's flags, INTERNVL_PREFILL_DTYPE / load(prefill_dtype=...) force either path, and the fp32
path matches an fp32 reference of the same bf16 weights where the bf16 path does not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.api import load
from internvl.engine.engine import Engine
from internvl.engine.prefill import ENV, PrefillRun, Widen, choose
from internvl.errors import InternVLError
from internvl.kernels import build

CPU = torch.device("cpu")
AVX2 = ({"avx2", "fma", "f16c"}, "")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("prefill"))


@pytest.fixture(scope="module")
def llm(folder):
    return load(folder, dtype="bf16", prefill_dtype="bf16")


@pytest.fixture(scope="module")
def prompt(llm):
    ids, pv, _ = llm.prepare("What is in this picture, and what colour is it?", Image.new("RGB", (120, 60), "red"))
    torch.manual_seed(0)
    return ids, (pv.float() + 0.3 * torch.randn(pv.shape)).to(torch.bfloat16)


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    dtype, why = choose(torch.bfloat16, CPU, flags=AVX2)
    assert dtype == torch.float32 and why.startswith("fp32 (this CPU has no AMX_BF16 or AVX512_BF16")
    for native in ("avx512_bf16", "amx_bf16"):
        assert choose(torch.bfloat16, CPU, flags=({"avx2", native}, ""))[0] is None
    assert choose(torch.bfloat16, CPU, flags=(None, "not x86"))[0] is None  # unknown: unchanged
    assert choose(torch.float16, CPU, flags=({"avx512_bf16"}, ""))[0] == torch.float32  # fp16 needs its own
    assert choose(torch.float32, CPU, flags=AVX2)[0] is None
    assert choose(torch.bfloat16, torch.device("cuda"), "fp32", flags=AVX2)[0] is None  # GPUs: their own dtype


def test_forcing_and_bad_values(monkeypatch):
    monkeypatch.setenv(ENV, "fp32")
    assert choose(torch.bfloat16, CPU, flags=({"amx_bf16"}, "")) == (torch.float32, "fp32 (forced)")
    assert choose(torch.bfloat16, CPU, "bf16", flags=AVX2) == (None, "bf16 (forced)")  # the argument wins
    monkeypatch.setenv(ENV, "fp64")
    with pytest.raises(InternVLError, match="prefill dtype 'fp64'.*expected one of auto, bf16, fp32"):
        choose(torch.bfloat16, CPU)
    monkeypatch.delenv(ENV)
    with pytest.raises(InternVLError, match="expected one of auto, bf16, fp32"):
        load("no-such-folder", prefill_dtype="int8")  # refused before anything is read


def test_load_chooses_fp32_on_an_avx2_cpu_and_says_so(folder, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(build, "cpu_flags", lambda: AVX2)
    llm = load(folder, dtype="bf16")
    assert llm.engine.prefill_run.dtype == torch.float32
    assert "; prefill: fp32 (this CPU has no AMX_BF16 or AVX512_BF16" in llm.kernel_line
    assert Engine(llm.model).prefill_run.dtype == torch.float32  # an engine built without load() chooses too
    monkeypatch.setattr(build, "cpu_flags", lambda: ({"avx512_bf16", "avx2"}, ""))
    llm = load(folder, dtype="bf16")
    assert llm.engine.prefill_run.dtype is None and "prefill: bf16 (native on this CPU: AVX512_BF16)" in llm.kernel_line


def test_widen_touches_many_rows_and_mixed_dtypes_only():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    with Widen():
        assert F.linear(torch.randn(1, 16, dtype=torch.bfloat16), w).dtype == torch.bfloat16  # a GEMV: left
        assert F.linear(torch.randn(32, 16, dtype=torch.bfloat16), w).dtype == torch.float32
        assert (torch.randn(32, 16, dtype=torch.bfloat16) @ w.T).dtype == torch.float32
        assert F.linear(torch.randn(1, 16), w).dtype == torch.float32  # mixed: widened, not an error
        assert F.embedding(torch.tensor([1, 2]), w).dtype == torch.float32
    assert F.linear(torch.randn(32, 16, dtype=torch.bfloat16), w).dtype == torch.bfloat16  # only within


def test_fp32_path_matches_an_fp32_reference_of_the_same_weights(llm, prompt):
    ids, pv = prompt
    ref = copy.deepcopy(llm.model).float()
    ids = torch.tensor([ids])

    def logits(model, dtype):
        with torch.no_grad(), PrefillRun(dtype)(model, ids.shape[1], pv.shape[0]):
            return model(ids, pixel_values=pv).logits.float()

    want = logits(ref, None)
    fp32, bf16 = (logits(llm.model, dt) - want for dt in (torch.float32, None))
    assert fp32.abs().max() < 1e-3 * want.abs().max()
    assert bf16.abs().max() > 10 * fp32.abs().max()  # the bf16 path really rounds: the comparison can fail


def test_both_forced_paths_give_close_logits_and_the_same_greedy_tokens(llm, prompt):
    ids, pv = prompt
    outs = []
    for dtype in (torch.float32, None):
        llm.engine.prefill_run.dtype = dtype
        cache = llm.model.new_cache(1, capacity=len(ids) + 8)
        with torch.no_grad(), llm.engine.prefill_run(llm.model, len(ids), pv.shape[0]):
            last = llm.model.prefill(torch.tensor([ids]), pv, cache, logits_to_keep=1)[0, -1].float()
        outs.append((last, llm.generate_ids(ids, pv, max_new_tokens=8)))
    llm.engine.prefill_run.dtype = None
    (a, tokens_a), (b, tokens_b) = outs
    assert F.cosine_similarity(a, b, dim=0) > 0.99
    assert tokens_a == tokens_b and len(tokens_a) > 0
