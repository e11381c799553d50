"""Pieces both checkpoint layouts share: a tensor-map `Entry`, renaming by rules, and the language-model
section of `config.json`, which the original and the transformers layouts write almost alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..config import LLM_FAMILIES, LLMConfig
from ..config_checks import check_section
from ..errors import ConfigError

Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


@dataclass
class Entry:
    """Internal tensors <-> external tensors, converted both ways exactly (no arithmetic)."""

    internal: list[str]
    external: list[str]
    to_internal: Convert = _same
    to_external: Convert = _same
    packed: bool = False  # external tensors are a packed encoding (MXFP4): their sizes differ from the values'


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def pick(d: dict[str, Any], cls: type, defaults: dict[str, Any], renames: dict[str, str], source: str) -> Any:
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


def llm_common(m: LLMConfig) -> dict[str, Any]:
    """The language-model keys both layouts write the same way."""
    return {
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


def llm_family_keys(m: LLMConfig) -> dict[str, Any]:
    """Keys only some families write: Qwen3's head_dim and attention_bias, Qwen3-MoE's and GPT-OSS's experts,
    GPT-OSS's attention windows."""
    out: dict[str, Any] = {}
    if m.family in ("qwen3", "qwen3_moe"):
        out.update(head_dim=m.head_dim, attention_bias=m.qkv_bias)
    if m.family == "gpt_oss":
        out.update(head_dim=m.head_dim, attention_bias=m.qkv_bias, num_local_experts=m.num_experts,
                   num_experts_per_tok=m.num_experts_per_tok, sliding_window=m.sliding_window,
                   layer_types=list(m.layer_types), swiglu_alpha=m.swiglu_alpha, swiglu_limit=m.swiglu_limit)  # fmt: skip
    if m.family == "qwen3_moe":
        out.update(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                   moe_intermediate_size=m.moe_intermediate_size, norm_topk_prob=m.norm_topk_prob,
                   mlp_only_layers=list(m.mlp_only_layers), decoder_sparse_step=m.decoder_sparse_step)  # fmt: skip
    return out


_GPT_OSS_KEYS = ("sliding_window", "layer_types", "swiglu_alpha", "swiglu_limit")


def _rope_parameters(d: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters` ({rope_theta, rope_type, ...}) instead of `rope_theta`."""
    rp = d.get("rope_parameters")
    return rp if isinstance(rp, dict) else {}


def _phi3(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3 keeps original_max_position_embeddings beside rope_scaling (LongRoPE, older name `su`). Not
    implemented, so refused: a partial rotary factor (Phi-3.5, Phi-4-mini), a window shorter than the context."""
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    rs = d.get("rope_scaling")
    if rs is None and rp.get("rope_type", "default") != "default":  # transformers 5 writes rope_parameters
        rs = {k: v for k, v in rp.items() if k != "rope_theta"}
    if isinstance(rs, dict) and d.get("original_max_position_embeddings") and "original_max_position_embeddings" not in rs:
        rs = {**rs, "original_max_position_embeddings": d["original_max_position_embeddings"]}
    d = {**d, "rope_scaling": rs}
    if d.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: Phi-3 with partial_rotary_factor != 1 (Phi-3.5, Phi-4-mini) is not supported")
    window, context = d.get("sliding_window"), d.get("max_position_embeddings", 4096)
    if isinstance(window, int) and not isinstance(window, bool) and window < context:
        raise ConfigError(f"{source}: Phi-3 with a sliding window ({window}) shorter than its context ({context}) "
                          f"is not supported (Phi-3-mini-128k, the Mini-InternVL decoder, has none in effect)")  # fmt: skip
    return d


def parse_llm(d: dict[str, Any], source: str) -> LLMConfig:
    """The language-model section (`llm_config` or `text_config`) of either layout."""
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
        family = {f: f for f in LLM_FAMILIES.values()}.get(d.get("model_type", ""))
        if family is None:
            known = sorted(set(LLM_FAMILIES.values()))
            raise ConfigError(f"{source}: language model config has no architectures and model_type "
                              f"{d.get('model_type')!r} is not one of {known}")  # fmt: skip
    if family == "phi3":
        d = _phi3(d, source)
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    elif family == "internlm2":
        qkv_bias = o_bias = bool(d.get("bias", True))
    else:
        qkv_bias = o_bias = bool(d.get("attention_bias", family == "gpt_oss"))
    if family != "gpt_oss":  # Qwen2 configs carry sliding_window and layer_types too, unused by the model
        d = {k: v for k, v in d.items() if k not in _GPT_OSS_KEYS}
    rp = _rope_parameters(d)
    if d.get("rope_scaling") is None and rp.get("rope_type", "default") != "default":
        d = {**d, "rope_scaling": {k: v for k, v in rp.items() if k != "rope_theta"}}  # transformers 5 (YaRN)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in d:
            raise ConfigError(f"{source}: language model config lacks the required key {key!r}")
    return pick(
        {**d, "eos_token_id": eos},
        LLMConfig,
        dict(family=family, qkv_bias=qkv_bias, o_bias=o_bias,
             num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
             rope_theta=d.get("rope_theta", _rope_parameters(d).get("rope_theta", 10000.0)),
             max_position_embeddings=d.get("max_position_embeddings", 2048), rms_norm_eps=d.get("rms_norm_eps", 1e-6)),
        {"architectures": "_", "model_type": "_", "bias": "_", "attention_bias": "_",
         "num_local_experts": "num_experts"},
        source,
    )  # fmt: skip
