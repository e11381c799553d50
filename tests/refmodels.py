"""Tiny random transformers InternVL models (the parity reference) saved in the -hf layout."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN_ID = 500
TOKENS_PER_TILE = 4  # 56-px tiles, patch 14 -> 4x4 patches -> 2x2 after pixel shuffle


def hf_reference(text: str = "qwen2", vision: str = "300m", heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A transformers `InternVLForConditionalGeneration` with random weights (norm weights around 1)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision_cfg = dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=[56, 56],
        patch_size=[14, 14], attention_bias=vision == "300m", use_qk_norm=vision == "6b",
        norm_type="layer_norm" if vision == "300m" else "rms_norm", layer_scale_init_value=0.1,
    )  # fmt: skip
    text_cfg = dict(
        model_type=text, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=10000.0, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip
    if text == "llama":
        text_cfg["attention_bias"] = False
    if text in ("qwen3", "qwen3_moe"):  # a head_dim that is not hidden / heads, RoPE base from rope_parameters
        text_cfg.update(head_dim=24, attention_bias=False, rope_theta=1e6)
    if text == "qwen3_moe":  # layer 0 sparse (8 experts, top 2), layer 1 dense
        text_cfg.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                        mlp_only_layers=[1], decoder_sparse_step=1)  # fmt: skip
    if text == "gpt_oss":  # sliding (window 4) / full / sliding layers, 4 experts top 2, YaRN, sinks, biases
        text_cfg.update(num_hidden_layers=3, head_dim=16, intermediate_size=32, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=4, attention_bias=True,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 1024})
        del text_cfg["rope_theta"]  # fmt: skip
    cfg = InternVLConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False)  # fmt: skip
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model


def save_reference(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def prompt_with_images(tiles_per_image: list[int], seed: int = 0, text_len: int = 6):
    """input_ids with <img> <IMG_CONTEXT>*4n </img> blocks between random text, and matching pixel_values."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for n in tiles_per_image:
        ids += torch.randint(0, 400, (text_len,), generator=g).tolist()
        ids += [501] + [IMAGE_TOKEN_ID] * (TOKENS_PER_TILE * n) + [502]
    ids += torch.randint(0, 400, (text_len,), generator=g).tolist()
    pixel_values = torch.randn(sum(tiles_per_image), 3, 56, 56, generator=g)
    return torch.tensor([ids]), pixel_values


def assert_logits_match(ref, ours, ids: torch.Tensor, pixel_values: torch.Tensor, atol: float = 1e-4) -> None:
    """Our logits equal transformers' on the same prompt and tiles (fp32 parity)."""
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixel_values).logits
        got = ours(ids, pixel_values).logits
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def greedy_tokens(ref, ours, ids: torch.Tensor, pixel_values: torch.Tensor, n: int = 32) -> tuple[list, list]:
    """n greedy tokens from transformers' generate() and from our engine (prefill, then cached decode)."""
    from internvl.engine.engine import Engine
    from internvl.engine.sampling import SamplingParams

    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)  # fmt: skip
    got = Engine(ours).generate([(ids[0].tolist(), SamplingParams(max_new_tokens=n), pixel_values)])[0]
    return out[0, ids.shape[1] :].tolist(), got.output_ids


CORPUS = [
    "What color is the circle? red. How many squares are there? 3. Describe the image.",
    "There are 2 blue stars and 1 green triangle. Where is the red circle? top left.",
    "Image-1: Image-2: Frame1: Frame2: Which image has the most circles? Image-2",
    "The quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 yes no left right",
] * 30


def tiny_checkpoint(folder: Path, counting: bool = False, layout: str = "original", seed: int = 0) -> Path:
    """A tiny model folder with a trained BPE tokenizer (vocabulary ~300), loadable by `internvl.load`.

    `counting=True` makes a deterministic model: every layer adds nothing (o_proj and down_proj are zero)
    and lm_head maps the embedding of token t to token t + 1, so greedy decoding counts upwards.
    """
    from dataclasses import replace

    from internvl.checkpoint.io import build_model, save_model
    from internvl.presets import preset
    from internvl.tokenizer import train_bpe_tokenizer

    folder = Path(folder)
    tok = train_bpe_tokenizer(CORPUS, folder, vocab_size=320)
    cfg = preset("tiny")
    cfg.llm = replace(cfg.llm, vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    model = build_model(cfg, tok.image_context_id, meta=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".ls1", ".ls2")):
                continue
            p.normal_(0, 0.1 if "vision_model" in name else 0.3)
        if counting:
            lm = model.language_model
            emb = lm.model.embed_tokens.weight
            emb.normal_()
            for layer in lm.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            unit = emb / emb.norm(dim=-1, keepdim=True)
            lm.lm_head.weight.copy_(unit.roll(1, dims=0))
    save_model(model, folder, layout=layout, tokenizer_dir=folder)
    return folder


def write_clip(path: Path, frames: int = 16, fps: int = 8) -> Path:
    """A small mpeg4 clip (64x48) whose frame i is the flat grey i * 15."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = np.full((48, 64, 3), i * 15, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)
