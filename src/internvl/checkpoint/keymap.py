"""Explicit key maps between our module tree and the two checkpoint layouts.

Our parameter names are the original layout's for Qwen2/Llama backbones. The maps below cover the
rest: InternLM2's fused `wqkv` (grouped per KV head), and the transformers `-hf` renames with the ViT
`qkv` split into thirds. Each `Entry` converts a group of tensors both ways, exactly (no arithmetic).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import LLMConfig, ModelConfig

Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


@dataclass
class Entry:
    internal: list[str]
    external: list[str]
    to_internal: Convert = _same
    to_external: Convert = _same


# ---- InternLM2 wqkv ------------------------------------------------------------------------------


def split_wqkv(w: torch.Tensor, cfg: LLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused rows [(nH + 2 nKV) D, ...] ordered per KV head as g query heads, one key, one value."""
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    d = cfg.head_dim
    grouped = w.reshape(cfg.num_key_value_heads, g + 2, d, *w.shape[1:])
    q = grouped[:, :g].reshape(cfg.num_attention_heads * d, *w.shape[1:])
    k = grouped[:, g].reshape(cfg.num_key_value_heads * d, *w.shape[1:])
    v = grouped[:, g + 1].reshape(cfg.num_key_value_heads * d, *w.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    d = cfg.head_dim
    rest = q.shape[1:]
    q = q.reshape(cfg.num_key_value_heads, g, d, *rest)
    k = k.reshape(cfg.num_key_value_heads, 1, d, *rest)
    v = v.reshape(cfg.num_key_value_heads, 1, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


_INTERNLM2_RENAMES = [
    (r"^language_model\.model\.embed_tokens\.", "language_model.model.tok_embeddings."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"^language_model\.lm_head\.", "language_model.output."),
]

# ---- transformers (-hf) layout -------------------------------------------------------------------

_HF_VISION_RENAMES = [
    (r"^vision_model\.", "model.vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_HF_PROJECTOR = {"mlp1.0.": "model.multi_modal_projector.layer_norm.", "mlp1.1.": "model.multi_modal_projector.linear_1.",
                 "mlp1.3.": "model.multi_modal_projector.linear_2."}  # fmt: skip
_HF_LLM_RENAMES = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


_QKV = re.compile(r"^(language_model\.model\.layers\.\d+\.self_attn\.)q_proj\.(weight|bias)$")
_VIT_QKV = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.attn\.)qkv\.(weight|bias)$")


def build_entries(internal_keys: list[str], config: ModelConfig, layout: str) -> list[Entry]:
    """Entries covering every internal key for `layout` in {"original", "hf"}."""
    if layout not in ("original", "hf"):
        raise ValueError(f"unknown layout {layout!r}")
    llm = config.llm
    fused_llm = layout == "original" and llm.family == "internlm2"
    entries: list[Entry] = []
    done: set[str] = set()
    for key in internal_keys:
        if key in done:
            continue
        m = _QKV.match(key)
        if m and fused_llm:
            prefix, kind = m.groups()
            group = [f"{prefix}{p}_proj.{kind}" for p in "qkv"]
            ext = _rename(prefix, _INTERNLM2_RENAMES).replace(".self_attn.", ".attention.") + f"wqkv.{kind}"
            entries.append(Entry(group, [ext], lambda ts: list(split_wqkv(ts[0], llm)),
                                 lambda ts: [merge_wqkv(*ts, llm)]))  # fmt: skip
            done.update(group)
            continue
        m = _VIT_QKV.match(key)
        if m and layout == "hf":
            prefix, kind = m.groups()
            base = _rename(prefix + "qkv", _HF_VISION_RENAMES)[: -len("qkv")]
            ext = [f"{base}{p}_proj.{kind}" for p in "qkv"]
            entries.append(Entry([key], ext, lambda ts: [torch.cat(ts, 0)],
                                 lambda ts: [t.contiguous() for t in ts[0].chunk(3, 0)]))  # fmt: skip
            done.add(key)
            continue
        entries.append(Entry([key], [_external_name(key, config, layout)]))
        done.add(key)
    return entries


def _external_name(key: str, config: ModelConfig, layout: str) -> str:
    if layout == "original":
        return _rename(key, _INTERNLM2_RENAMES) if config.llm.family == "internlm2" else key
    if key.startswith("vision_model."):
        return _rename(key, _HF_VISION_RENAMES)
    for old, new in _HF_PROJECTOR.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return _rename(key, _HF_LLM_RENAMES)


def detect_layout(keys: set[str]) -> str:
    """'hf' if the keys use the transformers names, 'original' otherwise."""
    if any(k.startswith(("model.vision_tower.", "model.language_model.", "vision_tower.")) for k in keys):
        return "hf"
    return "original"
