"""The two checkpoint layouts behind one door: read a `config.json` of either, write one, and map tensors.

`original.py` (remote code, `internvl_chat`) and `hf.py` (transformers, `internvl`) each hold a layout's
config codec and tensor key map; this module picks between them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..config_checks import check_section
from ..errors import ConfigError
from .common import Entry
from .hf import apply_hf_preprocessor, from_hf_dict, hf_entries, hf_preprocessor_dict, to_hf_dict
from .original import from_original_dict, original_entries, to_original_dict

LAYOUTS = ("original", "hf")


def config_from_dict(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a parsed `config.json` of either layout."""
    mt = check_section(d, "the config", source).get("model_type")
    if mt == "internvl_chat" or "llm_config" in d:
        return from_original_dict(d, source)
    if mt == "internvl" or "text_config" in d:
        return from_hf_dict(d, source)
    raise ConfigError(
        f"{source}: unknown model_type {mt!r}; expected 'internvl_chat' (original layout) or 'internvl' / 'interns1' (-hf)"
    )


def read_config(path: str | Path) -> ModelConfig:
    """The config of a model folder (or a `config.json` path); an -hf folder's preprocessor config applies."""
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
    cfg = config_from_dict(d, str(path))
    pre = path.parent / "preprocessor_config.json"
    if d.get("model_type") in ("internvl", "interns1") and pre.exists():  # interns1: Intern-S1(-mini), same layout
        try:
            apply_hf_preprocessor(cfg, check_section(json.loads(pre.read_text()), "the config", str(pre)))
        except (ValueError, TypeError, RecursionError) as e:
            raise ConfigError(f"{pre}: not a usable preprocessor config ({e})") from None
        cfg.__post_init__()
    return cfg


def config_files(config: ModelConfig, layout: str, image_token_id: int | None = None) -> dict[str, dict[str, Any]]:
    """The JSON files that describe `config` in `layout`: file name -> content."""
    if layout == "original":
        return {"config.json": to_original_dict(config)}
    if layout == "hf":
        if image_token_id is None:
            raise ConfigError("the -hf layout needs the model's image token id")
        return {"config.json": to_hf_dict(config, image_token_id), "preprocessor_config.json": hf_preprocessor_dict(config)}
    raise ValueError(f"unknown layout {layout!r}")


def build_entries(internal_keys: list[str], config: ModelConfig, layout: str) -> list[Entry]:
    """Entries covering every internal key for `layout` in {"original", "hf"}."""
    if layout == "original":
        return original_entries(internal_keys, config)
    if layout == "hf":
        return hf_entries(internal_keys, config)
    raise ValueError(f"unknown layout {layout!r}")


def detect_layout(keys: set[str]) -> str:
    """'hf' if the keys use the transformers names, 'original' otherwise."""
    if any(k.startswith(("model.vision_tower.", "model.language_model.", "vision_tower.")) for k in keys):
        return "hf"
    return "original"
