"""Model configuration as small nested dataclasses: vision, language model, projector, processor, model.

The chat templates live here too (`TEMPLATES`), as data the processor config names. The two `config.json`
layouts are read and written by `checkpoint/original.py` and `checkpoint/hf.py`; presets are in `presets.py`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .config_checks import check_rates, check_rope_kind, check_rope_scaling, check_sizes
from .errors import ConfigError

LLM_FAMILIES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
    "Phi3ForCausalLM": "phi3",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}
FAMILY_ARCH = {v: k for k, v in LLM_FAMILIES.items()}
# Mono-InternVL's decoder: InternLM2 with visual-expert feed-forwards (`LLMConfig.visual_experts`, model/mono.py)
LLM_FAMILIES["InternLM2VEForCausalLM"] = "internlm2"
V2PE_VERSIONS = ("default", "v2pe_fix", "v2pe_rnd")  # rope_pos_id_version (model/v2pe.py)
# rope_scaling types -> the Rotary's kinds; "su" is LongRoPE's older name (Phi-3 checkpoints)
ROPE_KINDS = {"default": "default", "linear": "linear", "dynamic": "dynamic", "longrope": "longrope", "su": "longrope",
              "yarn": "yarn"}


def rope_kind(scaling: dict | None) -> str:
    s = scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    return ROPE_KINDS.get(kind, kind) if isinstance(kind, str) else repr(kind)

# ---- chat templates ------------------------------------------------------------------------------

# Default system messages, copied from the reference conversation.py (the InternVL 2.5 / 3 one and the older one).
SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYSTEM_GPT_OSS = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class Template:
    """One chat format. `roles` are the (user, assistant) prefixes, `sep` ends every block; `last_sep`, where
    set, ends a final assistant message instead and is the one stop string (GPT-OSS's `<|return|>`)."""

    name: str
    system_template: str  # contains one "{}" for the system message
    roles: tuple[str, str]
    sep: str
    system_message: str  # the default, used when the caller gives none
    stop_str: str | None = None
    last_sep: str | None = None


_IM_SYSTEM = "<|im_start|>system\n{}"
_IM_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

# The one table of chat templates; processing/template.py renders them.
TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("internvl2_5", _IM_SYSTEM, _IM_ROLES, "<|im_end|>\n", SYSTEM_INTERNVL2_5),
        Template("internlm2-chat", _IM_SYSTEM, _IM_ROLES, "<|im_end|>", SYSTEM_INTERNVL2),
        # Hermes-2 renders as internlm2-chat; it differs only in training (no <s>) and its extra stop string.
        Template("Hermes-2", _IM_SYSTEM, _IM_ROLES, "<|im_end|>", SYSTEM_INTERNVL2, stop_str="<|endoftext|>"),
        Template(
            "phi3-chat", "<|system|>\n{}", ("<|user|>\n", "<|assistant|>\n"), "<|end|>", SYSTEM_INTERNVL2
        ),
        # InternVL3.5-GPT-OSS (harmony format): the reply opens with <|channel|>final<|message|> itself
        Template(
            "internvl3_5_gpt_oss", "<|start|>system<|message|>{}", ("<|start|>user<|message|>", "<|start|>assistant"),
            "<|end|>", SYSTEM_GPT_OSS, last_sep="<|return|>",
        ),
    )
}

# ---- model ---------------------------------------------------------------------------------------


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
    embeddings_only: bool = False  # Mono-InternVL's `intern_vit_patch`: patch embedding, no encoder layers

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
    """A decoder-only language model: Qwen2, Llama, InternLM2, Qwen3 or Qwen3-MoE (one implementation; Qwen3
    adds per-head q/k RMSNorm, Qwen3-MoE sparse layers chosen by `mlp_only_layers` and `decoder_sparse_step`)."""

    family: str = "qwen2"  # "qwen2" | "llama" | "internlm2" | "qwen3" | "qwen3_moe"
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
    visual_experts: bool = False  # Mono-InternVL (InternLM2 only): image tokens through `feed_forward_ve`
    # Qwen3-MoE only (ignored by the other families)
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    # GPT-OSS only: every layer is a MoE of `num_experts` clamped-SwiGLU experts of `intermediate_size`
    sliding_window: int | None = None  # keys a "sliding_attention" layer sees (the query's own included)
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

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
        check_rope_kind(self.rope_scaling, rope_kind(self.rope_scaling), self.head_dim)
        if self.family == "gpt_oss":
            self._check_gpt_oss()
        if self.family == "qwen3_moe":
            check_sizes(self, "llm_config", ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                             "decoder_sparse_step"))  # fmt: skip
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"llm_config: num_experts_per_tok {self.num_experts_per_tok} is above "
                                  f"num_experts {self.num_experts}")  # fmt: skip
            if not isinstance(self.mlp_only_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers
            ):
                raise ConfigError(f"llm_config.mlp_only_layers: expected a list of layer indices, "
                                  f"got {self.mlp_only_layers!r}")  # fmt: skip

    def _check_gpt_oss(self) -> None:
        check_sizes(self, "llm_config", ("num_experts", "num_experts_per_tok")
                    + (("sliding_window",) if self.sliding_window is not None else ()))  # fmt: skip
        check_rates(self, "llm_config", ("swiglu_alpha", "swiglu_limit"))
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"llm_config: num_experts_per_tok {self.num_experts_per_tok} is above "
                              f"num_experts {self.num_experts}")  # fmt: skip
        if self.layer_types is None:  # transformers' default: sliding first, then alternating
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]  # fmt: skip
        kinds = ("sliding_attention", "full_attention")
        if (not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.num_hidden_layers
                or any(k not in kinds for k in self.layer_types)):  # fmt: skip
            raise ConfigError(f"llm_config.layer_types: expected {self.num_hidden_layers} entries of {kinds}, "
                              f"got {self.layer_types!r}")  # fmt: skip
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ConfigError("llm_config: sliding_attention layers need a sliding_window")

    @property
    def architecture(self) -> str:
        return "InternLM2VEForCausalLM" if self.visual_experts else FAMILY_ARCH[self.family]

    @property
    def context_length(self) -> int:
        """The engine's default limit: max_position_embeddings, or `factor` times it with dynamic-NTK scaling,
        whose base keeps growing past max_position_embeddings (as transformers and the official code do)."""
        if rope_kind(self.rope_scaling) == "dynamic":
            return int(self.max_position_embeddings * float(self.rope_scaling.get("factor") or 1.0))
        return self.max_position_embeddings

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of queries and keys before RoPE (Qwen3)."""
        return self.family in ("qwen3", "qwen3_moe")

    def sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` is a mixture of experts (the Qwen3-MoE rule)."""
        return (self.family == "qwen3_moe" and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)  # fmt: skip


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
class ProcessorConfig:
    """What the processors read: the chat template, and how an image becomes tiles (not the model's shapes)."""

    template: str = "internvl2_5"
    system_message: str | None = None  # None: the template's default system message
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    pad2square: bool = False  # a single (non-dynamic) tile is padded to a square with the mean color

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"template: expected one of {list(TEMPLATES)}, got {self.template!r}")
        check_sizes(self, "config", ("min_dynamic_patch", "max_dynamic_patch"))
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ConfigError(f"config: min_dynamic_patch {self.min_dynamic_patch} is above max_dynamic_patch "
                              f"{self.max_dynamic_patch}")  # fmt: skip


PROCESSOR_FIELDS = frozenset(f.name for f in fields(ProcessorConfig))


@dataclass
class ModelConfig:
    """The whole multimodal model; `processor` holds the template and tiling fields the processors read."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    force_image_size: int | None = 448  # the tile side; overrides vision.image_size (the ViT is built for it)
    select_layer: int = -1
    # V2PE: image tokens advance the RoPE position by rope_pos_id_stride / num_image_token (model/v2pe.py)
    rope_pos_id_version: str = "default"
    rope_pos_id_stride: int | None = None
    # InternVL3.5-Flash: a router picks 256 or 64 tokens per tile (model/vir.py)
    flash_mode: bool = False
    flash_relative_threshold: float = 0.0
    flash_absolute_threshold: float = 0.0

    def __post_init__(self) -> None:
        self.processor.__post_init__()
        check_sizes(self, "config", ("force_image_size",))
        if self.rope_pos_id_version not in V2PE_VERSIONS:
            raise ConfigError(f"rope_pos_id_version: expected one of {list(V2PE_VERSIONS)}, "
                              f"got {self.rope_pos_id_version!r}")  # fmt: skip
        stride = self.rope_pos_id_stride
        if self.rope_pos_id_version != "default" and (isinstance(stride, bool) or not isinstance(stride, int)
                                                      or stride < 1):
            raise ConfigError(f"rope_pos_id_stride: V2PE needs a positive integer stride, got {stride!r}")
        if not 0.0 <= self.flash_relative_threshold <= 1.0:  # a quantile (InternVL3.5-Flash, model/vir.py)
            raise ConfigError(f"flash_relative_threshold: expected a quantile from 0 to 1, "
                              f"got {self.flash_relative_threshold!r}")  # fmt: skip
        if self.llm.visual_experts and self.llm.family != "internlm2":
            raise ConfigError("llm_config: visual experts (Mono-InternVL) need an InternLM2 decoder")
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def replace(self, **changes: Any) -> ModelConfig:
        """A checked copy with `changes`; a processor field (`max_dynamic_patch`, `template`...) sets `processor`."""
        new = copy.deepcopy(self)
        for k, val in changes.items():
            setattr(new.processor if k in PROCESSOR_FIELDS else new, k, val)
        new.__post_init__()
        return new
