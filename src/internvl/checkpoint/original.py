"""The original InternVL layout (`model_type: internvl_chat`, remote code): its `config.json` codec and its
tensor key map. Our parameter names are this layout's for Qwen2/Llama; InternLM2 renames and fuses `wqkv`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import LLMConfig, ModelConfig, ProcessorConfig, ProjectorConfig, VisionConfig
from ..errors import ConfigError
from .common import Entry, llm_common, llm_family_keys, parse_llm, pick, rename

# The original InternVisionConfig class defaults are 6B-style: a key missing from vision_config means these.
_VISION_DEFAULTS = dict(
    hidden_size=3200, intermediate_size=12800, num_attention_heads=25, num_hidden_layers=48, patch_size=14,
    image_size=224, qkv_bias=False, qk_normalization=True, norm_type="rms_norm", layer_norm_eps=1e-6,
    initializer_factor=0.1, drop_path_rate=0.0,
)  # fmt: skip
# Mono-InternVL's vision side (`intern_vit_patch`): only the embeddings exist; the encoder fields are moot
_PATCH_DEFAULTS = {**_VISION_DEFAULTS, "num_attention_heads": 1, "num_hidden_layers": 1, "embeddings_only": True}


# ---- config.json ---------------------------------------------------------------------------------


def from_original_dict(d: dict[str, Any], source: str) -> ModelConfig:
    if "vision_config" not in d or "llm_config" not in d:
        raise ConfigError(f"{source}: an internvl_chat config needs both 'vision_config' and 'llm_config'")
    vision_defaults = _VISION_DEFAULTS
    if isinstance(d["vision_config"], dict) and d["vision_config"].get("model_type") == "intern_vit_patch":
        vision_defaults = _PATCH_DEFAULTS
    vision = pick(d["vision_config"], VisionConfig, vision_defaults, {}, source)
    llm_d = d["llm_config"]
    scaling = llm_d.get("rope_scaling") if isinstance(llm_d, dict) else None
    if isinstance(scaling, dict) and scaling.get("type") == "v2pe":  # V2PE's own RoPE: plain (model/v2pe.py)
        llm_d = {**llm_d, "rope_scaling": None}
    llm = parse_llm(llm_d, source)
    llm.visual_experts = (d["llm_config"].get("architectures") or [None])[0] == "InternLM2VEForCausalLM"
    projector = ProjectorConfig(downsample_ratio=d.get("downsample_ratio", 0.5), ps_version=d.get("ps_version", "v1"))
    processor = ProcessorConfig(
        template=d.get("template") or "internvl2_5", system_message=d.get("system_message"),
        dynamic_image_size=d.get("dynamic_image_size", False), use_thumbnail=d.get("use_thumbnail", False),
        min_dynamic_patch=d.get("min_dynamic_patch", 1), max_dynamic_patch=d.get("max_dynamic_patch", 6),
        pad2square=d.get("pad2square", False),
    )  # fmt: skip
    return ModelConfig(vision=vision, llm=llm, projector=projector, processor=processor,
                       force_image_size=d.get("force_image_size"), select_layer=d.get("select_layer", -1),
                       rope_pos_id_version=d.get("rope_pos_id_version") or "default",
                       rope_pos_id_stride=d.get("rope_pos_id_stride"), flash_mode=bool(d.get("flash_mode")),
                       flash_relative_threshold=float(d.get("flash_relative_threshold") or 0.0),
                       flash_absolute_threshold=float(d.get("flash_absolute_threshold") or 0.0))  # fmt: skip


def to_original_dict(config: ModelConfig) -> dict[str, Any]:
    v, m, p = config.vision, config.llm, config.processor
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_attention_heads": v.num_attention_heads,
        "num_hidden_layers": v.num_hidden_layers,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_channels": v.num_channels,
        "qkv_bias": v.qkv_bias,
        "qk_normalization": v.qk_normalization,
        "norm_type": v.norm_type,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "gelu",
        "initializer_factor": v.initializer_factor,
        "drop_path_rate": v.drop_path_rate,
        "use_flash_attn": False,
    }
    if v.embeddings_only:
        vision = {"architectures": ["InternVisionPatchModel"], "model_type": "intern_vit_patch",
                  **{k: vision[k] for k in ("hidden_size", "patch_size", "image_size", "num_channels")}}
    llm: dict[str, Any] = {"architectures": [m.architecture], "model_type": m.family}
    llm.update(llm_common(m))
    llm.update(llm_family_keys(m))
    if m.family == "internlm2":
        llm["bias"] = m.qkv_bias
    elif m.family == "llama":
        llm["attention_bias"] = m.qkv_bias
    out = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": llm,
        "template": p.template,
        "downsample_ratio": config.projector.downsample_ratio,
        "ps_version": config.projector.ps_version,
        "force_image_size": config.force_image_size,
        "select_layer": config.select_layer,
        "dynamic_image_size": p.dynamic_image_size,
        "use_thumbnail": p.use_thumbnail,
        "min_dynamic_patch": p.min_dynamic_patch,
        "max_dynamic_patch": p.max_dynamic_patch,
        "pad2square": p.pad2square,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "hidden_size": m.hidden_size,
    }
    if p.system_message is not None:
        out["system_message"] = p.system_message
    if config.rope_pos_id_version != "default":
        out.update(rope_pos_id_version=config.rope_pos_id_version, rope_pos_id_stride=config.rope_pos_id_stride)
    if config.flash_mode:  # InternVL3.5-Flash (model/vir.py)
        out.update(flash_mode=True, flash_relative_threshold=config.flash_relative_threshold,
                   flash_absolute_threshold=config.flash_absolute_threshold)
    return out


# ---- tensors: InternLM2's names and fused wqkv ---------------------------------------------------


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
    (r"\.mlp_ve\.gate_proj\.", ".feed_forward_ve.w1."),  # Mono-InternVL's visual experts
    (r"\.mlp_ve\.up_proj\.", ".feed_forward_ve.w3."),
    (r"\.mlp_ve\.down_proj\.", ".feed_forward_ve.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"^language_model\.lm_head\.", "language_model.output."),
]
_QKV = re.compile(r"^(language_model\.model\.layers\.\d+\.self_attn\.)q_proj\.(weight|bias)$")


def original_entries(internal_keys: list[str], config: ModelConfig) -> list[Entry]:
    """Entries covering every internal key: names as they are, except InternLM2's."""
    llm = config.llm
    if llm.family == "phi3":
        return phi3_entries(internal_keys, llm, lambda key: key)
    if llm.family != "internlm2":
        return [Entry([key], [key]) for key in internal_keys]
    entries: list[Entry] = []
    done: set[str] = set()
    for key in internal_keys:
        if key in done:
            continue
        m = _QKV.match(key)
        if m:
            prefix, kind = m.groups()
            group = [f"{prefix}{p}_proj.{kind}" for p in "qkv"]
            ext = rename(prefix, _INTERNLM2_RENAMES).replace(".self_attn.", ".attention.") + f"wqkv.{kind}"
            entries.append(Entry(group, [ext], lambda ts: list(split_wqkv(ts[0], llm)),
                                 lambda ts: [merge_wqkv(*ts, llm)]))  # fmt: skip
            done.update(group)
            continue
        entries.append(Entry([key], [rename(key, _INTERNLM2_RENAMES)]))
        done.add(key)
    return entries


_PHI3_FUSED = re.compile(r"^(.*\.layers\.\d+\.)(self_attn\.q_proj|mlp\.gate_proj)\.weight$")


def phi3_entries(internal_keys: list[str], llm: LLMConfig, name) -> list[Entry]:
    """Phi-3's fused `self_attn.qkv_proj` (q | k | v rows) and `mlp.gate_up_proj` (gate | up rows), the other
    keys one to one; `name` gives a key's external name (the layouts differ only in the prefix)."""
    d, i = llm.head_dim, llm.intermediate_size
    qkv = [llm.num_attention_heads * d, llm.num_key_value_heads * d, llm.num_key_value_heads * d]
    entries: list[Entry] = []
    done: set[str] = set()
    for key in internal_keys:
        if key in done:
            continue
        m = _PHI3_FUSED.match(key)
        if not m:
            entries.append(Entry([key], [name(key)]))
            continue
        prefix, which = m.groups()
        if which == "self_attn.q_proj":
            group, fused, sizes = [f"{prefix}self_attn.{p}_proj.weight" for p in "qkv"], "self_attn.qkv_proj", qkv
        else:
            group, fused, sizes = [f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight"], "mlp.gate_up_proj", [i, i]
        entries.append(Entry(group, [name(f"{prefix}{fused}.weight")],
                             lambda ts, s=sizes: [t.contiguous() for t in ts[0].split(s)],
                             lambda ts: [torch.cat(ts).contiguous()]))  # fmt: skip
        done.update(group)
    return entries
