"""YOPO, "Your MLLM Only Needs Fewer Efforts to See" (arXiv 2410.06169): the prefill's visual computation cut
once, for every sample. Neighbor-aware visual attention (a visual token sees the text before it and only the
visual tokens of its own tile within a w x w window, causal order kept), inactive heads (a pruned head computes
nothing for visual queries and no text query of it sees visual keys), and a sparse visual FFN (visual tokens use
the first `keep` of the intermediate units). The released code only masks; here the skipped work is not done.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .llm import attention


def tile_grid(visual: torch.Tensor, tile_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For tokens [T] (visual bool): each visual token's tile number and (row, col) on its tile's square token
    grid, -1 for text. Each run of consecutive visual tokens (one image) is whole tiles of `tile_tokens`."""
    side = math.isqrt(tile_tokens)
    if side * side != tile_tokens:
        raise ConfigError(f"yopo_window: a tile's {tile_tokens} tokens are not a square grid")
    t = visual.shape[0]
    idx = torch.arange(t, device=visual.device)
    first = visual & ~torch.cat([visual.new_zeros(1), visual[:-1]])
    run_start = torch.cummax(torch.where(first, idx, idx.new_zeros(())), 0).values
    within = idx - run_start
    ends = visual & ~torch.cat([visual[1:], visual.new_zeros(1)])
    if bool((within[ends] + 1).remainder(tile_tokens).any()):
        raise ConfigError(f"yopo_window: an image's visual tokens are not whole tiles of {tile_tokens} tokens")
    # tile number: the tiles of every earlier run, plus this token's tile within its run
    tiles_before = torch.cumsum(torch.where(ends, (within + 1) // tile_tokens, 0), 0) - torch.where(
        ends, (within + 1) // tile_tokens, 0
    )
    tile = torch.where(visual, tiles_before + within // tile_tokens, -1)
    cell = within.remainder(tile_tokens)
    return tile, torch.where(visual, cell // side, -1), torch.where(visual, cell % side, -1)


def window_mask(visual: torch.Tensor, tile_tokens: int, window: int) -> torch.Tensor:
    """The prefill attention mask [T, T] (True = attends) that neighbor-aware attention implements: causal;
    a visual query sees every text key before it and the visual keys of its own tile with |drow|, |dcol| <=
    (window - 1) // 2. The reference the gathered attention below is tested against."""
    tile, row, col = tile_grid(visual, tile_tokens)
    half = (window - 1) // 2
    t = visual.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool, device=visual.device).tril()
    near = (tile[:, None] == tile[None, :]) & ((row[:, None] - row[None, :]).abs() <= half) & (
        (col[:, None] - col[None, :]).abs() <= half
    )
    allowed = ~visual[:, None] | ~visual[None, :] | near
    return causal & allowed


def window_neighbors(tile: torch.Tensor, row: torch.Tensor, col: torch.Tensor, keys: torch.Tensor,
                     side: int, window: int) -> torch.Tensor:  # fmt: skip
    """Key positions [N, W] of the earlier-or-same window neighbors of N visual tokens (tile/row/col of each,
    `keys` their key positions); -1 where the neighbor is off the grid or not among the N."""
    half = (window - 1) // 2
    n_tiles = int(tile.max()) + 1 if tile.numel() else 0
    grid = torch.full((n_tiles, side + 2 * half, side + 2 * half), -1, dtype=torch.long, device=keys.device)
    grid[tile, row + half, col + half] = keys
    offsets = [(dr, dc) for dr in range(-half, 1) for dc in range(-half, half + 1) if dr < 0 or dc <= 0]
    dr = torch.tensor([o[0] for o in offsets], device=keys.device)
    dc = torch.tensor([o[1] for o in offsets], device=keys.device)
    return grid[tile[:, None], row[:, None] + half + dr, col[:, None] + half + dc]


def visual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, key_visual: torch.Tensor,
                     q_visual: torch.Tensor, neighbors: torch.Tensor | None, kept: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Prefill attention of n new tokens (q [1, H, n, D], keys k/v [1, Hkv, start + n, D], the new ones last;
    key_visual [start + n], q_visual [n]) with YOPO's cuts: `neighbors` [visual queries, W] (window_neighbors)
    or None for the full causal view; `kept` [H] bool heads or None (all). Returns [1, H, n, D]."""
    _, h, n, d = q.shape
    groups = h // k.shape[1]
    out = q.new_zeros(1, h, n, d)
    keys = k.shape[2]
    causal = torch.arange(keys, device=q.device)[None, :] <= (start + torch.arange(n, device=q.device))[:, None]
    text_q = ~q_visual
    if bool(text_q.any()):
        m = causal[text_q][None, None]
        if kept is not None:  # a pruned head's text queries do not see visual keys
            m = m & ~(key_visual[None, None, None, :] & ~kept[None, :, None, None])
        out[:, :, text_q] = attention(q[:, :, text_q], k, v, m, False)
    if not bool(q_visual.any()):
        return out
    heads = torch.arange(h, device=q.device) if kept is None else kept.nonzero().flatten()
    if heads.numel() == 0:
        return out  # every head pruned: visual queries attend nowhere, their attention output is zero
    qv = q[:, heads][:, :, q_visual]
    ks, vs = k[:, heads // groups], v[:, heads // groups]
    if neighbors is None:
        res = F.scaled_dot_product_attention(qv, ks, vs, attn_mask=causal[q_visual][None, None])
    else:
        res = _window_attention(qv, ks, vs, start, key_visual, q_visual, neighbors)
    rows = q_visual.nonzero().flatten()
    out[:, heads[:, None], rows[None, :]] = res
    return out


def _window_attention(q, k, v, start, key_visual, q_visual, neighbors):
    """q [1, Hs, nv, D] of the visual queries, k/v [1, Hs, S, D] (one per query head). Each query's keys are
    the text keys before it (the same for all queries of one image: grouped) and its window neighbors."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qpos = start + q_visual.nonzero().flatten()
    text_before = torch.cumsum((~key_visual).long(), 0)[qpos]  # text keys before each visual query
    text_keys = (~key_visual).nonzero().flatten()
    out = torch.empty_like(q)
    for c in torch.unique(text_before).tolist():
        sel = (text_before == c).nonzero().flatten()
        qg = q[:, :, sel]
        ctx = text_keys[:c]
        nb = neighbors[sel]
        kn = k[:, :, nb.clamp(min=0)]  # [1, Hs, ng, W, D]
        vn = v[:, :, nb.clamp(min=0)]
        s_nb = torch.einsum("bhnd,bhnwd->bhnw", qg, kn) * scale
        s_nb = s_nb.masked_fill(nb[None, None] < 0, float("-inf"))
        s_ctx = qg @ k[:, :, ctx].transpose(-1, -2) * scale
        p = torch.softmax(torch.cat([s_ctx, s_nb], -1).float(), -1).to(q.dtype)
        out[:, :, sel] = p[..., :c] @ v[:, :, ctx] + torch.einsum("bhnw,bhnwd->bhnd", p[..., c:], vn)
    return out


def dense_weight(linear) -> torch.Tensor:
    """A linear layer's weight [out, in] as a float tensor (the int8 kernel module dequantized)."""
    if hasattr(linear, "qweight"):
        return linear.qweight.float() * linear.scale[:, None]
    return linear.weight


def sliced_ffn(mlp, keep: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `keep` of a SwiGLU MLP's intermediate units: gate [m, H], up [m, H], down [H, m]."""
    if getattr(mlp, "gate_up_proj", None) is not None:
        both = dense_weight(mlp.gate_up_proj)
        inter = both.shape[0] // 2
        gate, up = both[:inter], both[inter:]
    elif hasattr(mlp, "gate_proj"):
        gate, up = dense_weight(mlp.gate_proj), dense_weight(mlp.up_proj)
        inter = gate.shape[0]
    else:
        raise ConfigError("yopo_ffn_keep: the sparse visual FFN needs dense SwiGLU layers (not mixture-of-experts)")
    m = max(1, round(inter * keep))
    down = dense_weight(mlp.down_proj)
    return gate[:m].contiguous(), up[:m].contiguous(), down[:, :m].contiguous()


def sparse_ffn(x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    gate, up, down = (w.to(x.dtype) for w in weights)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def save_head_mask(path: str | Path, kept: torch.Tensor, **meta) -> Path:
    """Write a head mask [layers, heads] (True = the head keeps its visual work) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": "yopo_head_mask", "layers": kept.shape[0], "heads": kept.shape[1],
           "kept": kept.int().tolist(), **meta}  # fmt: skip
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_head_mask(path: str | Path, layers: int, heads: int) -> torch.Tensor:
    try:
        doc = json.loads(Path(path).read_text())
        kept = torch.tensor(doc["kept"], dtype=torch.bool)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"yopo_head_mask: cannot read a head mask from {path}: {e}") from None
    if tuple(kept.shape) != (layers, heads):
        raise ConfigError(f"yopo_head_mask: {path} is for {tuple(kept.shape)} (layers, heads); "
                          f"the model has ({layers}, {heads})")  # fmt: skip
    return kept
