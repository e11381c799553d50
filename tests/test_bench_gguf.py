"""benchmarks/gguf_export.py: a tiny Qwen2 language model written as GGUF reads back (gguf.GGUFReader) with every
tensor under llama.cpp's qwen2 name, in the right type, and equal to ours after dequantization."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[bench]')")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gguf_export import gguf_name, write_gguf

from internvl.checkpoint.io import build_model
from internvl.kernels import dequantize_int4, quantize_int4
from internvl.presets import preset

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = build_model(preset("tiny"), meta=False).language_model.to(torch.bfloat16)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot pass
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p, dtype=torch.float32))
    return model


def _read(path: Path) -> tuple[dict[str, tuple[object, np.ndarray]], gguf.GGUFReader]:
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type, data.reshape(list(reversed([int(n) for n in t.shape]))))
    return out, reader


def _field(reader, key):
    return reader.fields[key].contents()


def test_gguf_names_types_and_bf16_values(lm, tmp_path):
    state = lm.state_dict()
    tensors, reader = _read(write_gguf(state, lm.config, tmp_path / "m.gguf", "bf16"))
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.block_count") == 2
    assert _field(reader, "qwen2.attention.head_count_kv") == 2
    assert len(_field(reader, "tokenizer.ggml.tokens")) == 512  # one token per embedding row
    assert set(tensors) == {gguf_name(k) for k in state}
    assert len(tensors) == len(state) == 3 + 2 * 12
    assert tensors["blk.1.attn_k.bias"][0] == T.F32 and tensors["blk.0.ffn_down.weight"][0] == T.BF16
    for ours, w in state.items():
        _, data = tensors[gguf_name(ours)]
        assert data.shape == tuple(w.shape), ours
        np.testing.assert_array_equal(data, w.float().numpy(), err_msg=ours)  # bf16 -> BF16 / F32 is exact


def test_gguf_q8_0_and_q4_0_dequantize_to_ours(lm, tmp_path):
    state = lm.state_dict()
    q8, _ = _read(write_gguf(state, lm.config, tmp_path / "q8.gguf", "q8_0"))
    q4, _ = _read(write_gguf(state, lm.config, tmp_path / "q4.gguf", "q4_0"))
    assert q8["blk.0.attn_q.weight"][0] == T.Q8_0 and q4["output.weight"][0] == T.Q4_0
    assert q4["token_embd.weight"][0] == T.BF16  # one row per token: kept as ours keeps it
    for ours, w in state.items():
        name, ref = gguf_name(ours), w.float()
        if w.dim() == 1 or name == "token_embd.weight":
            np.testing.assert_array_equal(q8[name][1], ref.numpy())
            continue
        # Q8_0: half a step per group of 32, plus the fp16 rounding of the scale (2^-11 relative, times 127)
        step = ref.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
        err = (torch.from_numpy(q8[name][1]) - ref).reshape(-1, 32).abs()
        assert (err <= step * (0.5 + 127 / 2048) + 1e-8).all(), ours
        # Q4_0 is our int4 format: the values of our quantizer, but where w / d + 8.5 lands within float32
        # rounding of an integer (gguf-py computes it in float32, ours in float64): there one step apart
        mine = dequantize_int4(*quantize_int4(w))
        diff = (torch.from_numpy(q4[name][1]) - mine).reshape(-1, 32).abs()
        d = ref.reshape(-1, 32).abs().amax(1, keepdim=True) / 8
        assert (diff <= d * 1.001).all() and (diff == 0).float().mean() > 0.99, ours


def test_gguf_refuses_unknown_tensors(lm, tmp_path):
    state = dict(lm.state_dict())
    state["model.layers.0.self_attn.qkv_proj.weight"] = state.pop("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match="no qwen2 tensor for 'model.layers.0.self_attn.qkv_proj.weight'"):
        write_gguf(state, lm.config, tmp_path / "x.gguf")
