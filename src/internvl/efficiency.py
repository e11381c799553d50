"""The visual-efficiency switches of issue 19 as one small config: FastV pruning, YOPO, a per-layer keep
schedule (G-Search / P-Sigmoid), Mini-Monkey's pyramid and scale compression, a visual-token budget.
All off by default.

Spec syntax (CLI `--efficiency`, `load(efficiency="...")`): comma-separated `key=value` or bare flags, e.g.
`fastv=2:0.5,yopo_window=3,pyramid,max_visual_tokens=1024`; `off` or an empty string is the plain model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAX_LAYER = 1024
MAX_TOKENS = 1 << 24


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


@dataclass
class EfficiencyConfig:
    """Each field None / 1.0 / False means that switch is off; `is_off()` when all are."""

    fastv_layer: int | None = None  # FastV: from this decoder layer on (0-based) only the top visual tokens
    fastv_keep: float = 1.0  # FastV: fraction of visual tokens kept (by the attention text tokens pay them)
    yopo_window: int | None = None  # YOPO: visual-visual attention in a w x w window of a tile
    yopo_head_mask: str | None = None  # YOPO: path of a head-mask JSON written by `internvl calibrate`
    yopo_ffn_keep: float = 1.0  # YOPO: fraction of FFN intermediate units visual tokens use
    yopo_drop_after: int | None = None  # YOPO: visual tokens skip decoder layers >= this one
    schedule: str | None = None  # G-Search / P-Sigmoid: path of a per-layer keep-ratio JSON
    pyramid: bool = False  # Mini-Monkey: complementary image pyramid tiling
    scale_compress: float | None = None  # Mini-Monkey: fraction kept by layer-2 attention
    max_visual_tokens: int | None = None  # tile budget: all images of a prompt share this many visual tokens

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("fastv_layer", "yopo_drop_after"):
            _check_int(self, name, 0, MAX_LAYER)
        _check_int(self, "yopo_window", 1, MAX_LAYER)
        _check_int(self, "max_visual_tokens", 1, MAX_TOKENS)
        for name in ("fastv_keep", "yopo_ffn_keep"):
            _check_ratio(self, name, getattr(self, name))
        if self.scale_compress is not None:
            _check_ratio(self, "scale_compress", self.scale_compress)
        for name in ("yopo_head_mask", "schedule"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, Path)) or not str(value)):
                raise ConfigError(f"efficiency.{name}: expected a file path, got {_shown(value)}")
            if isinstance(value, Path):
                setattr(self, name, str(value))
        if not isinstance(self.pyramid, bool):
            raise ConfigError(f"efficiency.pyramid: expected true or false, got {_shown(self.pyramid)}")
        if self.fastv_keep < 1.0 and self.fastv_layer is None:
            keep = f"{self.fastv_keep:g}"
            raise ConfigError(f"efficiency.fastv_keep: {keep} needs fastv_layer (spec fastv=K:{keep})")

    def check_model(self, num_layers: int) -> None:
        """The layer switches inside a decoder of `num_layers` layers, and the files named present."""
        for name in ("fastv_layer", "yopo_drop_after"):
            value = getattr(self, name)
            if value is not None and value >= num_layers:
                raise ConfigError(
                    f"efficiency.{name}: expected a layer from 0 to {num_layers - 1}, got {value}"
                )
        for name in ("yopo_head_mask", "schedule"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"efficiency.{name}: no such file {value}")

    def is_off(self) -> bool:
        return self == EfficiencyConfig()

    def fastv_on(self) -> bool:
        return self.fastv_layer is not None and self.fastv_keep < 1.0

    def to_spec(self) -> str:
        """The spec string that `from_spec` reads back to this config ("off" when every switch is off)."""
        parts = []
        if self.fastv_layer is not None:
            parts.append(f"fastv={self.fastv_layer}:{self.fastv_keep:g}")
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if f.name in ("fastv_layer", "fastv_keep") or value == default:
                continue
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f.name if value is True else f"{f.name}={shown}")
        return ",".join(parts) or "off"

    @classmethod
    def from_spec(cls, spec: str | None) -> EfficiencyConfig:
        """Parse `key=value,flag,...`; `fastv=K:R` sets fastv_layer and fastv_keep together."""
        if spec is None or not str(spec).strip() or str(spec).strip().lower() in ("off", "none"):
            return cls()
        names = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for part in (p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            key, eq, raw = (s.strip() for s in part.partition("="))
            if key == "fastv":
                layer, colon, keep = raw.partition(":")
                if not eq or not colon:
                    raise ConfigError(
                        f"efficiency spec: expected fastv=LAYER:KEEP (e.g. fastv=2:0.5), got {part!r}"
                    )
                values["fastv_layer"] = _number("fastv_layer", layer, int)
                values["fastv_keep"] = _number("fastv_keep", keep, float)
                continue
            if key not in names:
                known = ", ".join(["fastv", *names])
                raise ConfigError(f"efficiency spec: unknown switch {key!r} (known: {known})")
            kind = names[key].type
            if "bool" in str(kind):
                if eq and raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ConfigError(f"efficiency.{key}: expected a bare flag or true/false, got {raw!r}")
                values[key] = not eq or raw.lower() in ("1", "true", "yes", "on")
            elif not eq or not raw:
                raise ConfigError(f"efficiency spec: {key} needs a value ({key}=...), got {part!r}")
            elif "str" in str(kind):
                values[key] = raw
            else:
                values[key] = _number(key, raw, int if "int" in str(kind) else float)
        return cls(**values)

    @classmethod
    def coerce(cls, value: EfficiencyConfig | str | dict | None) -> EfficiencyConfig | None:
        """None, a spec string, a dict of fields or a config -> a config, or None when every switch is off."""
        if value is None:
            return None
        if isinstance(value, cls):
            cfg = value
        elif isinstance(value, str):
            cfg = cls.from_spec(value)
        elif isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ConfigError(f"efficiency: unknown fields {unknown}")
            cfg = cls(**value)
        else:
            raise ConfigError(
                f"efficiency: expected an EfficiencyConfig, a spec or None, got {_shown(value)}"
            )
        return None if cfg.is_off() else cfg


def _number(name: str, raw: str, kind: type) -> int | float:
    try:
        return kind(raw)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ConfigError(f"efficiency.{name}: expected {expected}, got {raw!r}") from None


def _check_int(cfg: EfficiencyConfig, name: str, low: int, high: int) -> None:
    value = getattr(cfg, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"efficiency.{name}: expected an integer from {low} to {high}, got {_shown(value)}")


def _check_ratio(cfg: EfficiencyConfig, name: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"efficiency.{name}: expected a number in (0, 1], got {_shown(value)}")
    setattr(cfg, name, float(value))
