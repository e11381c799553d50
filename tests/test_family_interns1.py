"""Intern-S1-mini (`model_type: interns1`): the transformers InternVL (-hf) layout with a Qwen3 decoder under
another name. A transformers InternVL-Qwen3 saved, then relabelled as Intern-S1 writes its config, loads as
the -hf layout with its preprocessor config and matches the transformers model (logits, 32 greedy tokens)."""

from __future__ import annotations

import json

import torch
from refmodels import IMAGE_TOKEN_ID, assert_logits_match, greedy_tokens, hf_reference, prompt_with_images

from internvl.checkpoint.io import load_model
from internvl.cli.main import main as cli


def _as_interns1(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="interns1", architectures=["InternS1ForConditionalGeneration"])
    cfg["vision_config"]["model_type"] = "interns1_vision"
    cfg["text_config"]["architectures"] = ["Qwen3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    pre = {"image_processor_type": "GotOcr2ImageProcessorFast", "crop_to_patches": True, "min_patches": 1,
           "max_patches": 4, "size": {"height": 56, "width": 56}}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def test_interns1_mini_layout_matches_transformers(tmp_path):
    ref = hf_reference("qwen3", "300m", seed=8)
    ref.save_pretrained(tmp_path / "s1")
    folder = _as_interns1(tmp_path / "s1")
    ours, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == "hf" and not report.missing and not report.unexpected
    assert ours.config.llm.family == "qwen3" and ours.config.processor.max_dynamic_patch == 4
    assert ours.config.processor.template == "internvl2_5"
    ids, pv = prompt_with_images([1, 3], seed=4)
    assert_logits_match(ref, ours, ids, pv)
    expected, got = greedy_tokens(ref, ours, ids, pv)
    assert got == expected

    # to the original layout and back: an InternVL (internvl_chat) with the Qwen3 decoder
    assert cli(["convert", str(folder), str(tmp_path / "orig"), "--to", "original"]) == 0
    orig, report = load_model(tmp_path / "orig", image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == "original"
    with torch.no_grad():
        torch.testing.assert_close(orig(ids, pv).logits, ref(input_ids=ids, pixel_values=pv).logits, atol=1e-4, rtol=0)
