"""Training checkpoints for exact resume: written atomically, the last N kept, nothing pickled.

    OUT/checkpoints/step-00000120/
        model.safetensors       trainable parameters (all of them when training from scratch)
        optimizer.safetensors   AdamW moments and step counts, keyed "param name::state key"
        optimizer.json          parameter groups (hyper-parameters, parameter names)
        state.json              step, data position, total steps, the run's arguments
        rank-{r}.json           per-rank Python and NumPy RNG states, and the data position of packed runs
        rank-{r}.safetensors    per-rank torch (and CUDA) RNG states
    OUT/checkpoints/latest      name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed when complete, so a killed run leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from .dist import DistContext, full_state_dict, load_full_state_dict, load_optimizer_state, optimizer_state

SUBDIR = "checkpoints"
LATEST = "latest"


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / SUBDIR


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    return py, tensors


def set_rng_state(py: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    version, mt, gauss = py["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = py["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, entries in osd.get("state", {}).items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{key}"] = value
    return tensors, {"param_groups": osd.get("param_groups", []), "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(out: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ctx: DistContext, state: dict, rank_state: dict, keep_last: int = 2,
                    trainable_only: bool = True) -> Path:  # fmt: skip
    """Write the checkpoint of `step` (a collective call: every rank must call it). An unwritable or full
    output folder is a one-line TrainingError; the last complete checkpoint stays as it was."""
    try:
        return _save(out, step, model, optimizer, ctx, state, rank_state, keep_last, trainable_only)
    except (OSError, SafetensorError) as e:
        reason = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
        raise TrainingError(f"{checkpoint_root(out)}: cannot write the checkpoint of step {step} ({reason}); "
                            "the last complete checkpoint is kept for --resume") from None  # fmt: skip


def _save(out: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext,
          state: dict, rank_state: dict, keep_last: int, trainable_only: bool) -> Path:  # fmt: skip
    root = checkpoint_root(out)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    weights = full_state_dict(model, trainable_only)
    osd = optimizer_state(model, optimizer)
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(osd)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
    ctx.barrier()
    py, rng_tensors = rng_state(ctx.device)
    save_file(
        {k: v.cpu().contiguous() for k, v in rng_tensors.items()}, str(tmp / f"rank-{ctx.rank}.safetensors")
    )
    _write_json(tmp / f"rank-{ctx.rank}.json", {**py, "data": rank_state})
    ctx.barrier()
    if ctx.is_main:
        _write_json(tmp / "state.json", {**state, "step": step, "world_size": ctx.world_size})  # written last
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        (root / LATEST).with_name(LATEST + ".tmp").write_text(final.name)
        os.replace(root / (LATEST + ".tmp"), root / LATEST)
        _prune(root, keep_last)
    ctx.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[: max(0, len(done) - max(keep_last, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def find_latest(out: str | Path) -> Path | None:
    """The newest complete checkpoint under OUT, or None."""
    root = checkpoint_root(out)
    marker = root / LATEST
    if marker.exists():
        path = root / marker.read_text().strip()
        if (path / "state.json").exists():
            return path
    done = sorted(
        p for p in root.glob("step-*") if (p / "state.json").exists() and not p.name.endswith(".tmp")
    )
    return done[-1] if done else None


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{path}: unreadable checkpoint state ({e})") from None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ctx: DistContext) -> tuple[dict, dict]:  # fmt: skip
    """Restore weights, optimizer and this rank's RNG; returns (state.json, this rank's data state)."""
    state = read_state(path)
    rank_file = path / f"rank-{ctx.rank}.json"
    if not rank_file.exists():
        raise TrainingError(f"{path}: no state for rank {ctx.rank} (the checkpoint was written by "
                            f"{state.get('world_size')} process(es), this run has {ctx.world_size})")  # fmt: skip
    main_or_single = ctx.is_main or not ctx.distributed
    weights = load_file(str(path / "model.safetensors")) if main_or_single else {}
    load_full_state_dict(model, weights)
    if main_or_single:
        meta = json.loads((path / "optimizer.json").read_text())
        osd = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta)
    else:
        osd = {}
    load_optimizer_state(model, optimizer, osd)
    rank = json.loads(rank_file.read_text())
    set_rng_state(rank, load_file(str(path / f"rank-{ctx.rank}.safetensors")), ctx.device)
    return state, rank.get("data", {})
