"""A training checkpoint (OUT/checkpoints/step-N) as a complete model folder: its trained tensors over those of
the run's start model (a run from a model folder saves only what it trains, so a frozen encoder is not in it),
with the config and tokenizer that `internvl chat` and `eval` load."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

WEIGHTS = "model.safetensors"


@dataclass
class Base:
    """What the checkpoint lacks: the config, the start model's weights (None: a from-scratch run, whose
    checkpoints hold every tensor) and the tokenizer; `run` holds the run's arguments when it recorded them."""

    config: Path
    weights: Path | None
    tokenizer: Path
    run: dict = field(default_factory=dict)


def is_training_checkpoint(path: str | Path) -> bool:
    """Trained tensors without a config: a folder `internvl finetune` wrote under OUT/checkpoints."""
    path = Path(path)
    return (path / WEIGHTS).is_file() and not (path / "config.json").exists()


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def run_args(checkpoint: Path) -> dict:
    """The arguments the run recorded in the checkpoint's state.json ({} without one)."""
    state = checkpoint / "state.json"
    if not state.is_file():
        return {}
    try:
        args = json.loads(state.read_text()).get("args", {})
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{state}: unreadable checkpoint state ({e})") from None
    return args if isinstance(args, dict) else {}


def find_base(checkpoint: str | Path, base: str | Path | None = None) -> Base:
    """`base` (a model folder, or a folder with config.json and tokenizer) when given, else the start model
    the run recorded: its MODEL folder, or --init-from-config and --tokenizer of a from-scratch run."""
    checkpoint = Path(checkpoint)
    args = run_args(checkpoint)
    recorded_tok = Path(args["tokenizer"]) if args.get("tokenizer") else None
    if base is not None:
        folder = Path(base)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"--base {folder}: not a model folder (no config.json)")
        tok = folder if _has_tokenizer(folder) or recorded_tok is None else recorded_tok
        return Base(folder / "config.json", folder if _has_weights(folder) else None, tok, args)
    if args.get("model"):
        folder = Path(args["model"])
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{checkpoint}: the run's start model {folder} is not there (moved, or a path "
                                  "relative to another folder); pass --base START_MODEL_DIR")  # fmt: skip
        return Base(folder / "config.json", folder, recorded_tok or folder, args)
    if args.get("init_from_config") and recorded_tok is not None:
        config = Path(args["init_from_config"])
        for path in (config, recorded_tok):
            if not path.exists():
                raise CheckpointError(f"{checkpoint}: the run's {path} is not there; pass --base DIR (config.json "
                                      "and tokenizer)")  # fmt: skip
        return Base(config, None, recorded_tok, args)
    raise CheckpointError(f"{checkpoint}: no start model recorded (no state.json with the run's arguments); "
                          "pass --base START_MODEL_DIR")  # fmt: skip


def export_checkpoint(checkpoint: str | Path, out: str | Path, base: str | Path | None = None,
                      layout: str = "original", dtype: str | None = None, max_shard_bytes: int = 4 << 30,
                      log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Write the complete model of `checkpoint` into `out`: every tensor the checkpoint holds, the start
    model's (`find_base`) for the others, the config with the run's template / tiling / drop-path settings
    (as its OUT/final would have), and the tokenizer. `dtype` defaults to the run's --save-dtype, else the
    base's stored dtypes. Every mismatch is one CheckpointError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..tokenizer import Tokenizer
    from .io import build_model, load_weights, save_model
    from .layouts import read_config

    checkpoint, out = Path(checkpoint), Path(out)
    weights = checkpoint / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint}: no weights in this folder ({WEIGHTS} is missing); give a training "
                              "checkpoint, OUT/checkpoints/step-N")  # fmt: skip
    b = find_base(checkpoint, base)
    try:
        trained = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable ({e})") from None
    tokenizer = Tokenizer.from_dir(b.tokenizer)
    model = build_model(read_config(b.config), tokenizer.image_context_id)
    if b.weights is not None:
        load_weights(model, b.weights, strict=False)
        _warn_if_newer(b.weights, checkpoint, log)
    _overlay(model, trained, weights, b)
    model.config = _run_config(model.config, b.run)
    dtype = dtype or b.run.get("save_dtype")
    save_model(model, out, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer_dir=b.tokenizer)
    return out


def _overlay(model: torch.nn.Module, trained: dict[str, torch.Tensor], weights: Path, b: Base) -> None:
    where = b.weights or b.config
    expected = model.state_dict(keep_vars=True)
    for name, value in trained.items():
        if name not in expected:
            hint = " (a LoRA run: merge OUT/final with internvl merge-lora)" if "lora_" in name else ""
            raise CheckpointError(f"{weights}: tensor {name!r} is not in the base model {where}{hint}")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{weights}: tensor {name!r} has shape {tuple(value.shape)}, but the base "
                                  f"{where} has {tuple(expected[name].shape)}")  # fmt: skip
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in trained.items()}, strict=False, assign=True)
    lm = model.language_model
    if model.config.llm.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise CheckpointError(f"{len(missing)} tensor(s) in neither {weights} nor the base {where}: {shown}")


def _run_config(config, args: dict):
    """The settings `internvl finetune` applies to the model it trains (train/prepare.py), from its arguments."""
    if not args:
        return config
    p = config.processor
    system = args.get("system_message")
    config = config.replace(template=args.get("template") or p.template,
                            system_message=system if system is not None else p.system_message,
                            max_dynamic_patch=args.get("max_dynamic_patch") or p.max_dynamic_patch)  # fmt: skip
    if args.get("drop_path_rate") is not None:
        config.vision.drop_path_rate = args["drop_path_rate"]
    return config


def _warn_if_newer(base: Path, checkpoint: Path, log: Callable[[str], None]) -> None:
    # shipping a stage's model into the folder it started from replaces the start model: its frozen tensors
    # are then no longer the ones this checkpoint was trained with
    written = (checkpoint / WEIGHTS).stat().st_mtime
    changed = [f.name for f in base.glob("*.safetensors") if f.stat().st_mtime > written]
    if changed:
        log(f"note: {base / changed[0]} changed after {checkpoint} was written; if it is no longer the run's "
            "start model, pass --base with that model")  # fmt: skip
