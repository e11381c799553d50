"""Prefill FLOPs of one image prompt counted from the model's shapes and the tokens each decoder layer keeps
under the efficiency switches (bench_efficiency.py's FLOPs column): ViT, projector, decoder, one logits row.
"""

from __future__ import annotations

import math

from internvl.efficiency import EfficiencyConfig

TEXT = (20, 44)  # text tokens before and after the image


def window_keys(side: int, window: int) -> float:
    """Mean visual keys a visual query sees under YOPO's window: same tile, |drow|, |dcol| <= (w-1)//2, causal."""
    h, total = (window - 1) // 2, 0
    for r in range(side):
        for c in range(side):
            total += sum(1 for r2 in range(max(0, r - h), r + 1) for c2 in range(max(0, c - h), min(side, c + h + 1))
                         if (r2, c2) <= (r, c))  # fmt: skip
    return total / (side * side)


def decoder_flops(llm, p0: int, v: int, p1: int, keep: list[float], heads_kept: list[float], window: int | None,
                  tile_tokens: int, ffn_keep: float, layers: range | None = None) -> float:  # fmt: skip
    """Multiply-adds x 2 of the decoder's prefill: projections and SwiGLU per token present at each layer, and
    attention over the (causal, windowed, head-masked) query-key pairs; ranking scores are not counted."""
    hd = llm.head_dim
    hq, kv, big, inter = (
        llm.num_attention_heads * hd,
        llm.num_key_value_heads * hd,
        llm.hidden_size,
        llm.intermediate_size,
    )
    per_vis = window_keys(math.isqrt(tile_tokens), window) if window else None
    total = 0.0
    for i in layers or range(llm.num_hidden_layers):
        vi = min(v, round(keep[i] * v))
        n, f = p0 + vi + p1, heads_kept[i]
        total += 2 * n * big * (2 * hq + 2 * kv)
        total += 2 * 3 * big * (inter * (p0 + p1) + max(1, round(inter * ffn_keep)) * vi)
        vis_vis = vi * per_vis if per_vis is not None and vi == v else vi * (vi + 1) / 2
        pairs = p0 * (p0 + 1) / 2 + f * (vi * p0 + vis_vis) + p1 * p0 + p1 * (p1 + 1) / 2 + f * p1 * vi
        total += 4 * hq * pairs
    return total


def prefill_flops(cfg, tiles: int, eff: EfficiencyConfig | None) -> tuple[float, float]:
    """(all, decoder's) FLOPs of one prompt's prefill, TEXT tokens around one image of `tiles` tiles: ViT and
    projector per tile, the decoder's layers, one row of logits."""
    from internvl.model.prune import keep_ratios
    from internvl.model.yopo import load_head_mask

    vis, llm = cfg.vision, cfg.llm
    n, d = (cfg.image_size // vis.patch_size) ** 2 + 1, vis.hidden_size
    vit = vis.num_hidden_layers * (2 * n * (4 * d * d + 2 * d * vis.intermediate_size) + 4 * n * n * d)
    vit += 2 * (n - 1) * 3 * vis.patch_size**2 * d
    wide = d * round(1 / cfg.projector.downsample_ratio) ** 2
    nit = cfg.num_image_token
    proj = 2 * nit * (wide * llm.hidden_size + llm.hidden_size**2)
    L, v = llm.num_hidden_layers, nit * tiles
    eff = eff or EfficiencyConfig()
    keep = keep_ratios(eff, L)
    heads = [1.0] * L
    if eff.yopo_head_mask:
        heads = load_head_mask(eff.yopo_head_mask, L, llm.num_attention_heads).float().mean(1).tolist()
    args = (heads, eff.yopo_window, nit, eff.yopo_ffn_keep)
    if eff.scale_compress is not None:  # layers 1-2 on everything, then all on the shorter row
        span = nit * max(1, tiles - 1)  # the image's tiles but the last (the thumbnail), as model/prune.py
        short = v - span + max(1, round(span * eff.scale_compress))
        dec = decoder_flops(llm, TEXT[0], v, TEXT[1], [1.0] * L, *args, layers=range(min(2, L)))
        dec += decoder_flops(llm, TEXT[0], short, TEXT[1], keep, *args)
    else:
        dec = decoder_flops(llm, TEXT[0], v, TEXT[1], keep, *args)
    dec += 2 * llm.hidden_size * llm.vocab_size
    return tiles * (vit + proj) + dec, dec
