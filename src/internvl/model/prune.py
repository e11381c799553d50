"""Fewer visual tokens inside the decoder, as one switchable forward: FastV (arXiv 2403.06764) and a per-layer keep
schedule (G-Search / P-Sigmoid, arXiv 2412.00556) drop the visual tokens the prompt attends to least, YOPO
(yopo.py) cuts visual attention, heads and FFN units and drops visual tokens after a layer, Mini-Monkey's scale
compression (arXiv 2408.02034) shortens an image span by layer-2 attention. Dropped tokens leave the sequence:
later layers run on fewer rows and their KV cache (visual_cache.py) holds only the kept tokens.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import torch

from ..errors import ConfigError
from .llm import attention
from .visual_cache import LayeredCache
from .yopo import load_head_mask, sliced_ffn, sparse_ffn, tile_grid, visual_attention, window_neighbors

RANK_CHUNK = 256  # query rows per step when scoring a span (bounds the [heads, rows, keys] probabilities)


def save_schedule(path: str | Path, keep: list[float], **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "keep_schedule", "keep": [round(float(r), 6) for r in keep], **meta},
                               indent=1) + "\n")  # fmt: skip
    return path


def load_schedule(path: str | Path, layers: int) -> list[float]:
    """Per-layer keep ratios from a schedule JSON (`internvl calibrate`): one per layer, non-increasing."""
    try:
        keep = [float(r) for r in json.loads(Path(path).read_text())["keep"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"schedule: cannot read keep ratios from {path}: {e}") from None
    if len(keep) != layers:
        raise ConfigError(f"schedule: {path} has {len(keep)} keep ratios but the model has {layers} layers")
    return keep


def keep_ratios(cfg, layers: int) -> list[float]:
    """Each layer's fraction of a prompt's visual tokens: the schedule, FastV's ratio from its layer on and 0 from
    YOPO's drop layer on (the smallest wins). Checked non-increasing; layer 0 keeps all or none (ranking uses
    the attention of the layer before)."""
    keep = load_schedule(cfg.schedule, layers) if cfg.schedule else [1.0] * layers
    if cfg.fastv_layer is not None and cfg.fastv_keep < 1.0:
        keep = [min(r, cfg.fastv_keep) if i >= cfg.fastv_layer else r for i, r in enumerate(keep)]
    if cfg.yopo_drop_after is not None:
        keep = [0.0 if i >= cfg.yopo_drop_after else r for i, r in enumerate(keep)]
    return checked(keep, layers)


def checked(keep: list[float], layers: int) -> list[float]:
    if len(keep) != layers:
        raise ConfigError(f"{len(keep)} keep ratios for {layers} layers")
    if any(not 0.0 <= r <= 1.0 for r in keep) or any(b > a for a, b in pairwise(keep)):
        raise ConfigError(f"keep ratios must lie in [0, 1] and never increase with depth, got {keep}")
    if layers and 0.0 < keep[0] < 1.0:
        raise ConfigError("the first decoder layer keeps all visual tokens or none (FastV's layer is at least 1)")
    return keep


def received(q, k, start: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Mean attention probability (over heads and the query `rows`) that key positions `cols` receive; q [1, H, n,
    D] of the new rows at key positions start.., k [1, Hkv, S, D]."""
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    keys = torch.arange(k.shape[2], device=q.device)
    total = torch.zeros(cols.numel(), device=q.device)
    for chunk in rows.split(RANK_CHUNK):
        s = (q[:, :, chunk] @ kk.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
        s = s.masked_fill(keys[None, :] > (start + chunk)[:, None], float("-inf"))
        total += torch.softmax(s, -1)[..., cols].sum(dim=(0, 1, 2))
    return total / (q.shape[1] * rows.numel())


class DecoderEfficiency:
    """The language model's `efficiency`: CausalLM.forward hands it every call (it answers None to let the plain
    path run) and new_cache() makes its LayeredCache."""

    def __init__(self, cfg, num_layers: int, num_heads: int, tile_tokens: int, keep: list[float] | None = None):
        """`keep` (calibration's trial schedules) replaces the config's keep ratios."""
        self.keep = keep_ratios(cfg, num_layers) if keep is None else checked(list(keep), num_layers)
        # ranked by FastV's released code: the last token; by a schedule (G-Search): the text after the images
        self.rank_by = "text" if cfg.schedule or keep is not None else "last"
        self.window = cfg.yopo_window
        kept = load_head_mask(cfg.yopo_head_mask, num_layers, num_heads) if cfg.yopo_head_mask else None
        self.kept_heads = None if kept is None or bool(kept.all()) else kept
        self.ffn_keep = cfg.yopo_ffn_keep
        self.scale_compress = cfg.scale_compress
        self.span_tiles: int | None = None  # scale compression's span: leading tiles of the first image
        self.tile_tokens = tile_tokens
        self.force = False  # run this path even where nothing is cut (tests, calibration)
        self.probe = None  # calibration: probe(layer, q, k, start, key_visual, q_visual) at every prefill layer
        self._ffn: dict[int, tuple] = {}
        self.noop = (all(r == 1.0 for r in self.keep) and self.window is None and self.kept_heads is None
                     and self.ffn_keep == 1.0 and self.scale_compress is None)  # fmt: skip

    def new_cache(self, lm, batch: int, dtype=None, device=None, capacity: int = 256) -> LayeredCache:
        w, c = lm.model.embed_tokens.weight, lm.config
        return LayeredCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim,
                            dtype or w.dtype, device or w.device, capacity)  # fmt: skip

    def forward(self, lm, embeds, positions, cache, valid_lengths, logits_to_keep, visual_mask):
        """Logits as CausalLM.forward computes them, with the switches on; None where the plain path is exact."""
        visual = visual_mask is not None and bool(visual_mask.any())
        layered = isinstance(cache, LayeredCache)
        if not self.force and (self.noop or (not visual and (cache is None or not layered or cache.pristine))):
            return None
        if cache is not None and not layered:
            raise ConfigError("efficiency switches need the model's own cache (model.new_cache())")
        b, t, _ = embeds.shape
        if cache is None:
            cache = self.new_cache(lm, b, capacity=t)
        cache.reserve(int(cache.lengths.max()) + t)
        if positions is None:
            first = cache.lengths if cache.offsets is None else cache.lengths + cache.offsets
            positions = first.to(embeds.device)[:, None] + torch.arange(t, device=embeds.device)
        if visual_mask is None:
            visual_mask = torch.zeros(b, t, dtype=torch.bool, device=embeds.device)
        if t == 1:
            x = self._decode(lm, embeds, positions, cache, valid_lengths)
        else:
            x = torch.zeros_like(embeds)
            for r in range(b):
                v = t if valid_lengths is None else int(valid_lengths[r])
                rows, h, n = self._prefill_row(lm, embeds[r : r + 1, :v], positions[r : r + 1, :v],
                                               visual_mask[r, :v], cache, r)  # fmt: skip
                x[r : r + 1, rows] = h
                cache.lengths[r] += n
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return lm.lm_head(lm.model.norm(x))

    # ---- prefill: one row at a time (rows keep different numbers of tokens) ----

    def _prefill_row(self, lm, x, pos, vis, cache: LayeredCache, row: int):
        """Run one row's v new tokens; returns (the rows of the v whose outputs are given, their last hidden
        states, tokens the cache row advances by)."""
        rows = torch.arange(x.shape[1], device=x.device)
        if self.scale_compress is not None and bool(vis.any()):
            rows = self._compress(lm, x, pos, vis, cache, row)
            x, vis = x[:, rows], vis[rows]
            pos = pos[:, :1] + torch.arange(rows.numel(), device=pos.device).to(pos.dtype)  # a fresh sequence
        cos, sin = lm.rotary(pos, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        grid = tile_grid(vis, self.tile_tokens) if self.window is not None and bool(vis.any()) else None
        counts = [min(int(vis.sum()), round(r * int(vis.sum()))) for r in self.keep]
        out = torch.empty_like(x)
        alive = torch.arange(x.shape[1], device=x.device)
        layers = lm.model.layers
        h, scores, held = x, None, []
        for i in range(len(layers)):
            va = vis[alive]
            if counts[i] < int(va.sum()):  # drop the visual tokens ranked lowest by the layer before
                keep = ~va
                if counts[i] > 0:
                    keep[va.nonzero().flatten()[scores.topk(counts[i]).indices]] = True
                out[:, alive[~keep]] = h[:, ~keep]
                h, alive, va = h[:, keep], alive[keep], va[keep]
            ranking = None
            if i + 1 < len(layers) and 0 < counts[i + 1] < int(va.sum()):
                after = (~va).nonzero().flatten()
                last_vis = int(va.nonzero().max())
                text = after[after > last_vis] if self.rank_by == "text" else after[-1:]
                ranking = (text if text.numel() else after[-1:], va.nonzero().flatten())
            start = int(cache.held(i)[row])
            h, scores = self._layer(lm, i, h, cos[..., alive, :], sin[..., alive, :], cache, row, start, va, alive,
                                    grid, ranking)  # fmt: skip
            held.append(va)
        out[:, alive] = h
        self._record(cache, row, held, x.shape[1])
        return rows, out, x.shape[1]

    def _record(self, cache: LayeredCache, row: int, held: list[torch.Tensor], n: int) -> None:
        """Per layer: the call's tokens that layer does not hold, and (if any) which held ones are visual."""
        for i, va in enumerate(held):
            start = int(cache.held(i)[row])
            cache.dropped[i, row] += n - va.numel()
            old = cache.visual[row][i]
            if old is not None or bool(va.any()):
                prev = old[:start] if old is not None else torch.zeros(start, dtype=torch.bool)
                prev = torch.cat([prev, torch.zeros(start - prev.numel(), dtype=torch.bool)])
                cache.visual[row][i] = torch.cat([prev, va.cpu()])

    def _layer(self, lm, i, h, cos, sin, cache, row, start, vis, alive, grid, ranking):
        layer = lm.model.layers[i]
        attn = layer.self_attn
        n = h.shape[1]
        q, k, v = attn._qkv(layer.input_layernorm(h), cos, sin)
        cache.k[i][row, :, start : start + n] = k[0]
        cache.v[i][row, :, start : start + n] = v[0]
        keys, values = cache.k[i][row : row + 1, :, : start + n], cache.v[i][row : row + 1, :, : start + n]
        kept = self.kept_heads[i].to(h.device) if self.kept_heads is not None else None
        if (self.window is None or not bool(vis.any())) and kept is None and self.probe is None:
            mask = None
            if start:
                mask = torch.arange(start + n, device=h.device)[None, :] <= start + torch.arange(n, device=h.device)[:, None]
            out = attention(q, keys, values, mask, start == 0)
        else:
            old = cache.visual[row][i]
            key_visual = torch.zeros(start + n, dtype=torch.bool, device=h.device)
            if old is not None:
                key_visual[: min(start, old.numel())] = old[:start].to(h.device)
            key_visual[start:] = vis
            neighbors = None
            if self.window is not None and grid is not None and bool(vis.any()):
                va = alive[vis]
                side = math.isqrt(self.tile_tokens)
                neighbors = window_neighbors(grid[0][va], grid[1][va], grid[2][va], start + vis.nonzero().flatten(),
                                             side, self.window)  # fmt: skip
            if self.probe is not None:
                self.probe(i, q, keys, start, key_visual, vis)
            out = visual_attention(q, keys, values, start, key_visual, vis, neighbors, kept)
        scores = received(q, keys, start, ranking[0], start + ranking[1]) if ranking is not None else None
        h = h + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
        x = layer.post_attention_layernorm(h)
        if self.ffn_keep < 1.0 and bool(vis.any()):
            f = torch.empty_like(x)
            f[:, ~vis] = layer.mlp(x[:, ~vis])
            if i not in self._ffn:
                self._ffn[i] = sliced_ffn(layer.mlp, self.ffn_keep)
            f[:, vis] = sparse_ffn(x[:, vis], self._ffn[i])
        else:
            f = layer.mlp(x)
        return h + f, scores

    def _compress(self, lm, x, pos, vis, cache, row) -> torch.Tensor:
        """Mini-Monkey's scale compression: layers 1-2 on the whole row; the span keeps the tokens the rows after
        it attend to most in layer 2 (mean over those rows and heads). Returns the rows kept, in order."""
        first = int(vis.nonzero()[0])
        gaps = (~vis[first:]).nonzero()
        run = int(gaps[0]) if gaps.numel() else vis.numel() - first  # the first image's tokens
        tiles = self.span_tiles if self.span_tiles is not None else max(1, run // self.tile_tokens - 1)
        span = torch.arange(first, first + min(run, tiles * self.tile_tokens), device=x.device)
        after = torch.arange(int(span[-1]) + 1, vis.numel(), device=x.device)
        if after.numel() == 0 or len(lm.model.layers) < 2:
            return torch.arange(vis.numel(), device=x.device)
        cos, sin = lm.rotary(pos, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        alive = torch.arange(vis.numel(), device=x.device)
        h, scores = x, None
        for i in range(2):
            start = int(cache.held(i)[row])
            h, scores = self._layer(lm, i, h, cos, sin, cache, row, start, vis, alive, None,
                                    (after, span) if i == 1 else None)  # fmt: skip
        n = max(1, round(span.numel() * self.scale_compress))
        kept = span[scores.topk(n).indices.sort().values]
        return torch.cat([alive[: int(span[0])], kept, after])

    # ---- decode: one token per row; each layer reads its own number of held keys ----

    def _decode(self, lm, x, positions, cache: LayeredCache, valid_lengths):
        b = x.shape[0]
        cos, sin = lm.rotary(positions, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        rows = torch.arange(b, device=x.device)
        for i, layer in enumerate(lm.model.layers):
            attn = layer.self_attn
            q, k, v = attn._qkv(layer.input_layernorm(x), cos, sin)
            held = cache.held(i)
            at = held.to(x.device)
            cache.k[i][rows, :, at] = k[:, :, 0]
            cache.v[i][rows, :, at] = v[:, :, 0]
            n = int(held.max()) + 1
            mask = None
            if not bool((held == held[0]).all()):
                mask = (torch.arange(n, device=x.device)[None, :] <= at[:, None])[:, None, None]
            if self.kept_heads is not None:
                vk = cache.visual_keys(i, n)
                if vk is not None:  # a pruned head's text queries do not see visual keys
                    hide = vk.to(x.device)[:, None, None, :] & ~self.kept_heads[i].to(x.device)[None, :, None, None]
                    mask = (mask if mask is not None else torch.ones(1, 1, 1, n, dtype=torch.bool, device=x.device)) & ~hide
            out = attention(q, cache.k[i][:, :, :n], cache.v[i][:, :, :n], mask, False)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.lengths += valid_lengths.cpu() if valid_lengths is not None else 1
        return x


def install(model, cfg) -> None:
    """Turn the decoder-side switches of `cfg` (an EfficiencyConfig, or None: off) on `model`'s language model."""
    lm = model.language_model
    if cfg is None or cfg.is_off():
        lm.efficiency = None
        return
    llm = lm.config
    if llm.family == "gpt_oss" or llm.visual_experts:
        raise ConfigError(f"efficiency switches do not support the {llm.family} decoder "
                          f"{'with visual experts ' if llm.visual_experts else ''}(sinks, windows or experts)")  # fmt: skip
    if cfg.yopo_window is not None and getattr(model.config, "flash_mode", False):
        raise ConfigError("yopo_window: InternVL3.5-Flash tiles have two token counts; the window needs one grid")
    eff = DecoderEfficiency(cfg, llm.num_hidden_layers, llm.num_attention_heads, model.num_image_token)
    lm.efficiency = None if eff.noop else eff
