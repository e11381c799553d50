"""Model configuration as small nested dataclasses, read from and written to both official layouts.

Two `config.json` layouts exist: the original remote-code one (`model_type: internvl_chat`, with
`vision_config` and `llm_config`) and the transformers one (`model_type: internvl`, with
`vision_config` and `text_config`). Both are parsed into the same `ModelConfig`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config_checks import check_rates, check_rope_scaling, check_section, check_sizes
from .errors import ConfigError

LLM_FAMILIES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
}
FAMILY_ARCH = {v: k for k, v in LLM_FAMILIES.items()}
TEMPLATES = ("internvl2_5", "internlm2-chat", "Hermes-2", "phi3-chat")


@dataclass
class VisionConfig:
    """InternViT. Defaults are the 300M style; `from_original` applies the 6B-style class defaults."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "layer_norm"  # "layer_norm" | "rms_norm"
    layer_norm_eps: float = 1e-6
    initializer_factor: float = 0.1  # initial value of the layer-scale vectors ls1/ls2
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        check_sizes(self, "vision_config", ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_hidden_layers", "patch_size", "image_size", "num_channels"))
        check_rates(self, "vision_config", ("layer_norm_eps", "initializer_factor", "drop_path_rate"))
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"vision_config.norm_type: expected 'layer_norm' or 'rms_norm', got {self.norm_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LLMConfig:
    """A decoder-only language model: Qwen2, Llama or InternLM2 (all share one implementation)."""

    family: str = "qwen2"  # "qwen2" | "llama" | "internlm2"
    vocab_size: int = 151674
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    qkv_bias: bool = True
    o_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILY_ARCH:
            raise ConfigError(f"llm family: expected one of {sorted(FAMILY_ARCH)}, got {self.family!r}")
        check_sizes(self, "llm_config", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "max_position_embeddings"))  # fmt: skip
        check_rates(self, "llm_config", ("rms_norm_eps", "rope_theta"))
        check_rope_scaling(self.rope_scaling)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 1:
                raise ConfigError(f"llm_config: hidden_size {self.hidden_size} is smaller than num_attention_heads "
                                  f"{self.num_attention_heads}")  # fmt: skip
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"llm_config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.family != "qwen2" and self.o_bias != self.qkv_bias:
            raise ConfigError(
                f"llm_config: {self.architecture} has one bias flag for q, k, v and o "
                f"(got qkv_bias={self.qkv_bias}, o_bias={self.o_bias})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "dynamic"):
                raise ConfigError(f"llm_config.rope_scaling: unsupported type {kind!r} (supported: linear, dynamic)")

    @property
    def architecture(self) -> str:
        return FAMILY_ARCH[self.family]


@dataclass
class ProjectorConfig:
    """Pixel shuffle then mlp1 = LayerNorm(4C, eps 1e-5), Linear, GELU, Linear."""

    downsample_ratio: float = 0.5
    ps_version: str = "v2"  # "v1" (legacy transposed grid) | "v2"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_rates(self, "config", ("downsample_ratio", "layer_norm_eps"))
        if self.ps_version not in ("v1", "v2"):
            raise ConfigError(f"ps_version: expected 'v1' or 'v2', got {self.ps_version!r}")


@dataclass
class ModelConfig:
    """The whole multimodal model plus the tiling and template fields the processors read."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    template: str = "internvl2_5"
    system_message: str | None = None  # None: the template's default system message
    force_image_size: int | None = 448
    select_layer: int = -1
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    pad2square: bool = False

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"template: expected one of {list(TEMPLATES)}, got {self.template!r}")
        check_sizes(self, "config", ("force_image_size", "min_dynamic_patch", "max_dynamic_patch"))
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ConfigError(f"config: min_dynamic_patch {self.min_dynamic_patch} is above max_dynamic_patch "
                              f"{self.max_dynamic_patch}")  # fmt: skip
        layers = self.vision.num_hidden_layers
        if isinstance(self.select_layer, bool) or not isinstance(self.select_layer, int) or not (
            -layers <= self.select_layer < layers
        ):
            raise ConfigError(f"config.select_layer: expected an integer from {-layers} to {layers - 1} (the vision "
                              f"encoder has {layers} layers), got {self.select_layer!r}")  # fmt: skip
        grid = self.image_size // self.vision.patch_size
        if self.image_size % self.vision.patch_size or (grid * self.projector.downsample_ratio) % 1:
            raise ConfigError(
                f"image size {self.image_size} with patch {self.vision.patch_size} and downsample ratio "
                f"{self.projector.downsample_ratio} does not give a whole token grid"
            )

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile after pixel shuffle: 256 for a 448 tile, patch 14, ratio 0.5."""
        grid = self.image_size // self.vision.patch_size
        return int((grid * self.projector.downsample_ratio) ** 2)

    # ---- reading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = check_section(d, "the config", source).get("model_type")
        if mt == "internvl_chat" or "llm_config" in d:
            return _from_original(d, source)
        if mt == "internvl" or "text_config" in d:
            return _from_hf(d, source)
        raise ConfigError(
            f"{source}: unknown model_type {mt!r}; expected 'internvl_chat' (original layout) or 'internvl' (-hf)"
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no such file (a model folder needs a config.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        except (UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not a readable JSON config ({e})") from None
        cfg = cls.from_dict(d, str(path))
        pre = path.parent / "preprocessor_config.json"
        if d.get("model_type") == "internvl" and pre.exists():
            try:
                _apply_hf_preprocessor(cfg, check_section(json.loads(pre.read_text()), "the config", str(pre)))
            except (ValueError, TypeError, RecursionError) as e:
                raise ConfigError(f"{pre}: not a usable preprocessor config ({e})") from None
            cfg.__post_init__()
        return cfg

    # ---- writing -------------------------------------------------------------------------------

    def to_original_dict(self) -> dict[str, Any]:
        v, m = self.vision, self.llm
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
        llm: dict[str, Any] = {"architectures": [m.architecture], "model_type": m.family}
        llm.update(_llm_common(m))
        if m.family == "internlm2":
            llm["bias"] = m.qkv_bias
        elif m.family == "llama":
            llm["attention_bias"] = m.qkv_bias
        out = {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "vision_config": vision,
            "llm_config": llm,
            "template": self.template,
            "downsample_ratio": self.projector.downsample_ratio,
            "ps_version": self.projector.ps_version,
            "force_image_size": self.force_image_size,
            "select_layer": self.select_layer,
            "dynamic_image_size": self.dynamic_image_size,
            "use_thumbnail": self.use_thumbnail,
            "min_dynamic_patch": self.min_dynamic_patch,
            "max_dynamic_patch": self.max_dynamic_patch,
            "pad2square": self.pad2square,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "tie_word_embeddings": False,
            "hidden_size": m.hidden_size,
        }
        if self.system_message is not None:
            out["system_message"] = self.system_message
        return out

    def to_hf_dict(self, image_token_id: int) -> dict[str, Any]:
        v, m = self.vision, self.llm
        if self.projector.ps_version != "v2":
            raise ConfigError("the transformers layout supports only ps_version 'v2'")
        text: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if m.family == "internlm2" else m.architecture],
            "model_type": "llama" if m.family == "internlm2" else m.family,
        }
        text.update(_llm_common(m))
        if m.family != "qwen2":
            text["attention_bias"] = m.qkv_bias
        if m.head_dim != m.hidden_size // m.num_attention_heads:
            text["head_dim"] = m.head_dim
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            # fields the -hf layout has no place for, kept so that original -> hf -> original is lossless
            "internvl_chat": {
                "template": self.template,
                "system_message": self.system_message,
                "dynamic_image_size": self.dynamic_image_size,
                "use_thumbnail": self.use_thumbnail,
                "min_dynamic_patch": self.min_dynamic_patch,
                "max_dynamic_patch": self.max_dynamic_patch,
                "pad2square": self.pad2square,
                "llm_architecture": m.architecture,
            },
            "downsample_ratio": self.projector.downsample_ratio,
            "image_seq_length": self.num_image_token,
            "image_token_id": image_token_id,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": self.select_layer,
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
                "image_size": [self.image_size, self.image_size],
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

    def hf_preprocessor_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "GotOcr2ImageProcessor",
            "crop_to_patches": self.dynamic_image_size,
            "min_patches": self.min_dynamic_patch,
            "max_patches": self.max_dynamic_patch,
            "size": {"height": self.image_size, "width": self.image_size},
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def replace(self, **changes: Any) -> "ModelConfig":
        new = copy.deepcopy(self)
        for k, val in changes.items():
            setattr(new, k, val)
        new.__post_init__()
        return new


def _llm_common(m: LLMConfig) -> dict[str, Any]:
    d = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": m.rope_scaling,
        "max_position_embeddings": m.max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": m.bos_token_id,
        "eos_token_id": m.eos_token_id,
        "pad_token_id": m.pad_token_id,
    }
    return d


def _pick(d: dict[str, Any], cls: type, defaults: dict[str, Any], renames: dict[str, str], source: str) -> Any:
    """Build a dataclass from dict `d`: renamed keys first, then same-named keys, then `defaults`."""
    kwargs = dict(defaults)
    names = {f.name for f in fields(cls)}
    for key, value in check_section(d, cls.__name__, source).items():
        name = renames.get(key, key)
        if name in names:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def _scalar(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


# The original InternVisionConfig class defaults are 6B-style: a key missing from vision_config means these.
_ORIGINAL_VISION_DEFAULTS = dict(
    hidden_size=3200, intermediate_size=12800, num_attention_heads=25, num_hidden_layers=48, patch_size=14,
    image_size=224, qkv_bias=False, qk_normalization=True, norm_type="rms_norm", layer_norm_eps=1e-6,
    initializer_factor=0.1, drop_path_rate=0.0,
)  # fmt: skip


# transformers' InternVLVisionConfig class defaults (note: attention_bias defaults to False there)
_HF_VISION_DEFAULTS = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
    image_size=448, qkv_bias=False, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
    initializer_factor=0.1, drop_path_rate=0.0,
)  # fmt: skip


def _parse_llm(d: dict[str, Any], source: str) -> LLMConfig:
    archs = check_section(d, "the language model config", source).get("architectures") or []
    family = None
    if archs:
        family = LLM_FAMILIES.get(archs[0])
        if family is None:
            raise ConfigError(
                f"{source}: unknown language model architecture {archs[0]!r}; "
                f"supported: {sorted(LLM_FAMILIES)}"
            )
    else:
        family = {"qwen2": "qwen2", "llama": "llama", "internlm2": "internlm2"}.get(d.get("model_type", ""))
        if family is None:
            raise ConfigError(f"{source}: language model config has no architectures and model_type "
                              f"{d.get('model_type')!r} is not qwen2, llama or internlm2")
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    elif family == "internlm2":
        qkv_bias = o_bias = bool(d.get("bias", True))
    else:
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in d:
            raise ConfigError(f"{source}: language model config lacks the required key {key!r}")
    return _pick(
        {**d, "eos_token_id": eos},
        LLMConfig,
        dict(family=family, qkv_bias=qkv_bias, o_bias=o_bias,
             num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
             rope_theta=d.get("rope_theta", 10000.0), max_position_embeddings=d.get("max_position_embeddings", 2048),
             rms_norm_eps=d.get("rms_norm_eps", 1e-6)),
        {"architectures": "_", "model_type": "_", "bias": "_", "attention_bias": "_"},
        source,
    )


def _from_original(d: dict[str, Any], source: str) -> ModelConfig:
    if "vision_config" not in d or "llm_config" not in d:
        raise ConfigError(f"{source}: an internvl_chat config needs both 'vision_config' and 'llm_config'")
    vd = d["vision_config"]
    vision = _pick(vd, VisionConfig, _ORIGINAL_VISION_DEFAULTS, {}, source)
    llm = _parse_llm(d["llm_config"], source)
    projector = ProjectorConfig(downsample_ratio=d.get("downsample_ratio", 0.5), ps_version=d.get("ps_version", "v1"))
    template = d.get("template") or "internvl2_5"
    return ModelConfig(
        vision=vision, llm=llm, projector=projector, template=template,
        system_message=d.get("system_message"),
        force_image_size=d.get("force_image_size"), select_layer=d.get("select_layer", -1),
        dynamic_image_size=d.get("dynamic_image_size", False), use_thumbnail=d.get("use_thumbnail", False),
        min_dynamic_patch=d.get("min_dynamic_patch", 1), max_dynamic_patch=d.get("max_dynamic_patch", 6),
        pad2square=d.get("pad2square", False),
    )  # fmt: skip


def _from_hf(d: dict[str, Any], source: str) -> ModelConfig:
    vd = {k: _scalar(v) for k, v in (d.get("vision_config") or {}).items()}
    vision = _pick(
        vd, VisionConfig, _HF_VISION_DEFAULTS,
        {"attention_bias": "qkv_bias", "use_qk_norm": "qk_normalization", "layer_scale_init_value": "initializer_factor",
         "initializer_factor": "_"},
        source,
    )  # fmt: skip
    td = d.get("text_config")
    if not td:
        raise ConfigError(f"{source}: an internvl (-hf) config needs a 'text_config'")
    llm = _parse_llm(td, source)
    extra = d.get("internvl_chat") or {}
    if extra.get("llm_architecture") == "InternLM2ForCausalLM" and llm.family == "llama":
        llm.family = "internlm2"  # stored as Llama in -hf; the original layout fuses wqkv again
    projector = ProjectorConfig(downsample_ratio=d.get("downsample_ratio", 0.5), ps_version="v2")
    # The transformers chat template has no default system prompt: an empty system message omits it.
    return ModelConfig(
        vision=vision, llm=llm, projector=projector, template=extra.get("template", "internvl2_5"),
        system_message=extra.get("system_message", ""), force_image_size=vision.image_size,
        select_layer=d.get("vision_feature_layer", -1),
        dynamic_image_size=extra.get("dynamic_image_size", True), use_thumbnail=extra.get("use_thumbnail", True),
        min_dynamic_patch=extra.get("min_dynamic_patch", 1), max_dynamic_patch=extra.get("max_dynamic_patch", 12),
        pad2square=extra.get("pad2square", False),
    )  # fmt: skip


def _apply_hf_preprocessor(cfg: ModelConfig, pre: dict[str, Any]) -> None:
    cfg.dynamic_image_size = bool(pre.get("crop_to_patches", cfg.dynamic_image_size))
    cfg.min_dynamic_patch = int(pre.get("min_patches", cfg.min_dynamic_patch))
    cfg.max_dynamic_patch = int(pre.get("max_patches", cfg.max_dynamic_patch))


# ---- presets -------------------------------------------------------------------------------------

VIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                qkv_bias=True, qk_normalization=False, norm_type="layer_norm")  # fmt: skip
VIT_6B = dict(hidden_size=3200, intermediate_size=12800, num_attention_heads=25, num_hidden_layers=45,
              qkv_bias=False, qk_normalization=True, norm_type="rms_norm")  # fmt: skip

_QWEN = dict(family="qwen2", vocab_size=151674, rope_theta=1e6, max_position_embeddings=32768,
             bos_token_id=151643, eos_token_id=151645)  # fmt: skip
_INTERNLM = dict(family="internlm2", vocab_size=92553, rope_theta=1e6, max_position_embeddings=32768,
                 qkv_bias=False, rope_scaling={"type": "dynamic", "factor": 2.0}, bos_token_id=1, eos_token_id=2)  # fmt: skip

QWEN25_05B = dict(_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2)  # fmt: skip
QWEN25_15B = dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2)  # fmt: skip
QWEN25_7B = dict(_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4)  # fmt: skip
INTERNLM25_18B = dict(_INTERNLM, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=8)  # fmt: skip
INTERNLM25_7B = dict(_INTERNLM, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
_DYN = {"rope_scaling": {"type": "dynamic", "factor": 2.0}}

PRESETS: dict[str, tuple[dict, dict]] = {
    "internvl2_5-1b": (VIT_300M, QWEN25_05B),
    "internvl2_5-2b": (VIT_300M, INTERNLM25_18B),
    "internvl2_5-8b": (VIT_300M, INTERNLM25_7B),
    "internvl3-1b": (VIT_300M, dict(QWEN25_05B, **_DYN)),
    "internvl3-2b": (VIT_300M, dict(QWEN25_15B, **_DYN)),
    "internvl3-8b": (VIT_300M, dict(QWEN25_7B, **_DYN)),
    # tiny shapes for tests: a 56-px tile gives a 4x4 patch grid and 4 tokens per tile
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=56,
             qkv_bias=True, qk_normalization=False, norm_type="layer_norm"),
        dict(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=4096),
    ),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` for a released shape (`internvl3-1b`, ...) or `tiny`; overrides apply at top level."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    vd, ld = PRESETS[name]
    vision = VisionConfig(**vd)
    cfg = ModelConfig(vision=vision, llm=LLMConfig(**ld), force_image_size=vision.image_size)
    return cfg.replace(**overrides) if overrides else cfg
