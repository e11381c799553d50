"""FastV-style pruning and keep schedules inside the decoder (model/prune.py): nothing cut is the plain model, and
a pruned KV cache decodes the tokens that recomputing the pruned prompt from scratch gives. The reference is the
plain decoder layers with masks (FastV's released implementation masks the dropped tokens' keys)."""

from __future__ import annotations

import pytest
import torch

from internvl.config import LLMConfig
from internvl.efficiency import EfficiencyConfig
from internvl.errors import ConfigError
from internvl.model.llm import CausalLM
from internvl.model.prune import DecoderEfficiency, install, keep_ratios, save_schedule
from internvl.model.visual_cache import LayeredCache

TILE = 16  # a 4x4 token grid per tile


def tiny_lm(layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> CausalLM:
    cfg = LLMConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=10000.0,
                    max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(seed)
    lm = CausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
    return lm


def prompt(lm: CausalLM, tiles: list[int], seed: int = 0, text: int = 5):
    """Embeddings [1, T, H] of text, then per image `tiles` x TILE visual vectors, then text; the visual mask."""
    g = torch.Generator().manual_seed(seed)
    ids, vis = [], []
    for n in [*tiles, None]:
        ids += torch.randint(0, 128, (text,), generator=g).tolist()
        vis += [False] * text
        if n is not None:
            ids += [0] * (n * TILE)
            vis += [True] * (n * TILE)
    vis = torch.tensor(vis)
    with torch.no_grad():
        emb = lm.embed(torch.tensor([ids]))
        emb[0, vis] = torch.randn(int(vis.sum()), emb.shape[-1], generator=g)
    return emb, vis


def switch(lm: CausalLM, force: bool = False, **fields) -> DecoderEfficiency:
    c = lm.config
    eff = DecoderEfficiency(EfficiencyConfig(**fields), c.num_hidden_layers, c.num_attention_heads, TILE)
    eff.force = force
    lm.efficiency = eff
    return eff


def masked_logits(lm: CausalLM, emb: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """The plain decoder layers, layer i under the boolean mask masks[i] [T, T]."""
    t = emb.shape[1]
    cos, sin = lm.rotary(torch.arange(t)[None], emb.dtype)
    x = emb
    for i, layer in enumerate(lm.model.layers):
        x = layer(x, cos[:, None], sin[:, None], masks[i][None, None], False, None, i, t)
    return lm.lm_head(lm.model.norm(x))


def fastv_reference_kept(lm: CausalLM, emb: torch.Tensor, vis: torch.Tensor, layer: int, keep: float) -> torch.Tensor:
    """Visual positions kept by FastV: layer `layer`-1's attention from the last token, mean over heads, top-k."""
    t = emb.shape[1]
    cos, sin = lm.rotary(torch.arange(t)[None], emb.dtype)
    cos, sin = cos[:, None], sin[:, None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = emb
    for i in range(layer - 1):
        x = lm.model.layers[i](x, cos, sin, causal[None, None], False, None, i, t)
    attn = lm.model.layers[layer - 1].self_attn
    q, k, _ = attn._qkv(lm.model.layers[layer - 1].input_layernorm(x), cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = torch.softmax(torch.einsum("hd,htd->ht", q[0, :, -1], k[0]) / q.shape[-1] ** 0.5, -1).mean(0)
    pos = vis.nonzero().flatten()
    return pos[probs[pos].topk(round(keep * pos.numel())).indices]


def pruned_masks(t: int, vis: torch.Tensor, kept: torch.Tensor, layer: int, layers: int) -> list[torch.Tensor]:
    """Causal masks; from `layer` on the dropped visual keys are hidden (a dropped row sees itself only)."""
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    ok = ~torch.cat([vis, torch.zeros(t - vis.numel(), dtype=torch.bool)])
    ok[kept] = True
    late = (causal & ok[None, :]) | torch.eye(t, dtype=torch.bool)
    return [causal if i < layer else late for i in range(layers)]


def greedy(lm: CausalLM, emb: torch.Tensor, vis: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens through the model's cache (prefill, then decode); also the prefill's logits."""
    cache = lm.new_cache(1, capacity=64)
    logits = lm(emb, cache=cache, visual_mask=vis[None])
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(n - 1):
        tokens.append(int(lm.decode(torch.tensor(tokens[-1:]), cache)[0].argmax()))
    return tokens, logits


@torch.no_grad()
def test_keep_one_is_the_plain_model():
    lm = tiny_lm()
    emb, vis = prompt(lm, [2])
    plain_tokens, plain = greedy(lm, emb, vis, 6)
    install(_vlm(lm), EfficiencyConfig(fastv_layer=2, fastv_keep=1.0))
    assert lm.efficiency is None  # nothing to cut: the plain path, untouched
    switch(lm, force=True, fastv_layer=2, fastv_keep=1.0)  # this path run anyway, nothing cut
    tokens, logits = greedy(lm, emb, vis, 6)
    assert isinstance(lm.new_cache(1), LayeredCache)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert tokens == plain_tokens


@torch.no_grad()
def test_no_layer_dropped_is_the_plain_model():
    """YOPO's layer dropping after the last layer drops nothing: the pruning path, run anyway, is the plain model."""
    lm = tiny_lm()
    emb, vis = prompt(lm, [2])
    plain_tokens, plain = greedy(lm, emb, vis, 6)
    switch(lm, force=True, yopo_drop_after=lm.config.num_hidden_layers)
    tokens, logits = greedy(lm, emb, vis, 6)
    assert isinstance(lm.new_cache(1), LayeredCache)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert tokens == plain_tokens
    switch(lm, force=True, yopo_drop_after=lm.config.num_hidden_layers - 1)  # the last layer dropped: it differs
    assert (greedy(lm, emb, vis, 1)[1] - plain).abs().max() > 1e-4


@pytest.mark.parametrize("layer,keep", [(2, 0.5), (1, 0.25), (3, 0.0)])
@torch.no_grad()
def test_pruned_cache_decodes_as_the_pruned_prompt_recomputed(layer, keep):
    lm = tiny_lm()
    emb, vis = prompt(lm, [2, 1])
    plain = lm(emb)[0, -1]
    kept = fastv_reference_kept(lm, emb, vis, layer, keep) if keep else torch.zeros(0, dtype=torch.long)
    switch(lm, fastv_layer=layer, fastv_keep=keep) if keep else switch(lm, yopo_drop_after=layer)
    tokens, logits = greedy(lm, emb, vis, 8)
    t0 = emb.shape[1]
    ref = masked_logits(lm, emb, pruned_masks(t0, vis, kept, layer, 4))
    torch.testing.assert_close(logits[0, -1], ref[0, -1], atol=1e-5, rtol=0)
    assert (logits[0, -1] - plain).abs().max() > 1e-3  # the cut changed the answer's distribution
    seq, expected = emb, []
    for _ in range(8):  # from scratch each step: the prompt's kept set, the generated tokens appended
        ref = masked_logits(lm, seq, pruned_masks(seq.shape[1], vis, kept, layer, 4))
        expected.append(int(ref[0, -1].argmax()))
        seq = torch.cat([seq, lm.embed(torch.tensor([expected[-1:]]))], dim=1)
    assert tokens == expected
    cache = lm.new_cache(1, capacity=64)
    lm(emb, cache=cache, visual_mask=vis[None])
    n_vis = int(vis.sum())
    assert cache.held(0).item() == t0 and cache.held(3).item() == t0 - n_vis + round(keep * n_vis)


@torch.no_grad()
def test_rows_of_one_batch_decode_as_each_alone():
    """Two prompts with different image counts prefill together (each row keeps its own count per layer), join
    and leave the batch (keep/concat); each decodes the tokens it decodes alone."""
    lm = tiny_lm()
    switch(lm, fastv_layer=2, fastv_keep=0.5)
    a, va = prompt(lm, [1], seed=1)
    b, vb = prompt(lm, [2], seed=2)
    alone = [greedy(lm, e, v, 5)[0] for e, v in ((a, va), (b, vb))]
    t = b.shape[1]
    emb = torch.cat([torch.nn.functional.pad(a, (0, 0, 0, t - a.shape[1])), b])
    vis = torch.stack([torch.nn.functional.pad(va, (0, t - va.numel())), vb])
    cache = lm.new_cache(2, capacity=96)
    valid = torch.tensor([a.shape[1], t])
    logits = lm(emb, cache=cache, valid_lengths=valid, visual_mask=vis)
    last = [int(logits[0, a.shape[1] - 1].argmax()), int(logits[1, -1].argmax())]
    got = [[last[0]], [last[1]]]
    other = lm.new_cache(1, capacity=96)  # a third row joins, then leaves
    lm(a, cache=other, visual_mask=va[None])
    cache.concat(other)
    cache.keep([0, 1])
    for _ in range(4):
        step = lm.decode(torch.tensor(last), cache)
        last = step.argmax(-1).tolist()
        got[0].append(last[0])
        got[1].append(last[1])
    assert got == alone


def test_keep_ratios_refuse_a_schedule_that_grows(tmp_path):
    path = save_schedule(tmp_path / "s.json", [1.0, 0.5, 0.75, 0.25])
    with pytest.raises(ConfigError, match="never increase with depth"):
        keep_ratios(EfficiencyConfig(schedule=str(path)), 4)
    with pytest.raises(ConfigError, match="has 4 keep ratios but the model has 3 layers"):
        keep_ratios(EfficiencyConfig(schedule=str(path)), 3)
    path = save_schedule(tmp_path / "t.json", [1.0, 0.6, 0.6, 0.3])
    cfg = EfficiencyConfig(schedule=str(path), fastv_layer=2, fastv_keep=0.5, yopo_drop_after=3)
    assert keep_ratios(cfg, 4) == [1.0, 0.6, 0.5, 0.0]


class _vlm:  # install() reads the language model and the tile size
    def __init__(self, lm):
        self.language_model, self.num_image_token = lm, TILE

        class C:
            flash_mode = False

        self.config = C()


@torch.no_grad()
def test_scale_compression_runs_the_shortened_sequence():
    """Mini-Monkey's SCM: layer 2's attention from every token after the span (the first image's tiles but its
    last) to the span, mean over those rows and heads; the top half of the span kept in order; then the model
    runs the shortened sequence from scratch (fresh positions), as the plain model would."""
    lm = tiny_lm()
    emb, vis = prompt(lm, [3])
    t = emb.shape[1]
    cos, sin = lm.rotary(torch.arange(t)[None], emb.dtype)
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    x = lm.model.layers[0](emb, cos[:, None], sin[:, None], causal, False, None, 0, t)
    attn = lm.model.layers[1].self_attn
    q, k, _ = attn._qkv(lm.model.layers[1].input_layernorm(x), cos[:, None], sin[:, None])
    k = k.repeat_interleave(2, dim=1)
    probs = torch.softmax((q @ k.transpose(-1, -2) / 16**0.5).masked_fill(~causal, float("-inf")), -1)[0]
    first = int(vis.nonzero()[0])
    span = torch.arange(first, first + 2 * TILE)
    score = probs[:, span[-1] + 1 :, span].mean(dim=(0, 1))
    rows = torch.cat([torch.arange(first), span[score.topk(TILE).indices.sort().values], torch.arange(first + 2 * TILE, t)])
    short = emb[:, rows]
    expected, plain = greedy(lm, short, vis[rows], 6)
    switch(lm, scale_compress=0.5)
    tokens, logits = greedy(lm, emb, vis, 6)
    torch.testing.assert_close(logits[0, -1], plain[0, -1], atol=1e-5, rtol=0)
    assert tokens == expected
