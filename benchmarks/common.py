"""Shared by the benchmarks: random-weight checkpoints of released shapes, and child-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WRITE = r"""
import dataclasses, json, sys, torch
from internvl.checkpoint.io import build_model, save_model
from internvl.presets import preset
cfg = preset(sys.argv[2])
if len(sys.argv) > 4:  # language-model overrides (a shape that is no preset)
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, **json.loads(sys.argv[4])))
model = build_model(cfg, image_token_id=151667, meta=True)
g = torch.Generator().manual_seed(0)
for name, p in list(model.named_parameters()):
    mod, _, attr = name.rpartition(".")
    t = torch.empty(p.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    if "norm" in name or attr in ("ls1", "ls2"):
        t.fill_(1.0)
    model.get_submodule(mod)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
save_model(model, sys.argv[1], layout=sys.argv[3])
"""


def random_checkpoint(folder: Path, preset: str = "internvl3-1b", layout: str = "original",
                      llm: dict | None = None) -> Path:  # fmt: skip
    """A bf16 checkpoint of a released shape with random weights (written once, reused when present); `llm`
    overrides fields of the preset's language-model config."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        folder.mkdir(parents=True, exist_ok=True)
        print(f"writing a random {preset} checkpoint (bf16, {layout} layout) to {folder} ...", flush=True)
        extra = [json.dumps(llm)] if llm else []
        subprocess.run([sys.executable, "-c", WRITE, str(folder), preset, layout, *extra], check=True)
    return folder


def run_child(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_features() -> str:
    """The CPU model and the vector extensions the kernels care about (AVX2, AVX-512, AVX-512 BF16, AMX)."""
    import platform

    flags, model = set(), platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return f"{model}: " + (" ".join(f for f in wanted if f in flags) or "no AVX2")


KERNEL_CHOICES = ("auto", "avx512", "avx2", "torch")


def kernels_env(choice: str) -> str:
    """Set INTERNVL_KERNELS for the child processes (`auto`: the fastest variant the CPU supports); returns
    the header line that says which was asked for."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"--kernels: expected one of {list(KERNEL_CHOICES)}, got {choice!r}")
    os.environ.pop("INTERNVL_NO_KERNELS", None)
    if choice == "auto":
        os.environ.pop("INTERNVL_KERNELS", None)
    else:
        os.environ["INTERNVL_KERNELS"] = choice
    return f"kernels: {choice}" + ("" if choice == "auto" else f" (INTERNVL_KERNELS={choice})")


def logits_cosine(a, b) -> dict:
    """Cosine similarity of two logits tensors [T, vocab] (or files torch.save'd), per position: mean and min."""
    import torch

    a, b = (torch.load(x, weights_only=True) if isinstance(x, (str, Path)) else x for x in (a, b))
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"mean": round(cos.mean().item(), 5), "min": round(cos.min().item(), 5)}
