"""InternVL3.5-Flash (ViR, model/vir.py): the original key names and config fields, the 256-token switch equal to
the plain model, the 64-token branch equal to mlp2 of the pooled 4x4 blocks, per-tile prompt expansion, the
router's thresholds and attn2 reuse, cached decoding, and the whole path through `internvl.load`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image
from refmodels import CORPUS, IMAGE_TOKEN_ID, prompt_with_images
from safetensors import safe_open

from internvl.checkpoint.hf import to_hf_dict
from internvl.checkpoint.io import build_model, load_model, save_model
from internvl.cli.main import main as cli
from internvl.errors import ConfigError, PromptError
from internvl.model.projector import merge_and_project
from internvl.model.vir import compress_decision
from internvl.presets import preset
from internvl.processing.prompt import expand_image_placeholders

VIR_KEYS = (
    {f"mlp2.{i}.{p}" for i in (0, 1, 4, 7) for p in ("weight", "bias")}
    | {"pooling_before_gating.query_token"}
    | {f"pooling_before_gating.attn{k}.{p}" for k in range(1, 5)
       for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    | {f"pooling_before_gating.norm{k}.{p}" for k in range(1, 5) for p in ("weight", "bias")}
    | {f"gating.block{k}.{i}.{p}" for k in range(1, 5) for i in (0, 3, 5) for p in ("weight", "bias")}
    | {f"gating.gate.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
)  # fmt: skip


def flash_config(vocab: int = 512):
    """The tiny preset on a Qwen3 decoder with ViR: 56-px tiles give 4 tokens (full) or 1 (compressed)."""
    cfg = preset("tiny")
    cfg.llm = replace(cfg.llm, family="qwen3", qkv_bias=False, head_dim=24, vocab_size=vocab)
    return cfg.replace(flash_mode=True, flash_relative_threshold=0.5, flash_absolute_threshold=0.0)


def random_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, IMAGE_TOKEN_ID, meta=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".ls1", ".ls2")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    model = random_model(flash_config())
    folder = tmp_path_factory.mktemp("flash")
    save_model(model, folder, layout="original")
    return model, folder


def test_original_keys_and_config(flash):
    model, folder = flash
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["flash_mode"] is True and cfg["flash_relative_threshold"] == 0.5
    assert cfg["flash_absolute_threshold"] == 0.0 and cfg["llm_config"]["architectures"] == ["Qwen3ForCausalLM"]
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            keys |= set(h.keys())
    assert VIR_KEYS <= keys and {k for k in keys if k.split(".")[0] in ("mlp2", "pooling_before_gating",
                                                                       "gating")} == VIR_KEYS  # fmt: skip
    assert keys >= {"mlp1.0.weight", "mlp1.3.bias"}
    loaded, report = load_model(folder, image_token_id=IMAGE_TOKEN_ID)
    assert not report.missing and not report.unexpected and loaded.config.flash_mode
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="Flash"):
        to_hf_dict(loaded.config, IMAGE_TOKEN_ID)
    plain = flash_config().replace(flash_mode=False)
    assert "mlp2" not in dict(build_model(plain).named_children())
    assert build_model(plain).tile_tokens(torch.zeros(3, 3, 56, 56)) == [4, 4, 4]
    with pytest.raises(ConfigError, match="quantile"):
        flash_config().replace(flash_relative_threshold=1.5)


def test_all_256_equals_the_plain_model(flash):
    model, _ = flash
    plain = build_model(model.config.replace(flash_mode=False), IMAGE_TOKEN_ID, meta=False).eval()
    state = {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in ("mlp2", "pooling_before_gating",
                                                                                      "gating")}  # fmt: skip
    plain.load_state_dict(state, strict=True)
    ids, pv = prompt_with_images([1, 3, 2], seed=2)
    model.vir = 256
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(ids, pv).logits, plain(ids, pv).logits, atol=1e-6, rtol=0)
            assert model.tile_tokens(pv) == [4] * 6
    finally:
        model.vir = None
    flags = torch.ones(6, dtype=torch.long)  # training (image flags): the plain path, as the original forward()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pv, image_flags=flags).logits, plain(ids, pv).logits, atol=1e-6,
                                   rtol=0)  # fmt: skip


def test_all_64_is_mlp2_of_the_pooled_blocks(flash):
    model, _ = flash
    _, pv = prompt_with_images([2, 1], seed=3)
    model.vir = 64
    try:
        with torch.no_grad():
            got = model.extract_feature(pv)
            vit = model.vision_model(pv)[:, 1:]  # [T, 16, C]: a 4x4 grid
            t, _, c = vit.shape
            # token (i, j) of the 64-token branch is the 4x4 block at (4i, 4j), row-major (here one block)
            blocks = vit.reshape(t, 1, 4, 1, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(t, 1, 16 * c)
            expected = model.mlp2(blocks)
            assert model.tile_tokens(pv) == [1, 1, 1]
    finally:
        model.vir = None
    assert got.shape == (1, 3, model.config.llm.hidden_size)
    torch.testing.assert_close(got[0], expected.reshape(3, -1), atol=1e-6, rtol=0)


def test_router_thresholds_and_the_attn2_reuse(flash):
    model, _ = flash
    _, pv = prompt_with_images([6], seed=5)
    with torch.no_grad():
        x = model.vision_model(pv)[:, 1:]
        pooled = model.pooling_before_gating(x)
        probs = model.gating(pooled)
        counts = model.tile_tokens(pv)
        p = probs[:, 0]
        expected = (p > torch.quantile(p, 0.5)) & (p >= 0.0)
        assert torch.equal(compress_decision(probs, 0.5, 0.0), expected)
        assert counts == [1 if c else 4 for c in expected.tolist()] and sorted(set(counts)) == [1, 4]
        assert not compress_decision(probs, 0.5, 1.01).any()  # the absolute threshold keeps every tile
        pool = model.pooling_before_gating
        saved = {k: v.clone() for k, v in pool.state_dict().items()}
        try:
            for name in ("attn3", "attn4", "norm3", "norm4"):  # loaded but unused, as in the original
                for prm in getattr(pool, name).parameters():
                    prm.add_(1.0)
            torch.testing.assert_close(pool(x), pooled, atol=0, rtol=0)
            pool.attn2.out_proj.bias.add_(1.0)
            assert not torch.allclose(pool(x), pooled)
        finally:
            pool.load_state_dict(saved)


def test_equals_the_original_token_deletion(flash):
    """The original builds 256 (here 4) context tokens a tile, then deletes tokens 64..255 (here 1..3) of each
    compressed tile's block and writes mlp2's tokens there: the same ids and embeddings as our routed prompt."""
    model, _ = flash
    ids, pv = prompt_with_images([3, 2], seed=9)
    with torch.no_grad():
        vit = model.vision_model(pv)
        p = model.gating(model.pooling_before_gating(vit[:, 1:]))[:, 0]
        compress = ((p > torch.quantile(p, 0.5)) & (p >= 0.0)).tolist()
        assert sorted(set(compress)) == [False, True]
        kept, tile, run = [], -1, 0
        for tok in ids[0].tolist():
            if tok == IMAGE_TOKEN_ID:
                tile, k, run = tile + (run % 4 == 0), run % 4, run + 1
                if compress[tile] and k >= 1:
                    continue
            else:
                run = 0
            kept.append(tok)
        t, _, c = vit[:, 1:].shape
        small = model.mlp2(vit[:, 1:].reshape(t, 1, 16 * c))  # one 4x4 block a tile
        full = merge_and_project(vit, model.mlp1, model.config.projector)
        embeds = torch.cat([small[i] if compress[i] else full[i] for i in range(t)])[None]
        assert kept.count(IMAGE_TOKEN_ID) == sum(model.tile_tokens(pv)) == embeds.shape[1]
        kept = torch.tensor([kept])
        torch.testing.assert_close(model(kept, pv).logits, model(kept, image_embeds=embeds).logits, atol=1e-5, rtol=0)


def test_prompt_with_per_tile_counts():
    text = expand_image_placeholders("<image>\nA <image> B", [2, 1], 256, img_context="C", tile_tokens=[256, 64, 64])
    assert text == "<img>" + "C" * 320 + "</img>\nA <img>" + "C" * 64 + "</img> B"
    plain = expand_image_placeholders("<image>", [2], 3, img_context="C")
    assert plain == "<img>CCCCCC</img>" == expand_image_placeholders("<image>", [2], 99, img_context="C",
                                                                      tile_tokens=[3, 3])  # fmt: skip
    with pytest.raises(PromptError, match="per-tile"):
        expand_image_placeholders("<image>", [2], 256, tile_tokens=[64])


def test_cached_decode_equals_uncached(flash):
    model, _ = flash
    _, pv = prompt_with_images([3, 2], seed=7)
    counts = model.tile_tokens(pv)
    assert sorted(set(counts)) == [1, 4]
    ids = [7, 8, 501] + [IMAGE_TOKEN_ID] * sum(counts[:3]) + [502, 9, 501] + [IMAGE_TOKEN_ID] * sum(counts[3:])
    ids = torch.tensor([ids + [502, 10, 11]])
    with torch.no_grad():
        cache = model.new_cache(1)
        logits = model.prefill(ids, pv, cache)[:, -1]
        seq = ids
        for _ in range(8):
            full = model(seq, pv).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)
            tok = full.argmax(-1)
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model.decode(tok, cache)
    # a prompt built for 4 tokens per tile does not fit the routed tiles
    with pytest.raises(PromptError):
        model(torch.tensor([[501] + [IMAGE_TOKEN_ID] * 20 + [502]]), pv)


def test_load_routes_the_prompt(tmp_path):
    import internvl
    from internvl.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, tmp_path, vocab_size=320)
    cfg = flash_config(vocab=tok.vocab_size).replace(max_dynamic_patch=4, dynamic_image_size=True, use_thumbnail=True)
    model = random_model(cfg, seed=1)
    model.image_token_id = tok.image_context_id
    save_model(model, tmp_path, layout="original", tokenizer_dir=tmp_path)
    image = Image.fromarray((torch.rand(56, 112, 3) * 255).byte().numpy())
    routed = internvl.load(tmp_path, optimize=False)
    ids, pv, _ = routed.prepare("What is it?", images=[image])
    counts = routed.model.tile_tokens(pv)
    assert ids.count(tok.image_context_id) == sum(counts) and len(counts) == pv.shape[0] == 3
    for vir, per_tile in ((256, 4), (64, 1)):
        forced = internvl.load(tmp_path, optimize=False, vir=vir)
        ids, pv, _ = forced.prepare("What is it?", images=[image])
        assert ids.count(tok.image_context_id) == per_tile * pv.shape[0]
        assert len(forced.generate_ids(ids, pv, max_new_tokens=3)) <= 3
    half = internvl.load(tmp_path, dtype="bf16")  # the router in bf16, the decision in float32
    ids, pv, _ = half.prepare("What is it?", images=[image])
    assert len(half.generate_ids(ids, pv, max_new_tokens=2)) <= 2
    with pytest.raises(internvl.errors.InternVLError, match="vir"):
        internvl.load(tmp_path, vir=128)
    image.save(tmp_path / "im.png")
    chat = ["chat", str(tmp_path), "-i", str(tmp_path / "im.png"), "-p", "Hi", "--max-new-tokens", "2", "--vir"]
    assert cli([*chat, "64"]) == 0
    with pytest.raises(SystemExit):
        cli([*chat, "128"])
