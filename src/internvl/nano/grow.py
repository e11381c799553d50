"""A deeper decoder computing the same function (`internvl nano grow`): after each named layer, a copy of it whose
output projections (`o_proj`, `down_proj`) are zero, so it adds nothing to the residual stream until trained."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..errors import ConfigError

_LAYER = re.compile(r"^(language_model\.model\.layers\.)(\d+)(\..*)$")
# the projections that write into the residual stream; zero in an inserted layer
_OUTPUTS = ("self_attn.o_proj.", "mlp.down_proj.")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def parse_after(text: str, layers: int) -> list[int]:
    """'2,4' -> [2, 4]: the layers each followed by a new copy (sorted, each in 0..layers-1, repeats allowed: a
    layer named twice gets two copies)."""
    try:
        after = sorted(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--after: expected layer numbers like '2,4', got {text!r}") from None
    if not after:
        raise ConfigError("--after: name at least one layer")
    bad = [i for i in after if not 0 <= i < layers]
    if bad:
        raise ConfigError(f"--after: the decoder has layers 0..{layers - 1}, got {bad}")
    return after


def grow(model_dir: str | Path, out: str | Path, after: str) -> dict:
    """Write the deeper model to `out` (original InternVL layout, `language_model.model.layers.N.*`; the copies'
    queries, keys, values and MLP inputs start from their source layer's); returns {"layers": [old, new], "new":
    the new layers' indices}."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(model_dir), Path(out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"{out}: write the deeper model to another folder than {src}")
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{src}: no model.safetensors (grow reads a single-file model folder)")
    config = json.loads((src / "config.json").read_text())
    llm = config.get("llm_config")
    if not isinstance(llm, dict) or "num_hidden_layers" not in llm:
        raise ConfigError(
            f"{src / 'config.json'}: no llm_config.num_hidden_layers (the original InternVL layout)"
        )
    layers = int(llm["num_hidden_layers"])
    order = parse_after(after, layers)

    # new index of each old layer, and the old layer each new one copies
    place: dict[int, int] = {}
    copies: list[tuple[int, int]] = []  # (new index, source layer)
    n = 0
    for i in range(layers):
        place[i] = n
        n += 1
        for _ in range(order.count(i)):
            copies.append((n, i))
            n += 1

    tensors: dict[str, torch.Tensor] = {}
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            t = f.get_tensor(key)
            m = _LAYER.match(key)
            if m is None:
                tensors[key] = t
                continue
            i = int(m.group(2))
            tensors[f"{m.group(1)}{place[i]}{m.group(3)}"] = t
            by_layer.setdefault(i, {})[m.group(3)[1:]] = t
    missing = [i for i in set(order) if i not in by_layer]
    if missing:
        raise ConfigError(
            f"{weights}: no tensors for decoder layers {missing} (not the original InternVL layout)"
        )
    for new, i in copies:
        for name, t in by_layer[i].items():
            copy = torch.zeros_like(t) if name.startswith(_OUTPUTS) else t.clone()
            tensors[f"language_model.model.layers.{new}.{name}"] = copy

    out.mkdir(parents=True, exist_ok=True)
    llm["num_hidden_layers"] = n
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    save_file(
        dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata=metadata or {"format": "pt"}
    )
    for name in _COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return {"layers": [layers, n], "new": [new for new, _ in copies]}
