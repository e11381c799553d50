"""Logit parity with transformers' InternVLForConditionalGeneration, in both checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch
from refmodels import (
    IMAGE_TOKEN_ID,
    greedy_tokens,
    hf_reference,
    prompt_with_images,
    save_reference,
)
from safetensors.torch import save_file

from internvl.checkpoint.io import load_model
from internvl.cli.main import main as cli

VARIANTS = [("qwen2", "300m"), ("qwen2", "6b"), ("llama", "300m"), ("llama", "6b")]
PROMPTS = {"one image": [3], "three images": [1, 3, 2]}


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def reference(request, tmp_path_factory):
    text, vision = request.param
    model = hf_reference(text, vision)
    folder = save_reference(model, tmp_path_factory.mktemp(f"hf-{text}-{vision}"))
    return model, folder


def _logits(model, ids, pixel_values, ours: bool):
    with torch.no_grad():
        if ours:
            return model(ids, pixel_values).logits
        return model(input_ids=ids, pixel_values=pixel_values).logits


@pytest.mark.parametrize("prompt", PROMPTS, ids=list(PROMPTS))
def test_hf_layout_matches_reference(reference, prompt):
    ref, folder = reference
    ours, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == "hf" and not report.missing and not report.unexpected
    ids, pv = prompt_with_images(PROMPTS[prompt])
    expected = _logits(ref, ids, pv, ours=False)
    got = _logits(ours, ids, pv, ours=True)
    assert expected.shape == got.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS, ids=list(PROMPTS))
def test_original_layout_after_conversion_matches_reference(reference, prompt, tmp_path):
    ref, folder = reference
    assert cli(["convert", str(folder), str(tmp_path / "orig"), "--to", "original"]) == 0
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat" and "llm_config" in cfg
    ours, report = load_model(tmp_path / "orig", image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == "original"
    ids, pv = prompt_with_images(PROMPTS[prompt], seed=1)
    torch.testing.assert_close(_logits(ours, ids, pv, True), _logits(ref, ids, pv, False), atol=1e-4, rtol=0)


def _reference_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """The InternLM2 row order written out plainly: per KV head h, its g query heads, then k_h, then v_h."""
    d = q.shape[0] // n_heads
    g = n_heads // n_kv
    rows = []
    for h in range(n_kv):
        for gi in range(g):
            head = h * g + gi
            rows.append(q[head * d : (head + 1) * d])
        rows.append(k[h * d : (h + 1) * d])
        rows.append(v[h * d : (h + 1) * d])
    return torch.cat(rows)


def test_internlm2_fused_wqkv_checkpoint_matches_llama_reference(tmp_path):
    """An InternLM2-layout checkpoint built from a Llama reference (8 query heads, 2 KV heads: g=4)."""
    ref = hf_reference("llama", "300m", heads=8, kv_heads=2, seed=3)
    hf_dir = save_reference(ref, tmp_path / "hf")
    sd = {k: v for k, v in ref.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    n_layers = ref.config.text_config.num_hidden_layers
    renames = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
               "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
               "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for key, value in sd.items():
        if key.startswith("model.language_model."):
            rest = key[len("model.language_model.") :]
            if rest.startswith("embed_tokens"):
                out["language_model.model.tok_embeddings.weight"] = value
            elif rest.startswith("norm"):
                out["language_model.model.norm.weight"] = value
            elif ".self_attn.q_proj" in rest or ".self_attn.k_proj" in rest or ".self_attn.v_proj" in rest:
                continue
            else:
                for old, new in renames.items():
                    rest = rest.replace(old, new)
                out["language_model.model." + rest] = value
        elif key == "lm_head.weight":
            out["language_model.output.weight"] = value
    for i in range(n_layers):
        p = f"model.language_model.layers.{i}.self_attn."
        out[f"language_model.model.layers.{i}.attention.wqkv.weight"] = _reference_wqkv(
            sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"], 8, 2
        )
    # vision and projector: take them from our own original-layout conversion of the same reference
    assert cli(["convert", str(hf_dir), str(tmp_path / "orig"), "--to", "original"]) == 0
    from safetensors.torch import load_file

    orig = load_file(str(tmp_path / "orig" / "model.safetensors"))
    out.update({k: v for k, v in orig.items() if k.startswith(("vision_model.", "mlp1."))})
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    llm = cfg["llm_config"]
    llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False)
    llm.pop("attention_bias", None)
    folder = tmp_path / "internlm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))

    ours, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert ours.config.llm.family == "internlm2" and not report.unexpected
    ids, pv = prompt_with_images([2, 1], seed=5)
    torch.testing.assert_close(_logits(ours, ids, pv, True), _logits(ref, ids, pv, False), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_32_greedy_tokens_equal_transformers_generate(reference, layout, tmp_path):
    """The engine's greedy decoding (prefill, then cached decode) against transformers' generate()."""

    ref, folder = reference
    if layout == "original":
        assert cli(["convert", str(folder), str(tmp_path / "orig"), "--to", "original"]) == 0
        folder = tmp_path / "orig"
    ours, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == layout
    ids, pv = prompt_with_images([2, 1], seed=7)
    expected, got = greedy_tokens(ref, ours, ids, pv)
    assert got == expected
