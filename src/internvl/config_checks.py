"""Range checks for the config dataclasses: every size a bounded positive integer and every rate a finite
number in its interval, so that a corrupt or hostile config.json fails in one line before a model is built.

The upper bounds are far above any released model; past them building the modules alone would take hours
(a million layers) or the config is simply corrupt.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

SIZE_LIMITS = {
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "hidden_size": 65536,
    "intermediate_size": 1 << 20, "head_dim": 4096, "vocab_size": 1 << 23, "max_position_embeddings": 1 << 27,
    "image_size": 16384, "patch_size": 1024, "num_channels": 16, "force_image_size": 16384,
    "min_dynamic_patch": 1024, "max_dynamic_patch": 1024,
    "num_experts": 1 << 16, "num_experts_per_tok": 1024, "moe_intermediate_size": 1 << 20, "decoder_sparse_step": 1024,
    "sliding_window": 1 << 27,
}  # fmt: skip
# (low, high, low included): norms divide by a positive epsilon, a ratio of 0 has no tokens
RATE_LIMITS = {
    "layer_norm_eps": (0.0, 1.0, False), "rms_norm_eps": (0.0, 1.0, False), "rope_theta": (0.0, 1e12, False),
    "drop_path_rate": (0.0, 1.0, True), "downsample_ratio": (0.0, 1.0, False),
    "initializer_factor": (-1e6, 1e6, True), "swiglu_alpha": (0.0, 1e6, False), "swiglu_limit": (0.0, 1e6, False),
}  # fmt: skip


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def check_sizes(obj: Any, section: str, names: tuple[str, ...]) -> None:
    """Each of `names` an integer from 1 to its limit (None allowed where the field is optional)."""
    for name in names:
        value, limit = getattr(obj, name), SIZE_LIMITS[name]
        if value is None and name in ("head_dim", "force_image_size"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ConfigError(f"{section}.{name}: expected an integer from 1 to {limit}, got {_shown(value)}")


def check_rates(obj: Any, section: str, names: tuple[str, ...]) -> None:
    """Each of `names` a finite number inside its interval."""
    for name in names:
        value = getattr(obj, name)
        low, high, closed = RATE_LIMITS[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        inside = number and math.isfinite(value) and (low <= value if closed else low < value) and value <= high
        if not inside:
            interval = f"{'[' if closed else '('}{low:g}, {high:g}]"
            raise ConfigError(f"{section}.{name}: expected a number in {interval}, got {_shown(value)}")


def check_rope_scaling(scaling: Any) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"llm_config.rope_scaling: expected an object or null, got {_shown(scaling)}")
    factor = scaling.get("factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1e6:
        raise ConfigError(f"llm_config.rope_scaling.factor: expected a number in (0, 1e6], got {_shown(factor)}")


def check_rope_kind(scaling: Any, kind: str, head_dim: int) -> None:
    """A rope scaling type the model implements; LongRoPE with one short and one long factor per frequency."""
    if kind not in ("default", "linear", "dynamic", "longrope", "yarn"):
        raise ConfigError(f"llm_config.rope_scaling: unsupported type {kind} "
                          f"(supported: linear, dynamic, longrope/su, yarn)")  # fmt: skip
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            value = scaling.get(name)
            if not isinstance(value, list) or len(value) != head_dim // 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in value
            ):
                raise ConfigError(f"llm_config.rope_scaling.{name}: expected {head_dim // 2} positive numbers "
                                  f"(head_dim / 2), got {_shown(value)}")  # fmt: skip


def check_section(value: Any, section: str, source: str) -> dict:
    """A config section that must be a JSON object."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {section} must be a JSON object, got {type(value).__name__}")
    return value
