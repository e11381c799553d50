"""Read and write checkpoints (single-file or sharded safetensors, original or -hf layout).

The model is built on the meta device and each tensor is read from its memory-mapped file straight
into place, so a large model is never randomly initialized nor held twice in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..model.mono import model_class
from ..model.vlm import InternVLChatModel
from .layouts import build_entries, config_files, detect_layout, read_config
from .mxfp4 import packed_entries
from .reader import SafetensorsFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.json", "chat_template.jinja",
)  # fmt: skip
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


@dataclass
class LoadReport:
    layout: str
    files: list[str]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, when sharded, its key -> file map."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        for f in files:
            # by name, not by resolved path: the Hub cache links a snapshot's files to blobs elsewhere
            if Path(f).is_absolute() or ".." in Path(f).parts or not f:
                raise CheckpointError(f"{index}: shard {f[:200]!r} is not a file inside the model folder {folder}")
            if not (folder / f).is_file():
                raise CheckpointError(f"{folder / f}: shard listed in {INDEX} does not exist")
        return [folder / f for f in files], weight_map
    single = folder / SINGLE
    if single.exists():
        return [single], None
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others, None
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle weights (.bin/.pt) found; convert them to safetensors first")
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}")


def _normalize_legacy_hf(key: str) -> str:
    # transformers < 4.52 saved the -hf layout without the `model.` prefix
    for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):  # fmt: skip
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr)
    if old is not None:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def load_weights(model: InternVLChatModel, folder: str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", strict: bool = True) -> LoadReport:  # fmt: skip
    """Load every parameter of `model` (possibly on the meta device) from `folder`."""
    folder = Path(folder)
    files, _ = weight_files(folder)
    handles = [SafetensorsFile(f) for f in files]
    owner: dict[str, int] = {}
    raw_names: dict[str, str] = {}
    for i, h in enumerate(handles):
        for k in h.keys():
            owner.setdefault(k, i)
    layout = detect_layout(set(owner))
    if layout == "hf":
        for k in list(owner):
            nk = _normalize_legacy_hf(k)
            if nk != k:
                owner[nk] = owner.pop(k)
                raw_names[nk] = k
    expected = {k: (p.shape, p.dtype) for k, p in model.state_dict(keep_vars=True).items()}
    tie = model.config.llm.tie_word_embeddings
    entries = packed_entries(build_entries(list(expected), model.config, layout), set(owner))
    # read in file order: sequential reads, one file after another
    position = {k: (owner[k], handles[owner[k]].entries[raw_names.get(k, k)][2]) for k in owner}
    entries.sort(key=lambda e: min((position[k] for k in e.external if k in position), default=(-1, 0)))
    report = LoadReport(layout=layout, files=[str(f) for f in files])
    needed = {k for e in entries for k in e.external}
    report.unexpected = sorted(set(owner) - needed)
    shapes = {k: handles[i].shape(raw_names.get(k, k)) for k, i in owner.items()}
    for e in entries:  # sizes against the config from the headers alone, before a byte is read
        present = all(k in shapes for k in e.external)
        present = present and not e.packed  # packed (MXFP4) tensors are checked once dequantized, below
        if present and sum(_numel(shapes[k]) for k in e.external) != sum(_numel(expected[n][0]) for n in e.internal):
            k, name = e.external[0], e.internal[0]
            raise CheckpointError(f"{files[owner[k]]}: tensor {k!r} has shape {tuple(shapes[k])}, but the config "
                                  f"expects {tuple(expected[name][0])} for {name!r}")  # fmt: skip
    for e in entries:
        absent = [k for k in e.external if k not in owner]
        if absent:
            if tie and e.internal == ["language_model.lm_head.weight"]:
                continue
            report.missing.extend(absent)
            continue
        src = [handles[owner[k]].read(raw_names.get(k, k)) for k in e.external]
        try:
            converted = e.to_internal(src)
        except RuntimeError as err:  # a fused tensor that does not split as the config says
            raise CheckpointError(f"{files[owner[e.external[0]]]}: tensor {e.external[0]!r} of shape "
                                  f"{tuple(src[0].shape)} does not fit the config ({err})") from None
        for name, value in zip(e.internal, converted):
            shape, pdtype = expected[name]
            if tuple(value.shape) != tuple(shape):
                f = files[owner[e.external[0]]]
                raise CheckpointError(f"{f}: tensor {e.external[0]!r} has shape {tuple(src[0].shape)}, which gives "
                                      f"{tuple(value.shape)} for {name!r}; the config expects {tuple(shape)}")  # fmt: skip
            target = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
            _set_tensor(model, name, value.to(device=device, dtype=target))
    if report.missing and strict:
        shown = ", ".join(report.missing[:5]) + (" ..." if len(report.missing) > 5 else "")
        raise CheckpointError(f"{folder}: {len(report.missing)} tensor(s) missing from the checkpoint: {shown}")
    if tie:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return report


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@contextlib.contextmanager
def _skip_init():
    """Skip parameter initialization while building on the meta device: the weights come from the file,
    and initializers on meta tensors would pull in torch's compiler stack (about a second of imports)."""
    classes = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Conv2d)
    saved = {cls: cls.reset_parameters for cls in classes}
    try:
        for cls in classes:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


def build_model(config: ModelConfig, image_token_id: int | None = None, meta: bool = True) -> InternVLChatModel:
    """The model with empty (meta) parameters to be filled by `load_weights`, or randomly initialized."""
    if meta:
        with torch.device("meta"), _skip_init():
            return model_class(config)(config, image_token_id)
    return model_class(config)(config, image_token_id)


def load_model(folder: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               image_token_id: int | None = None) -> tuple[InternVLChatModel, LoadReport]:  # fmt: skip
    """Config + weights from a checkpoint folder of either layout. `dtype` None keeps the stored dtypes."""
    folder = Path(folder)
    config = read_config(folder)
    model = build_model(config, image_token_id)
    report = load_weights(model, folder, resolve_dtype(dtype), device)
    model.eval()
    return model, report


def save_model(model: InternVLChatModel, folder: str | Path, layout: str = "original",
               dtype: str | torch.dtype | None = None, max_shard_bytes: int = 4 << 30,
               tokenizer_dir: str | Path | None = None) -> list[Path]:  # fmt: skip
    """Write config.json and safetensors (sharded above `max_shard_bytes`) in `layout`."""
    if model.language_model.fused:
        raise CheckpointError("this model's projections were fused for decoding and it cannot be saved; "
                              "load it with internvl.load(..., optimize=False) or load_model() to save it")
    try:
        return _save(model, Path(folder), layout, resolve_dtype(dtype), max_shard_bytes, tokenizer_dir)
    except OSError as e:  # an unwritable or full output folder: one line, not a traceback
        raise CheckpointError(f"{e.filename or folder}: cannot write the checkpoint ({e.strerror or e})") from None


def _save(model: InternVLChatModel, folder: Path, layout: str, dtype: torch.dtype | None, max_shard_bytes: int,
          tokenizer_dir: str | Path | None) -> list[Path]:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.llm.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    for e in build_entries(list(state), model.config, layout):
        for name, value in zip(e.external, e.to_external([state[k] for k in e.internal])):
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[name] = value.contiguous().cpu()
    if layout == "hf" and model.image_token_id is None:
        raise CheckpointError("saving in the -hf layout needs the model's image token id")
    files = config_files(model.config, layout, model.image_token_id)
    files["config.json"]["torch_dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
    written = _write_shards(tensors, folder, max_shard_bytes)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, folder)
    return written


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[Path]:
    for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX]:
        if stale.exists():
            stale.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = folder / SINGLE
        _atomic_save(shards[0], path, meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, folder / name, meta)
        paths.append(folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except SafetensorError as e:  # its I/O errors (unwritable folder, full disk) are not OSError
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e})") from None
    os.replace(tmp, path)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
