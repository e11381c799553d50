"""Mini-InternVL on Phi-3 (Mini-InternVL-Chat-4B-V1-5, InternVL2-4B): fused qkv_proj / gate_up_proj, LongRoPE
(`longrope`, the original checkpoints' `su`) and the default RoPE, parity with transformers in both layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from refmodels import IMAGE_TOKEN_ID, TOKENS_PER_TILE, assert_logits_match, greedy_tokens, prompt_with_images

from internvl.checkpoint.io import load_model
from internvl.cli.main import main as cli

HEAD = 16  # hidden 64 / 4 heads
SHORT = [1.0 + 0.1 * i for i in range(HEAD // 2)]
LONG = [1.0 + 0.9 * i for i in range(HEAD // 2)]
ROPES = {
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": 16},
    "default": {"rope_type": "default", "rope_theta": 10000.0},
}  # fmt: skip


def phi3_reference(rope: str, seed: int = 6):
    """A transformers InternVL with a tiny Phi-3 decoder (max_position_embeddings 64; LongRoPE pretrained on 16)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
              "image_size": [56, 56], "patch_size": [14, 14], "attention_bias": True, "use_qk_norm": False,
              "norm_type": "layer_norm", "layer_scale_init_value": 0.1}
    text = {"model_type": "phi3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_parameters": ROPES[rope],
            "original_max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 511,
            "tie_word_embeddings": False, "sliding_window": None}
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False)  # fmt: skip
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(ROPES))
def folders(request, tmp_path_factory):
    """(rope kind, transformers model, its -hf folder, our original-layout conversion of it)."""
    ref = phi3_reference(request.param)
    hf = tmp_path_factory.mktemp(f"phi3-hf-{request.param}")
    ref.save_pretrained(hf)
    orig = tmp_path_factory.mktemp(f"phi3-orig-{request.param}") / "m"
    assert cli(["convert", str(hf), str(orig), "--to", "original"]) == 0
    return request.param, ref, hf, orig


def _load(folder, layout):
    model, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == layout and not report.missing and not report.unexpected
    return model


def test_configs_and_fused_keys(folders):
    rope, _, hf, orig = folders
    ours = _load(hf, "hf")
    assert ours.config.llm.family == "phi3" and ours.config.processor.template == "phi3-chat"
    cfg = json.loads((orig / "config.json").read_text())
    llm = cfg["llm_config"]
    assert llm["architectures"] == ["Phi3ForCausalLM"] and cfg["template"] == "phi3-chat"
    if rope == "longrope":
        assert llm["rope_scaling"]["rope_type"] == "longrope" and llm["rope_scaling"]["long_factor"] == LONG
        assert llm["rope_scaling"]["original_max_position_embeddings"] == 16
        # factor = max_position_embeddings / original_max = 4: sqrt(1 + ln 4 / ln 16)
        assert ours.language_model.rotary.attention_scaling == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
    from safetensors import safe_open

    with safe_open(str(orig / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.0.self_attn.qkv_proj.weight" in keys
    assert "language_model.model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) and k.startswith("language_model") for k in keys)


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("images", [[1], [1, 3, 2]], ids=["short prompt", "past original_max"])
def test_logits_match_transformers(folders, layout, images):
    _, ref, hf, orig = folders
    ours = _load(hf if layout == "hf" else orig, layout)
    ids, pv = prompt_with_images(images, seed=2, text_len=3)
    assert_logits_match(ref, ours, ids, pv)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_32_greedy_tokens_equal_transformers_generate(folders, layout):
    """A 12-token prompt: LongRoPE switches from the short to the long factors while generating."""
    _, ref, hf, orig = folders
    ours = _load(hf if layout == "hf" else orig, layout)
    ids, pv = prompt_with_images([1], seed=11, text_len=3)
    assert ids.shape[1] < 16
    expected, got = greedy_tokens(ref, ours, ids, pv)
    assert got == expected


def test_original_checkpoint_with_su_rope_and_top_level_original_max(folders, tmp_path):
    """The Mini-InternVL-Chat-4B-V1-5 config shape: rope_scaling {"type": "su", ...} and
    original_max_position_embeddings beside it, not inside."""
    rope, ref, _, orig = folders
    if rope != "longrope":
        pytest.skip("LongRoPE only")
    folder = tmp_path / "su"
    folder.mkdir()
    for f in orig.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((orig / "config.json").read_text())
    cfg["llm_config"]["rope_scaling"] = {"type": "su", "short_factor": SHORT, "long_factor": LONG}
    cfg["llm_config"]["original_max_position_embeddings"] = 16
    (folder / "config.json").write_text(json.dumps(cfg))
    ours = _load(folder, "original")
    ids, pv = prompt_with_images([1, 3, 2], seed=3, text_len=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pv).logits, ref(input_ids=ids, pixel_values=pv).logits, atol=1e-4, rtol=0)


def test_original_back_to_hf_keeps_phi3(folders, tmp_path):
    """original -> -hf (our writer): the fused tensors and LongRoPE settings survive, logits unchanged."""
    rope, ref, _, orig = folders
    hf2 = str(tmp_path / "hf2")
    assert cli(["convert", str(orig), hf2, "--to", "hf", "--image-token-id", str(IMAGE_TOKEN_ID)]) == 0
    text = json.loads((tmp_path / "hf2" / "config.json").read_text())["text_config"]
    assert text["model_type"] == "phi3" and (text["rope_scaling"] is None) == (rope == "default")
    ours = _load(tmp_path / "hf2", "hf")
    assert ours.config.processor.template == "phi3-chat"
    ids, pv = prompt_with_images([2, 1], seed=5, text_len=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pv).logits, ref(input_ids=ids, pixel_values=pv).logits, atol=1e-4, rtol=0)
