"""YOPO's cuts (model/yopo.py through model/prune.py): the neighbor window's mask against a hand-made one, the
gathered window attention against the plain layers under that mask, head pruning and the sparse visual FFN
against plain torch references that mask (as the released code does), and every switch at "nothing cut" equal to
the plain model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_prune import TILE, greedy, masked_logits, prompt, switch, tiny_lm

from internvl.efficiency import EfficiencyConfig
from internvl.errors import ConfigError
from internvl.model.prune import install
from internvl.model.yopo import load_head_mask, save_head_mask, tile_grid, window_mask


def test_window_mask_equals_a_hand_made_one_on_a_4x4_grid():
    vis = torch.tensor([False, False] + [True] * 16 + [False])
    got = window_mask(vis, 16, 3)
    expected = torch.zeros(19, 19, dtype=torch.bool)
    for i in range(19):
        for j in range(i + 1):  # causal
            if not (vis[i] and vis[j]):
                expected[i, j] = True  # text attends as usual; visual queries see every text key before them
            else:
                (ri, ci), (rj, cj) = divmod(i - 2, 4), divmod(j - 2, 4)
                expected[i, j] = abs(ri - rj) <= 1 and abs(ci - cj) <= 1
    assert torch.equal(got, expected)
    # the token at (1, 1) (position 2 + 5) sees the two text tokens and grid cells 0, 1, 2, 4 and itself
    assert got[7].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 6, 7]


def test_tiles_of_each_image_are_their_own_grids():
    vis = torch.tensor([False] + [True] * 8 + [False, False] + [True] * 4)
    tile, row, col = tile_grid(vis, 4)
    assert tile.tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, 2, 2, 2, 2]
    assert row[1:5].tolist() == [0, 0, 1, 1] and col[1:5].tolist() == [0, 1, 0, 1]
    with pytest.raises(ConfigError, match="not whole tiles of 4 tokens"):
        tile_grid(torch.tensor([False, True, True, True]), 4)
    mask = window_mask(vis, 4, 99)  # no window limit, but tiles never see each other's tokens
    assert not mask[5:9, 1:5].any() and mask[5:9, 0].all()


@torch.no_grad()
def test_window_attention_equals_the_plain_layers_under_the_window_mask():
    lm = tiny_lm()
    emb, vis = prompt(lm, [2, 1])
    switch(lm, yopo_window=3)
    _, logits = greedy(lm, emb, vis, 1)
    ref = masked_logits(lm, emb, [window_mask(vis, TILE, 3)] * 4)
    torch.testing.assert_close(logits, ref, atol=5e-5, rtol=1e-5)  # gathered vs dense: float rounding only
    assert (ref[0, -1] - lm(emb)[0, -1]).abs().max() > 1e-3  # the window changed the answer's distribution


@torch.no_grad()
def test_a_window_covering_the_grid_is_the_plain_model():
    lm = tiny_lm()
    emb, vis = prompt(lm, [1])
    plain_tokens, plain = greedy(lm, emb, vis, 5)
    switch(lm, yopo_window=7)  # 4x4 grid: |d| <= 3 covers it
    tokens, logits = greedy(lm, emb, vis, 5)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert tokens == plain_tokens


def head_reference(lm, emb: torch.Tensor, vis: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Plain torch: a pruned head's text queries see no visual key and its visual rows output zero."""
    t = emb.shape[1]
    vis = torch.cat([vis, torch.zeros(t - vis.numel(), dtype=torch.bool)])
    cos, sin = lm.rotary(torch.arange(t)[None], emb.dtype)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = emb
    for i, layer in enumerate(lm.model.layers):
        a = layer.self_attn
        q, k, v = a._qkv(layer.input_layernorm(x), cos[:, None], sin[:, None])
        k, v = (z.repeat_interleave(q.shape[1] // z.shape[1], dim=1) for z in (k, v))
        allowed = causal[None] & ~(vis[None, None, :] & ~kept[i][:, None, None])  # [H, T, T]
        s = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed[None], float("-inf"))
        o = torch.softmax(s, -1).nan_to_num() @ v
        o = torch.where((~kept[i])[None, :, None, None] & vis[None, None, :, None], 0.0, o)
        x = x + a.o_proj(o.transpose(1, 2).reshape(1, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.lm_head(lm.model.norm(x))


@torch.no_grad()
def test_head_mask_skips_pruned_heads_and_decodes_as_recomputed(tmp_path):
    lm = tiny_lm()
    emb, vis = prompt(lm, [2])
    kept = torch.ones(4, 4, dtype=torch.bool)
    kept[1, 0] = kept[2, 1] = kept[2, 3] = kept[3, 2] = False
    path = save_head_mask(tmp_path / "heads.json", kept)
    assert torch.equal(load_head_mask(path, 4, 4), kept)
    with pytest.raises(ConfigError, match=r"is for \(4, 4\) \(layers, heads\); the model has \(4, 8\)"):
        load_head_mask(path, 4, 8)
    switch(lm, yopo_head_mask=str(path))
    tokens, logits = greedy(lm, emb, vis, 6)
    torch.testing.assert_close(logits, head_reference(lm, emb, vis, kept), atol=5e-5, rtol=1e-5)
    seq, expected = emb, []
    for _ in range(6):  # generated tokens are text queries: their pruned heads do not see visual keys either
        expected.append(int(head_reference(lm, seq, vis, kept)[0, -1].argmax()))
        seq = torch.cat([seq, lm.embed(torch.tensor([expected[-1:]]))], dim=1)
    assert tokens == expected


@torch.no_grad()
def test_no_head_pruned_is_the_plain_model(tmp_path):
    lm = tiny_lm()
    emb, vis = prompt(lm, [2])
    plain_tokens, plain = greedy(lm, emb, vis, 5)
    path = save_head_mask(tmp_path / "heads.json", torch.ones(4, 4, dtype=torch.bool))
    install(_vlm(lm), EfficiencyConfig(yopo_head_mask=str(path)))
    assert lm.efficiency is None
    eff = switch(lm, force=True)
    eff.kept_heads = torch.ones(4, 4, dtype=torch.bool)  # the head-mask path run anyway, no head pruned
    tokens, logits = greedy(lm, emb, vis, 5)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert tokens == plain_tokens


@torch.no_grad()
@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_sparse_visual_ffn_equals_zeroed_units(keep):
    lm = tiny_lm()
    emb, vis = prompt(lm, [2])
    switch(lm, force=True, yopo_ffn_keep=keep)
    _, logits = greedy(lm, emb, vis, 1)
    t, m = emb.shape[1], round(128 * keep)
    cos, sin = lm.rotary(torch.arange(t)[None], emb.dtype)
    x = emb
    for i, layer in enumerate(lm.model.layers):  # the released code's way: units beyond m zeroed for visual rows
        x = x + layer.self_attn(layer.input_layernorm(x), cos[:, None], sin[:, None], None, True, None, i, t)
        h, mlp = layer.post_attention_layernorm(x), layer.mlp
        units = F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)
        units[:, vis, m:] = 0
        x = x + mlp.down_proj(units)
    torch.testing.assert_close(logits, lm.lm_head(lm.model.norm(x)), atol=1e-5, rtol=0)


class _vlm:
    def __init__(self, lm):
        self.language_model, self.num_image_token = lm, TILE

        class C:
            flash_mode = False

        self.config = C()
