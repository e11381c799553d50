"""V2PE: fractional RoPE positions for image tokens (the official get_rope_pos_id rule), RoPE from float positions,
decoding after the last prompt position. transformers has no V2PE: the defining properties are tested."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from refmodels import IMAGE_TOKEN_ID, TOKENS_PER_TILE, prompt_with_images

from internvl.checkpoint.io import build_model
from internvl.checkpoint.original import from_original_dict, to_original_dict
from internvl.errors import ConfigError
from internvl.model.rope import Rotary
from internvl.model.v2pe import v2pe_positions
from internvl.presets import preset

IMG, START, END = IMAGE_TOKEN_ID, 501, 502  # <IMG_CONTEXT>, <img>, </img> in refmodels' prompts


def official_rule(ids: list[int], stride: int, per_tile: int) -> list[float]:
    """The official get_rope_pos_id (v2pe_fix) restated over <img>/</img> pairs: text cumulates by 1, the
    n_tile * per_tile image tokens after an <img> at p are linspace(p, p + step * N, N + 1)[1:] (float32)."""
    out: list[float] = []
    last, i = -1, 0
    while i < len(ids):
        if ids[i] != START:
            last += 1
            out.append(float(last))
            i += 1
            continue
        last += 1
        out.append(float(last))  # <img>
        end = ids.index(END, i)
        n = ((end - i) // per_tile) * per_tile
        step = stride / per_tile
        out += torch.linspace(last, last + step * n, n + 1, dtype=torch.float32)[1:].tolist()
        last = int(torch.ceil(torch.tensor(out[-1])))
        i = end
    return out


def two_image_ids() -> torch.Tensor:
    # t t <img> I*4 </img> t <img> I*8 </img> t t   (tiles: 1, then 2; 4 tokens per tile)
    return torch.tensor([[7, 8, START, *[IMG] * 4, END, 9, START, *[IMG] * 8, END, 10, 11]])


def test_golden_tables_two_images():
    ids = two_image_ids()
    # stride 2 per tile of 4 tokens: each image token advances 0.5
    assert v2pe_positions(ids, IMG, 2 / 4)[0].tolist() == [
        0, 1, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 7.5, 8, 8.5, 9, 9.5, 10, 10.5, 11, 12, 13, 14]  # fmt: skip
    # stride 1: 0.25 each; an image of n tiles spans n positions
    assert v2pe_positions(ids, IMG, 1 / 4)[0].tolist() == [
        0, 1, 2, 2.25, 2.5, 2.75, 3, 4, 5, 6, 6.25, 6.5, 6.75, 7, 7.25, 7.5, 7.75, 8, 9, 10, 11]  # fmt: skip
    # a start offset (tokens already in the cache) shifts everything
    assert v2pe_positions(ids, IMG, 2 / 4, torch.tensor([5]))[0, :4].tolist() == [5, 6, 7, 7.5]


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 64])
def test_matches_the_official_rule(stride):
    ids, _ = prompt_with_images([1, 3, 2], seed=stride)
    ours = v2pe_positions(ids, IMG, stride / TOKENS_PER_TILE)[0]
    torch.testing.assert_close(ours, torch.tensor(official_rule(ids[0].tolist(), stride, TOKENS_PER_TILE)))


def test_stride_equal_to_tokens_per_tile_is_integer_positions():
    ids, pv = prompt_with_images([1, 2])
    assert torch.equal(v2pe_positions(ids, IMG, 1.0)[0], torch.arange(ids.shape[1], dtype=torch.float32))
    plain, v2pe = tiny(None), tiny(TOKENS_PER_TILE)
    with torch.no_grad():
        torch.testing.assert_close(v2pe(ids, pv).logits, plain(ids, pv).logits, rtol=0, atol=0)
        assert not torch.allclose(tiny(1)(ids, pv).logits, plain(ids, pv).logits)  # V2PE does change them


def test_fractional_rope_is_the_closed_form():
    cfg = preset("tiny").llm
    pos = torch.tensor([[0.0, 0.25, 1.5, 2.75, 7.125, 40.5]])
    cos, sin = Rotary(cfg)(pos, torch.float32)
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.double()[..., None] * inv
    ang = torch.cat([ang, ang], -1)
    torch.testing.assert_close(cos.double(), ang.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=1e-5, rtol=0)


def tiny(stride: int | None, seed: int = 0):
    cfg = preset("tiny")
    if stride is not None:
        cfg = cfg.replace(rope_pos_id_version="v2pe_fix", rope_pos_id_stride=stride)
    torch.manual_seed(seed)
    model = build_model(cfg, IMG, meta=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and not name.endswith((".ls1", ".ls2")):
                p.normal_(0, 0.2)
    return model


def test_cached_decode_equals_uncached_forward():
    model = tiny(2)
    prompts = [prompt_with_images([1, 2], seed=1), prompt_with_images([2], seed=2, text_len=9)]
    caches, seqs, logits = [], [], []
    with torch.no_grad():
        for ids, pv in prompts:
            cache = model.new_cache(1)
            out = model.prefill(ids, pv, cache)
            torch.testing.assert_close(out, model(ids, pv).logits, atol=1e-5, rtol=1e-5)
            last = v2pe_positions(ids, IMG, 0.5)[0, -1]
            assert int(cache.offsets[0]) == int(last) + 1 - ids.shape[1]  # decoding goes on after `last`
            caches.append(cache)
            seqs.append(ids)
            logits.append(out[:, -1])
        cache = caches[0]
        cache.concat(caches[1])  # rows with different offsets, decoded together
        logits = torch.cat(logits)
        for _ in range(4):
            nxt = logits[:, :400].argmax(-1)  # text tokens
            seqs = [torch.cat([s, t.view(1, 1)], 1) for s, t in zip(seqs, nxt)]
            logits = model.decode(nxt, cache)
            for row, (s, (_, pv)) in enumerate(zip(seqs, prompts)):
                full = model(s, pv).logits[0, -1]
                torch.testing.assert_close(logits[row], full, atol=1e-5, rtol=1e-5)
        cache.keep([1])
        assert cache.offsets.tolist() == [
            int(v2pe_positions(seqs[1], IMG, 0.5)[0, -1]) + 1 - seqs[1].shape[1]
        ]


def test_config_fields():
    cfg = preset("tiny", rope_pos_id_version="v2pe_fix", rope_pos_id_stride=64)
    d = to_original_dict(cfg)
    assert (d["rope_pos_id_version"], d["rope_pos_id_stride"]) == ("v2pe_fix", 64)
    back = from_original_dict(copy.deepcopy(d), "test")
    assert (back.rope_pos_id_version, back.rope_pos_id_stride) == ("v2pe_fix", 64)
    assert "rope_pos_id_version" not in to_original_dict(preset("tiny"))
    with pytest.raises(ConfigError, match="rope_pos_id_version"):
        preset("tiny", rope_pos_id_version="v3")
    with pytest.raises(ConfigError, match="rope_pos_id_stride"):
        preset("tiny", rope_pos_id_version="v2pe_fix")


def test_load_switch_through_the_engine(tmp_path):
    """`load(..., v2pe=stride)`: batched prefill (right padding), continuous batching and decode give the
    tokens of a greedy loop over uncached forwards; stride = tokens per tile changes nothing."""
    from PIL import Image
    from refmodels import tiny_checkpoint

    from internvl import load

    folder = tiny_checkpoint(tmp_path / "m")
    Image.new("RGB", (300, 120), (220, 30, 30)).save(tmp_path / "wide.png")
    plain, same, v2pe = load(folder), load(folder, v2pe=TOKENS_PER_TILE), load(folder, v2pe=1, optimize=False)
    assert v2pe.model.config.rope_pos_id_stride == 1
    requests = [v2pe.prepare("What color?", tmp_path / "wide.png"), v2pe.prepare("Describe it.", tmp_path / "wide.png",
                                                                               max_num=1)]  # fmt: skip
    params = v2pe.sampling(max_new_tokens=5, temperature=0.0)
    outs = [d.seq.output_ids for d in v2pe.detok.generate([(ids, params, pv) for ids, pv, _ in requests])]
    assert all(outs)
    for (ids, pv, _), out in zip(requests, outs):
        seq = list(ids)
        with torch.no_grad():
            for tok in out:
                logits = v2pe.model(torch.tensor([seq]), pv).logits[0, -1]
                assert int(logits.argmax()) == tok
                seq.append(tok)
        assert plain.generate_ids(ids, pv, params) == same.generate_ids(ids, pv, params)


def test_cli_flag():
    import argparse

    from internvl.cli.options import ModelOptions
    from internvl.options import add_options

    parser = argparse.ArgumentParser()
    add_options(parser, ModelOptions)
    assert parser.parse_args(["m", "--v2pe", "64"]).v2pe == 64
    assert parser.parse_args(["m"]).v2pe is None


def test_plain_rope_as_the_official_v2pe_rotary():
    """V2PE replaces the decoder's rope_scaling (InternLM2's dynamic NTK) by plain RoPE; a config.json that
    V2PE's training code wrote (rope_scaling type 'v2pe') reads as plain RoPE."""
    ids, pv = prompt_with_images([1, 2])
    dyn = {"type": "dynamic", "factor": 2.0}
    models = []
    for scaling, stride in ((dyn, TOKENS_PER_TILE), (None, None), (dyn, None)):
        cfg = preset("tiny")
        cfg.llm = dataclasses.replace(
            cfg.llm, rope_scaling=scaling, max_position_embeddings=8
        )  # prompt: 36 tokens
        if stride:
            cfg = cfg.replace(rope_pos_id_version="v2pe_fix", rope_pos_id_stride=stride)
        torch.manual_seed(0)
        models.append(build_model(cfg, IMG, meta=False).eval())
    with torch.no_grad():
        v2pe, plain, dynamic = (m(ids, pv).logits for m in models)
    torch.testing.assert_close(v2pe, plain, rtol=0, atol=0)
    assert not torch.allclose(v2pe, dynamic)
    d = to_original_dict(preset("tiny"))
    d["llm_config"]["rope_scaling"] = {"type": "v2pe", "factor": 1.0}
    assert from_original_dict(d, "test").llm.rope_scaling is None


def test_training_rows_are_renumbered_per_sample():
    """A packed row (positions restart at 0 per sample) gets each sample's V2PE positions: the packed forward
    equals the samples' own forwards; v2pe_rnd draws one stride per image in training."""
    from internvl.model.v2pe import RND_STRIDES, sample_positions

    model = tiny(2)
    (a, pa), (b, pb) = prompt_with_images([1], seed=3), prompt_with_images([2], seed=4)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    seq_ids = torch.cat([torch.zeros(a.shape[1]), torch.ones(b.shape[1])]).long()[None]
    with torch.no_grad():
        packed = model(ids, torch.cat([pa, pb]), positions=pos, seq_ids=seq_ids).logits
        torch.testing.assert_close(packed[:, : a.shape[1]], model(a, pa).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, a.shape[1] :], model(b, pb).logits, atol=1e-5, rtol=1e-5)
    cfg = preset("tiny", rope_pos_id_version="v2pe_rnd", rope_pos_id_stride=64)
    ids, _ = prompt_with_images([1, 2, 1, 3], seed=5)
    out = sample_positions(cfg, ids, IMG, torch.arange(ids.shape[1])[None], training=True)[0]
    img = ids[0] == IMG
    steps = (out[1:] - out[:-1])[img[1:]]  # the step into every image token
    allowed = {s / TOKENS_PER_TILE for s in RND_STRIDES}
    assert set(steps.tolist()) <= allowed
    fixed = sample_positions(cfg, ids, IMG, torch.arange(ids.shape[1])[None], training=False)[0]
    assert torch.equal(fixed, v2pe_positions(ids, IMG, 64 / TOKENS_PER_TILE)[0])
