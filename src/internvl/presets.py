"""Model shapes by name: the released InternVL 2.5 / 3 / 3.5 sizes, a small MoE and `tiny` for tests
(`preset("internvl3-1b")`)."""

from __future__ import annotations

from typing import Any

from .config import LLMConfig, ModelConfig, VisionConfig
from .errors import ConfigError

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
# InternVL3.5: Qwen3 decoders (q/k norm, no qkv bias, head_dim 128), vocabulary 151936
_QWEN3 = dict(family="qwen3", vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960, qkv_bias=False,
              o_bias=False, head_dim=128, bos_token_id=151643, eos_token_id=151645)  # fmt: skip
QWEN3_06B = dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8)  # fmt: skip
QWEN3_30B_A3B = dict(_QWEN3, family="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                     moe_intermediate_size=768, norm_topk_prob=True)  # fmt: skip
# a small Qwen3-MoE decoder for CPU benchmarks (not a released model): 0.6B-like attention, 32 experts, top 4
QWEN3_MOE_SMALL = dict(_QWEN3, family="qwen3_moe", hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=16, num_key_value_heads=8, num_experts=32, num_experts_per_tok=4,
                       moe_intermediate_size=384, norm_topk_prob=True)  # fmt: skip

PRESETS: dict[str, tuple[dict, dict]] = {
    "internvl2_5-1b": (VIT_300M, QWEN25_05B),
    "internvl2_5-2b": (VIT_300M, INTERNLM25_18B),
    "internvl2_5-8b": (VIT_300M, INTERNLM25_7B),
    "internvl3-1b": (VIT_300M, dict(QWEN25_05B, **_DYN)),
    "internvl3-2b": (VIT_300M, dict(QWEN25_15B, **_DYN)),
    "internvl3-8b": (VIT_300M, dict(QWEN25_7B, **_DYN)),
    "internvl3.5-1b": (VIT_300M, QWEN3_06B),
    "internvl3.5-30b-a3b": (VIT_300M, QWEN3_30B_A3B),
    "internvl3.5-moe-small": (VIT_300M, QWEN3_MOE_SMALL),
    # tiny shapes for tests: a 56-px tile gives a 4x4 patch grid and 4 tokens per tile
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=56,
             qkv_bias=True, qk_normalization=False, norm_type="layer_norm"),
        dict(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=4096),
    ),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` for a released shape (`internvl3-1b`, ...) or `tiny`; overrides as `ModelConfig.replace`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    vd, ld = PRESETS[name]
    vision = VisionConfig(**vd)
    cfg = ModelConfig(vision=vision, llm=LLMConfig(**ld), force_image_size=vision.image_size)
    return cfg.replace(**overrides) if overrides else cfg
