"""InternVL3.5 on Qwen3 and Qwen3-MoE: parity with transformers in both layouts, the MoE routing, the configs,
and the C decode step declining layers it does not compute."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from refmodels import (
    IMAGE_TOKEN_ID,
    assert_logits_match,
    greedy_tokens,
    hf_reference,
    prompt_with_images,
    save_reference,
)

from internvl.checkpoint.hf import from_hf_dict, to_hf_dict
from internvl.checkpoint.io import load_model
from internvl.checkpoint.original import from_original_dict, to_original_dict
from internvl.cli.main import main as cli
from internvl.config import LLMConfig
from internvl.model.llm import MLP, CausalLM
from internvl.model.moe import SparseMoE, dispatch, route
from internvl.presets import preset

ARCH = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module", params=list(ARCH))
def folders(request, tmp_path_factory):
    """(transformers model, its -hf folder, our original-layout conversion of it)."""
    text = request.param
    ref = hf_reference(text, "300m", seed=4)
    hf = save_reference(ref, tmp_path_factory.mktemp(f"hf-{text}"))
    orig = tmp_path_factory.mktemp(f"orig-{text}") / "m"
    assert cli(["convert", str(hf), str(orig), "--to", "original"]) == 0
    return text, ref, hf, orig


def _load(folder):
    model, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert not report.missing and not report.unexpected
    return model, report


def test_configs_name_the_family(folders):
    text, _, hf, orig = folders
    ours, report = _load(hf)
    assert report.layout == "hf" and ours.config.llm.family == text and ours.config.llm.head_dim == 24
    assert ours.config.llm.rope_theta == 1e6  # transformers 5 writes it inside rope_parameters
    cfg = json.loads((orig / "config.json").read_text())
    assert cfg["llm_config"]["architectures"] == [ARCH[text]] and cfg["llm_config"]["model_type"] == text
    assert cfg["template"] == "internvl2_5" and cfg["llm_config"]["head_dim"] == 24
    if text == "qwen3_moe":
        llm = cfg["llm_config"]
        assert (llm["num_experts"], llm["num_experts_per_tok"], llm["moe_intermediate_size"]) == (8, 2, 32)
        assert llm["norm_topk_prob"] is True and llm["mlp_only_layers"] == [1]
        layers = ours.language_model.model.layers
        assert isinstance(layers[0].mlp, SparseMoE) and isinstance(layers[1].mlp, MLP)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_logits_match_transformers(folders, layout):
    _, ref, hf, orig = folders
    ours, report = _load(hf if layout == "hf" else orig)
    assert report.layout == layout
    ids, pv = prompt_with_images([1, 3, 2], seed=2)
    assert_logits_match(ref, ours, ids, pv)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_32_greedy_tokens_equal_transformers_generate(folders, layout):
    _, ref, hf, orig = folders
    ours, _ = _load(hf if layout == "hf" else orig)
    ids, pv = prompt_with_images([2, 1], seed=11)
    expected, got = greedy_tokens(ref, ours, ids, pv)
    assert got == expected


def _naive_moe(x, gate, experts, top_k, normalize):
    """Every expert on every token, weighted by the router's (renormalized) top-k softmax."""
    probs = torch.softmax(x @ gate.T, dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    if normalize:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for w, e in zip(top[n], idx[n]):
            out[n] += w * experts[int(e)](x[n : n + 1])[0]
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_moe_matches_the_naive_sum_and_runs_only_routed_experts(normalize):
    torch.manual_seed(0)
    cfg = LLMConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    moe = SparseMoE(16, 6, 2, normalize, lambda: MLP(cfg, 8))
    x = torch.randn(2, 5, 16)
    want = _naive_moe(x.reshape(-1, 16), moe.gate.weight, moe.experts, 2, normalize).reshape(2, 5, 16)
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    flat = x.reshape(-1, 16)
    weights, indices = route(moe.gate(flat), 2, normalize)
    seen: dict[int, int] = {}

    def run(e, rows):
        seen[e] = rows.shape[0]
        return moe.experts[e](rows)

    dispatch(flat, weights, indices, run)
    assert sum(seen.values()) == flat.shape[0] * 2  # each (token, slot) pair once
    assert set(seen) == set(indices.flatten().tolist())  # experts nobody chose never run


def test_moe_is_differentiable():
    torch.manual_seed(1)
    cfg = LLMConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    moe = SparseMoE(16, 4, 2, True, lambda: MLP(cfg, 8))
    x = torch.randn(6, 16, requires_grad=True)
    moe(x).square().sum().backward()
    assert x.grad is not None and moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    used = [e for e in moe.experts if e.down_proj.weight.grad is not None]
    assert used and all(e.down_proj.weight.grad.abs().sum() > 0 for e in used)


def test_sparse_layers_follow_mlp_only_layers_and_sparse_step():
    base = {"family": "qwen3_moe", "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 6, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 8, "qkv_bias": False, "o_bias": False}
    cfg = LLMConfig(**base, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [cfg.sparse(i) for i in range(6)] == [False, True, False, False, False, True]
    lm = CausalLM(cfg)
    assert [isinstance(layer.mlp, SparseMoE) for layer in lm.model.layers] == [cfg.sparse(i) for i in range(6)]
    assert not LLMConfig(**{**base, "family": "qwen3"}).sparse(1)
    with pytest.raises(Exception, match="num_experts_per_tok"):
        LLMConfig(**{**base, "num_experts_per_tok": 5})


@pytest.mark.parametrize("name", ["internvl3.5-1b", "internvl3.5-moe-small", "internvl3.5-30b-a3b"])
def test_presets_round_trip_both_config_layouts(name):
    cfg = preset(name)
    assert cfg.llm.family in ARCH and cfg.llm.head_dim == 128 and not cfg.llm.qkv_bias
    assert from_original_dict(to_original_dict(cfg), "x").llm == cfg.llm
    assert from_hf_dict(to_hf_dict(cfg, 151671), "x").llm == cfg.llm


def _tiny_lm(family: str) -> CausalLM:
    cfg = LLMConfig(family=family, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=False, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=16, rope_theta=10000.0)  # fmt: skip
    torch.manual_seed(0)
    lm = CausalLM(cfg)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return lm.to(torch.bfloat16).eval()


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_accelerated_decode_declines_the_c_step_for_qwen3(mode):
    """q/k norms and experts are not in decode.c: the engine keeps the model's own decode (same logits as
    the fused torch modules), while a plain Qwen2 decoder still gets the C step where kernels exist."""
    import copy

    from internvl import kernels
    from internvl.engine.accelerate import FusedStep, decode_step, quantize_model, use_decode_kernels

    accelerate = quantize_model if mode == "int8" else use_decode_kernels
    for family in ARCH:
        lm = _tiny_lm(family)
        fast = copy.deepcopy(lm)
        accelerate(SimpleNamespace(language_model=fast))
        step = decode_step(SimpleNamespace(language_model=fast, decode=fast.decode))
        assert not isinstance(step, FusedStep)
        with torch.no_grad():
            caches = [m.new_cache(1) for m in (lm, fast)]
            for m, c in zip((lm, fast), caches):
                m(m.embed(torch.tensor([[1, 2, 3]])), cache=c)
            want, got = lm.decode(torch.tensor([4]), caches[0]).float(), step(torch.tensor([4]), caches[1]).float()
        tol = 0.1 if mode == "int8" else 0.05
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    plain = _tiny_lm("qwen2")
    accelerate(SimpleNamespace(language_model=plain))
    step = decode_step(SimpleNamespace(language_model=plain, decode=plain.decode))
    assert isinstance(step, FusedStep) == kernels.available()


def test_our_hf_layout_loads_in_transformers(folders, tmp_path):
    """original -> -hf by `internvl convert`: transformers reads our text_config (experts, head_dim) and keys."""
    from transformers import InternVLForConditionalGeneration

    _, ref, _, orig = folders
    assert cli(["convert", str(orig), str(tmp_path / "hf"), "--to", "hf", "--image-token-id", str(IMAGE_TOKEN_ID)]) == 0
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, pv = prompt_with_images([2], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pv).logits,
                                   ref(input_ids=ids, pixel_values=pv).logits, atol=1e-5, rtol=0)  # fmt: skip


def test_int8_keeps_the_router_unquantized():
    from internvl.engine.accelerate import quantize_model
    from internvl.kernels.modules import Int8Linear

    lm = _tiny_lm("qwen3_moe")
    quantize_model(SimpleNamespace(language_model=lm), "int8")
    moe = lm.model.layers[0].mlp
    assert type(moe.gate) is torch.nn.Linear and isinstance(moe.experts[0].down_proj, Int8Linear)
    assert isinstance(lm.model.layers[0].self_attn.o_proj, Int8Linear)


def test_moe_decoder_trains_with_and_without_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        lm = _tiny_lm("qwen3_moe").float().train()
        lm.gradient_checkpointing = checkpointing
        logits = lm(lm.embed(torch.tensor([[1, 2, 3, 4, 5, 6]])))
        torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor([2, 3, 4, 5, 6])).backward()
        grads.append({n: p.grad for n, p in lm.named_parameters() if p.grad is not None})
    assert "model.layers.0.mlp.gate.weight" in grads[0] and "model.layers.0.self_attn.q_norm.weight" in grads[0]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4)
