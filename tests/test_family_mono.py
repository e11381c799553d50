"""Mono-InternVL: patch-embedding vision side, InternLM2 with visual-expert FFNs routed by token modality, and its
original layout (config fields, key names). transformers has no such model: the defining properties are tested."""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F

from internvl.checkpoint.io import build_model, load_model, save_model
from internvl.checkpoint.original import from_original_dict, to_original_dict
from internvl.model.mono import MonoInternVLChatModel
from internvl.model.projector import pixel_shuffle
from internvl.model.vlm import InternVLChatModel

IMG = 90  # <IMG_CONTEXT> in the tiny vocabulary

# the shape of OpenGVLab/Mono-InternVL-2B's config.json, shrunk
MONO_CONFIG = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
    "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 56, "select_layer": -1,
    "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12,
    "vision_config": {"architectures": ["InternVisionPatchModel"], "model_type": "intern_vit_patch",
                      "hidden_size": 32, "patch_size": 14, "image_size": 56, "num_channels": 3},
    "llm_config": {"architectures": ["InternLM2VEForCausalLM"], "model_type": "internlm2", "vocab_size": 128,
                   "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "rope_theta": 10000.0, "max_position_embeddings": 512, "bias": False,
                   "rms_norm_eps": 1e-5},
}  # fmt: skip


def mono_model(seed: int = 0) -> MonoInternVLChatModel:
    cfg = from_original_dict(copy.deepcopy(MONO_CONFIG), "test")
    torch.manual_seed(seed)
    model = build_model(cfg, IMG, meta=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("mlp1.0"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model


def plain_twin(mono: MonoInternVLChatModel) -> InternVLChatModel:
    """Our plain InternLM2 model with the mono model's language-model weights (vision side unused)."""
    cfg = copy.deepcopy(mono.config)
    cfg.llm.visual_experts = False
    cfg.vision.num_hidden_layers = 1
    plain = build_model(cfg, IMG, meta=False).eval()
    state = {k: v for k, v in mono.language_model.state_dict().items() if ".mlp_ve." not in k}
    plain.language_model.load_state_dict(state)
    return plain


def prompt(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 80, (1, 20), generator=g)
    ids[0, 5:9] = IMG  # one tile (4 tokens)
    ids[0, 12:20] = torch.randint(0, 80, (8,), generator=g)
    ids[0, 11:12] = 91
    pixel_values = torch.randn(1, 3, 56, 56, generator=g)
    return ids, pixel_values


def test_config_and_layout(tmp_path):
    model = mono_model()
    assert isinstance(model, MonoInternVLChatModel) and model.config.processor.template == "internlm2-chat"
    out = to_original_dict(model.config)
    assert out["vision_config"]["model_type"] == "intern_vit_patch"
    assert out["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    from safetensors import safe_open

    keys = set()
    for f in (tmp_path / "m").glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            keys |= set(h.keys())
    vision = {k for k in keys if k.startswith("vision_model.")}
    assert vision == {
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding",
    }
    for n in (1, 2, 3):
        assert f"language_model.model.layers.1.feed_forward_ve.w{n}.weight" in keys
    assert "language_model.model.layers.0.attention.wqkv.weight" in keys
    assert not any("mlp_ve" in k for k in keys)
    loaded, _ = load_model(tmp_path / "m", image_token_id=IMG)
    ids, pv = prompt()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids, pv).logits, model(ids, pv).logits, rtol=0, atol=0)


def test_patch_vision_side_is_embedding_shuffle_mlp1():
    model = mono_model()
    _, pv = prompt()
    e = model.vision_model.embeddings
    x = F.conv2d(pv, e.patch_embedding.weight, e.patch_embedding.bias, stride=14).flatten(2).transpose(1, 2)
    x = x + e.position_embedding[:, 1:]  # the CLS token (with its position) is dropped
    x = pixel_shuffle(x.reshape(1, 4, 4, -1), 0.5, "v2").reshape(1, 4, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.extract_feature(pv), model.mlp1(x))


def test_equal_experts_make_plain_internlm2():
    mono = mono_model()
    with torch.no_grad():
        for layer in mono.language_model.model.layers:
            layer.mlp_ve.load_state_dict(layer.mlp.state_dict())
    plain = plain_twin(mono)
    ids, pv = prompt()
    with torch.no_grad():
        feats = mono.extract_feature(pv)
        torch.testing.assert_close(mono(ids, image_embeds=feats).logits, plain(ids, image_embeds=feats).logits,
                                   rtol=0, atol=0)  # fmt: skip


def test_image_tokens_route_to_visual_experts():
    mono = mono_model()
    plain = plain_twin(mono)
    ids, pv = prompt()
    with torch.no_grad():
        feats = mono.extract_feature(pv)
        a, b = mono(ids, image_embeds=feats).logits, plain(ids, image_embeds=feats).logits
        # tokens before the image are text only: the same; from the first image token on they differ
        torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
        assert (a[:, 5:] - b[:, 5:]).abs().amax(-1).min() > 1e-4
        # the visual expert is what image tokens take: swapping it into the text FFN of the twin at those
        # tokens only is what the mono model computes (checked through the language model directly)
        mask = ids == IMG
        lm = mono.language_model
        emb = mono.embed(ids, image_embeds=feats)
        torch.testing.assert_close(lm(emb, visual_mask=mask), a)
        text_only = torch.randint(0, 80, (1, 12))
        torch.testing.assert_close(mono(text_only).logits, plain(text_only).logits, rtol=0, atol=0)


def test_cached_decode_uses_text_ffn_and_matches_forward():
    mono = mono_model()
    ids, pv = prompt()
    with torch.no_grad():
        cache = mono.new_cache(1)
        logits = mono.prefill(ids, pv, cache)
        torch.testing.assert_close(logits, mono(ids, pv).logits, atol=1e-5, rtol=1e-5)
        seq = ids
        for _ in range(4):
            nxt = logits[:, -1, :80].argmax(-1)  # a text token (never <IMG_CONTEXT>)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = mono.decode(nxt, cache)[:, None]
            full = mono(seq, pv).logits[:, -1]
            torch.testing.assert_close(logits[:, -1], full, atol=1e-5, rtol=1e-5)


def test_no_hf_layout():
    import pytest

    from internvl.checkpoint.hf import to_hf_dict
    from internvl.errors import ConfigError

    with pytest.raises(ConfigError, match="Mono-InternVL"):
        to_hf_dict(mono_model().config, IMG)


def test_trains_with_gradient_checkpointing():
    """Image tokens' loss reaches the visual experts and the patch embedding; the trainer's freezing works
    on a vision side without encoder layers."""
    from internvl.train.freeze import TuneSpec, configure_trainable

    ids, pv = prompt()
    grads = []
    for ckpt in (False, True):
        model = mono_model().train()
        configure_trainable(model, TuneSpec())
        model.set_gradient_checkpointing(ckpt)
        model(ids, pv, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():  # the recomputed layers route as the first pass did
        torch.testing.assert_close(grads[1][name], g, msg=name)
    layer = model.language_model.model.layers[0]
    assert (
        layer.mlp_ve.down_proj.weight.grad.abs().sum() > 0 and layer.mlp.down_proj.weight.grad.abs().sum() > 0
    )
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_generates_through_the_engine(tmp_path):
    """load() of a saved Mono-InternVL (fused projections, visual experts included) generates the tokens of a
    greedy loop over uncached forwards, in which generated tokens are text."""
    from dataclasses import replace

    from PIL import Image
    from refmodels import CORPUS

    from internvl import load
    from internvl.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, tmp_path, vocab_size=320)
    cfg = from_original_dict(copy.deepcopy(MONO_CONFIG), "test")
    cfg.llm = replace(cfg.llm, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, tok.image_context_id, meta=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3 if "language_model" in name else 0.1)
    save_model(model, tmp_path, tokenizer_dir=tmp_path)
    Image.new("RGB", (120, 60), (220, 30, 30)).save(tmp_path / "wide.png")
    fused, ref = load(tmp_path), load(tmp_path, optimize=False)
    assert fused.model.language_model.model.layers[0].mlp_ve.gate_up_proj is not None
    ids, pv, _ = ref.prepare("What color?", tmp_path / "wide.png")
    params = ref.sampling(max_new_tokens=6, temperature=0.0)
    out = fused.generate_ids(ids, pv, params)
    assert out and out == ref.generate_ids(ids, pv, params)
    seq = list(ids)
    with torch.no_grad():
        for t in out:
            assert int(ref.model(torch.tensor([seq]), pv).logits[0, -1].argmax()) == t
            seq.append(t)
