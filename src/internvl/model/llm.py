"""Decoder-only language model shared by Qwen2, Llama, InternLM2 and Qwen3(-MoE) (RMSNorm, SwiGLU, RoPE, GQA).

Names mirror the original checkpoints of the Qwen2/Llama families (`model.layers.{i}.self_attn.q_proj`);
InternLM2's fused `wqkv` is split on load (see checkpoint/original.py), so one implementation serves all.
Qwen3 adds per-head `q_norm`/`k_norm` before RoPE; Qwen3-MoE's sparse feed-forward is in moe.py.
GPT-OSS adds a sink logit per head and sliding-window layers to the attention, and its own experts (gpt_oss.py).
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LLMConfig
from .cache import KVCache
from .gpt_oss import GptOssMoE, window_attention
from .moe import SparseMoE
from .rope import Rotary, apply_rope
from .vit import RMSNorm

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
# how packed rows (`seq_ids`) attend: "spans" runs each sample on its own; "mask" is one block-diagonal mask
# over the whole row (kept for comparison in benchmarks/profile_train_step.py)
PACKED_ATTENTION = "spans"


class Spans:
    """Packed rows: causal attention inside each sample only. Each sample runs through SDPA on its own, so a
    pack of n samples of length L costs n*L^2, not the (n*L)^2 of a block-diagonal mask. Samples are cut
    with `split`, whose backward is one concatenation (a slice's backward would zero-fill the whole row)."""

    def __init__(self, seq_ids: torch.Tensor):
        ids = seq_ids.cpu()
        self.lengths = []  # per row: the lengths of its runs of equal ids, in order
        for row in ids:
            change = (row[1:] != row[:-1]).nonzero().flatten().add(1).tolist()
            bounds = [0, *change, len(row)]
            self.lengths.append([b - a for a, b in pairwise(bounds)])

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        """(row, start, end) of every sample."""
        out = []
        for row, lengths in enumerate(self.lengths):
            start = 0
            for n in lengths:
                out.append((row, start, start + n))
                start += n
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows = []
        for r, lengths in enumerate(self.lengths):
            qs, ks, vs = (x[r : r + 1].split(lengths, 2) for x in (q, k, v))
            outs = [attention(qi, ki, vi, None, True) for qi, ki, vi in zip(qs, ks, vs)]
            rows.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
        return torch.cat(rows) if len(rows) > 1 else rows[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D]; grouped-query attention through SDPA. `mask` is a boolean
    [B, 1, T, S] mask, None, or `Spans` (packed rows)."""
    if isinstance(mask, Spans):
        return mask.attend(q, k, v)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the concatenated outputs of `linears` (same input)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int = 0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_proj: nn.Linear | None = None
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        if cfg.family == "gpt_oss":  # a learned logit per head in every softmax; some layers see a window
            self.sinks = nn.Parameter(torch.zeros(self.num_heads))
            self.window = cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None

    def fuse(self) -> None:
        """Inference only: q/k/v become one projection (one weight stream per decoded token, not three)."""
        self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = x.shape
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        norm = hasattr(self, "q_norm")
        if self.qkv_proj is None:
            q = self.q_proj(x).view(b, t, hq, d)
            k = self.k_proj(x).view(b, t, hk, d)
            if norm:
                q, k = self.q_norm(q), self.k_norm(k)
            v = self.v_proj(x).view(b, t, hk, d).transpose(1, 2)
            return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v
        qkv = self.qkv_proj(x).view(b, t, hq + 2 * hk, d).transpose(1, 2)
        qk = qkv[:, : hq + hk]
        if norm:
            qk = torch.cat([self.q_norm(qk[:, :hq]), self.k_norm(qk[:, hq:])], dim=1)
        qk = apply_rope(qk, cos, sin)  # q and k heads rotated in one pass
        return qk[:, :hq], qk[:, hq:], qkv[:, hq + hk :]

    def forward(self, x, cos, sin, mask, causal, cache: KVCache | None, layer: int, kv_len: int):
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            cache.write(layer, k, v, uniform=mask is None)
            k, v = cache.view(layer, kv_len)
        if hasattr(self, "sinks"):
            out = window_attention(q, k, v, mask, cache, self.sinks, self.window)
        else:
            out = attention(q, k, v, mask, causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig, intermediate: int | None = None):
        super().__init__()
        inter = intermediate or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def fuse(self) -> None:
        """Inference only: gate and up become one projection."""
        self.gate_up_proj = _fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(cfg: LLMConfig, layer: int) -> nn.Module:
    """The feed-forward block of decoder layer `layer`: dense SwiGLU, or Qwen3-MoE's experts where sparse."""
    if cfg.family == "gpt_oss":
        return GptOssMoE(cfg)
    if not cfg.sparse(layer):
        return MLP(cfg)
    return SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                     lambda: MLP(cfg, cfg.moe_intermediate_size))  # fmt: skip


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = make_mlp(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, causal, cache, layer, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, cache, layer, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """`language_model`: DecoderModel + untied lm_head. Works on embeddings so images can be merged in."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.gradient_checkpointing = False
        self.efficiency = None  # visual-efficiency switches (model/prune.py install()); None: the plain path

    @property
    def fused(self) -> bool:
        return bool(self.model.layers) and self.model.layers[0].self_attn.qkv_proj is not None

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up in every layer, for decoding (the model can no longer be saved or trained)."""
        if not self.fused:
            for layer in self.model.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def decode(self, tokens: torch.Tensor, cache: KVCache, valid_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of one new token per cache row (`tokens` [B]), appended as forward() does."""
        return self(self.embed(tokens[:, None]), cache=cache, valid_lengths=valid_lengths)[:, -1]

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, device=None, capacity: int = 256) -> KVCache:
        if self.efficiency is not None:  # per-layer token counts (model/visual_cache.py)
            return self.efficiency.new_cache(self, batch, dtype, device, capacity)
        w = self.model.embed_tokens.weight
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim,
                       dtype or w.dtype, device or w.device, capacity)  # fmt: skip

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid_lengths: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `embeds` [B, T, H].

        Without a cache: causal attention, optionally restricted to each packed sample (`seq_ids` [B, T])
        and to real tokens (`attention_mask` [B, T], 1 = token). With a cache: the T new tokens of each row
        are appended after its stored length; `valid_lengths` [B] says how many of them are real (right
        padding), and only those advance the row. `logits_to_keep` > 0 computes logits for the last
        positions only. `visual_mask` [B, T] (image tokens) is read by the efficiency switches only.
        """
        if self.efficiency is not None and seq_ids is None and attention_mask is None and not self.training:
            out = self.efficiency.forward(self, embeds, positions, cache, valid_lengths, logits_to_keep, visual_mask)
            if out is not None:
                return out
        b, t, _ = embeds.shape
        mask, causal, kv_len = None, True, t
        if cache is not None:
            start = cache.lengths.to(embeds.device)
            if positions is None:
                first = start if cache.offsets is None else start + cache.offsets.to(embeds.device)  # V2PE
                positions = first[:, None] + torch.arange(t, device=embeds.device)
            kv_len = int(cache.lengths.max().item()) + t
            cache.reserve(kv_len)
            if t > 1 or not cache.same_lengths:
                q_idx = start[:, None] + torch.arange(t, device=embeds.device)  # [B, T]
                mask = (torch.arange(kv_len, device=embeds.device)[None, None, :] <= q_idx[:, :, None])[:, None]
            causal = False
        else:
            if positions is None:
                positions = torch.arange(t, device=embeds.device).expand(b, t)
            if seq_ids is not None and attention_mask is None and PACKED_ATTENTION == "spans":
                mask, causal = Spans(seq_ids), False
            elif seq_ids is not None or attention_mask is not None:
                mask = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()[None, None].expand(b, 1, t, t)
                if seq_ids is not None:
                    mask = mask & (seq_ids[:, None, :, None] == seq_ids[:, None, None, :])
                if attention_mask is not None:
                    key_ok = attention_mask.bool()[:, None, None, :]
                    # a padded query row would attend to nothing (NaN in SDPA): let it see itself
                    mask = (mask & key_ok) | torch.eye(t, dtype=torch.bool, device=embeds.device)
                causal = False
        cos, sin = self.rotary(positions, embeds.dtype)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        x = embeds
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, causal, None, i, kv_len, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, causal, cache, i, kv_len)
        if cache is not None:
            cache.lengths += valid_lengths.cpu() if valid_lengths is not None else t
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Reference-style initialization for training from scratch: normal(0, std) linears/embeddings."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


