"""The transformers layout (`model_type: internvl`, the `-hf` checkpoints): its `config.json` and
`preprocessor_config.json` codec and its tensor key map (renames, the ViT `qkv` split into thirds).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import ModelConfig, ProcessorConfig, ProjectorConfig, VisionConfig
from ..errors import ConfigError
from .common import Entry, llm_common, llm_family_keys, parse_llm, pick, rename
from .original import phi3_entries

# transformers' InternVLVisionConfig class defaults (note: attention_bias defaults to False there)
_VISION_DEFAULTS = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
    image_size=448, qkv_bias=False, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
    initializer_factor=0.1, drop_path_rate=0.0,
)  # fmt: skip


def _scalar(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


# ---- config.json and preprocessor_config.json ----------------------------------------------------


def from_hf_dict(d: dict[str, Any], source: str) -> ModelConfig:
    vd = {k: _scalar(v) for k, v in (d.get("vision_config") or {}).items()}
    vision = pick(
        vd, VisionConfig, _VISION_DEFAULTS,
        {"attention_bias": "qkv_bias", "use_qk_norm": "qk_normalization", "layer_scale_init_value": "initializer_factor",
         "initializer_factor": "_"},
        source,
    )  # fmt: skip
    td = d.get("text_config")
    if not td:
        raise ConfigError(f"{source}: an internvl (-hf) config needs a 'text_config'")
    llm = parse_llm(td, source)
    extra = d.get("internvl_chat") or {}
    if extra.get("llm_architecture") == "InternLM2ForCausalLM" and llm.family == "llama":
        llm.family = "internlm2"  # stored as Llama in -hf; the original layout fuses wqkv again
    projector = ProjectorConfig(downsample_ratio=d.get("downsample_ratio", 0.5), ps_version="v2")
    # The transformers chat template has no default system prompt: an empty system message omits it.
    template = "internvl3_5_gpt_oss" if llm.family == "gpt_oss" else "internvl2_5"  # InternVL3.5's choices
    template = "phi3-chat" if llm.family == "phi3" else template  # Mini-InternVL
    processor = ProcessorConfig(
        template=extra.get("template", template), system_message=extra.get("system_message", ""),
        dynamic_image_size=extra.get("dynamic_image_size", True), use_thumbnail=extra.get("use_thumbnail", True),
        min_dynamic_patch=extra.get("min_dynamic_patch", 1), max_dynamic_patch=extra.get("max_dynamic_patch", 12),
        pad2square=extra.get("pad2square", False),
    )  # fmt: skip
    return ModelConfig(vision=vision, llm=llm, projector=projector, processor=processor,
                       force_image_size=vision.image_size, select_layer=d.get("vision_feature_layer", -1))  # fmt: skip


def apply_hf_preprocessor(config: ModelConfig, pre: dict[str, Any]) -> None:
    """Tiling fields from `preprocessor_config.json`, which win over the ones kept in config.json (unchecked)."""
    p = config.processor
    p.dynamic_image_size = bool(pre.get("crop_to_patches", p.dynamic_image_size))
    p.min_dynamic_patch = int(pre.get("min_patches", p.min_dynamic_patch))
    p.max_dynamic_patch = int(pre.get("max_patches", p.max_dynamic_patch))


def to_hf_dict(config: ModelConfig, image_token_id: int) -> dict[str, Any]:
    v, m, p = config.vision, config.llm, config.processor
    if config.projector.ps_version != "v2":
        raise ConfigError("the transformers layout supports only ps_version 'v2'")
    if m.visual_experts or v.embeddings_only:
        raise ConfigError("the transformers layout has no Mono-InternVL (visual experts, patch-only vision): "
                          "keep the original layout")  # fmt: skip
    if config.flash_mode:
        raise ConfigError("the transformers layout has no InternVL3.5-Flash (ViR: mlp2 and the router; transformers "
                          "has no internvl_flash model): keep the original layout")  # fmt: skip
    text: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if m.family == "internlm2" else m.architecture],
        "model_type": "llama" if m.family == "internlm2" else m.family,
    }
    text.update(llm_common(m))
    if m.family != "qwen2":
        text["attention_bias"] = m.qkv_bias
    if m.head_dim != m.hidden_size // m.num_attention_heads:
        text["head_dim"] = m.head_dim
    text.update(llm_family_keys(m))
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        # fields the -hf layout has no place for, kept so that original -> hf -> original is lossless
        "internvl_chat": {
            "template": p.template,
            "system_message": p.system_message,
            "dynamic_image_size": p.dynamic_image_size,
            "use_thumbnail": p.use_thumbnail,
            "min_dynamic_patch": p.min_dynamic_patch,
            "max_dynamic_patch": p.max_dynamic_patch,
            "pad2square": p.pad2square,
            "llm_architecture": m.architecture,
        },
        "downsample_ratio": config.projector.downsample_ratio,
        "image_seq_length": config.num_image_token,
        "image_token_id": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_attention_heads": v.num_attention_heads,
            "num_hidden_layers": v.num_hidden_layers,
            "patch_size": [v.patch_size, v.patch_size],
            "image_size": [config.image_size, config.image_size],
            "num_channels": v.num_channels,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_normalization,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "gelu",
            "layer_scale_init_value": v.initializer_factor,
            "drop_path_rate": v.drop_path_rate,
            "use_absolute_position_embeddings": True,
            "use_mean_pooling": True,
            "use_mask_token": False,
        },
    }


def hf_preprocessor_dict(config: ModelConfig) -> dict[str, Any]:
    p = config.processor
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": p.dynamic_image_size,
        "min_patches": p.min_dynamic_patch,
        "max_patches": p.max_dynamic_patch,
        "size": {"height": config.image_size, "width": config.image_size},
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }


# ---- tensors -------------------------------------------------------------------------------------

_VISION_RENAMES = [
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
_PROJECTOR = {"mlp1.0.": "model.multi_modal_projector.layer_norm.", "mlp1.1.": "model.multi_modal_projector.linear_1.",
              "mlp1.3.": "model.multi_modal_projector.linear_2."}  # fmt: skip
_LLM_RENAMES = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
_VIT_QKV = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.attn\.)qkv\.(weight|bias)$")


def _hf_name(key: str) -> str:
    if key.startswith("vision_model."):
        return rename(key, _VISION_RENAMES)
    for old, new in _PROJECTOR.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return rename(key, _LLM_RENAMES)


def hf_entries(internal_keys: list[str], config: ModelConfig) -> list[Entry]:
    """Entries covering every internal key; the ViT's fused qkv becomes q_proj, k_proj, v_proj."""
    entries: list[Entry] = []
    if config.llm.family == "phi3":  # the fused qkv_proj and gate_up_proj, as in the original layout
        lm = [key for key in internal_keys if key.startswith("language_model.")]
        entries += phi3_entries(lm, config.llm, _hf_name)
        internal_keys = [key for key in internal_keys if not key.startswith("language_model.")]
    for key in internal_keys:
        m = _VIT_QKV.match(key)
        if m:
            prefix, kind = m.groups()
            base = rename(prefix + "qkv", _VISION_RENAMES)[: -len("qkv")]
            ext = [f"{base}{p}_proj.{kind}" for p in "qkv"]
            entries.append(Entry([key], ext, lambda ts: [torch.cat(ts, 0)],
                                 lambda ts: [t.contiguous() for t in ts[0].chunk(3, 0)]))  # fmt: skip
        else:
            entries.append(Entry([key], [_hf_name(key)]))
    return entries
