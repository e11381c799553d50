"""The model of a training run: loaded from a checkpoint (or randomly initialized from a config.json), with
the run's template, tiling and drop-path settings, its trainable parameters (freezing, LoRA), cast and moved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TrainingError
from .args import TrainArgs


@dataclass
class Prepared:
    """A model ready to train (trainable parameters set, on its device, not yet sharded) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    tokenizer_dir: Path
    base_dtype: torch.dtype  # the stored dtype of the base weights: the default dtype of the saved model
    tune: object  # freeze.TuneSpec
    modules_to_save: list[str]  # LoRA runs: modules trained in full, saved in the adapter
    compute_dtype: torch.dtype


def prepare_model(args: TrainArgs, ctx, log: Callable[[str], None] = print) -> Prepared:
    """Load (or randomly initialize) the model, apply the run's template / tiling / drop-path settings, set the
    trainable parameters (freezing, LoRA), cast (fp32 master weights) and move it to the device."""
    from .freeze import TuneSpec, configure_trainable, count_parameters
    from .lora import full_modules

    m, d, t = args.model, args.data, args.tune
    model, tokenizer, base_dtype, tok_dir = build_run_model(args)
    p = model.config.processor
    model.config = model.config.replace(
        template=m.template or p.template,
        system_message=m.system_message if m.system_message is not None else p.system_message,
        max_dynamic_patch=d.max_dynamic_patch or p.max_dynamic_patch,
    )
    model.config.vision.drop_path_rate = t.drop_path_rate
    model.vision_model.set_drop_path_rate(t.drop_path_rate)
    compute, why = compute_dtype(args.run.dtype, ctx.device)
    if args.run.dtype == "auto":
        log(f"compute dtype: {why}")
    spec = TuneSpec(t.freeze_vision, t.freeze_mlp, t.freeze_llm, t.unfreeze_vit_layers, t.unfreeze_lm_head,
                    t.lora_r, t.vision_lora_r, t.lora_alpha, t.lora_dropout)  # fmt: skip
    if spec.uses_lora and m.model is None:
        raise TrainingError("LoRA needs a pretrained MODEL folder (the adapter records its base model)")
    model.float()
    configure_trainable(model, spec)
    modules_to_save = full_modules(model) if spec.uses_lora else []
    if compute != torch.float32 and compute == base_dtype and not ctx.distributed:
        # frozen weights are only read: keep them in the compute dtype when that is how they were stored
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(compute)
    model.set_gradient_checkpointing(t.grad_checkpoint)
    model.to(ctx.device)
    trainable, total_params = count_parameters(model)
    log(f"model: {total_params / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable"
        + (f" (LoRA r={t.lora_r}/{t.vision_lora_r})" if spec.uses_lora else ""))  # fmt: skip
    return Prepared(model, tokenizer, tok_dir, base_dtype, spec, modules_to_save, compute)


def compute_dtype(want: str, device: torch.device, flags: tuple[set[str] | None, str] | None = None
                  ) -> tuple[torch.dtype, str]:  # fmt: skip
    """The dtype a run computes in for `--dtype` fp32, bf16 or auto, and the words saying why; `flags`:
    kernels.build.cpu_flags()'s answer (read when None)."""
    if want != "auto":
        return (torch.bfloat16 if want == "bf16" else torch.float32), want
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 (the GPU has it)"
        return torch.float32, "fp32 (the GPU has no bf16)"
    if device.type != "cpu":
        return torch.float32, f"fp32 (on {device.type})"
    from ..engine.prefill import choose

    widened, why = choose(torch.bfloat16, device, "auto", flags)
    return (torch.float32 if widened is not None else torch.bfloat16), why


def build_run_model(args: TrainArgs):
    """(model, tokenizer, stored dtype of the base weights, tokenizer folder)."""
    from ..checkpoint.adapter import is_adapter
    from ..checkpoint.io import build_model, load_model
    from ..checkpoint.layouts import read_config
    from ..model.llm import init_weights
    from ..tokenizer import Tokenizer

    m = args.model
    if m.model is not None:
        folder = Path(m.model)
        if not folder.is_dir():
            raise TrainingError(f"{folder}: no such model folder")
        if is_adapter(folder):
            raise TrainingError(
                f"{folder} is a LoRA adapter: merge it into its base first (internvl merge-lora)"
            )
        tok_dir = Path(m.tokenizer or folder)
        tokenizer = Tokenizer.from_dir(tok_dir)
        model, _ = load_model(folder, dtype=None, image_token_id=tokenizer.image_context_id)
        base_dtype = model.dtype
    else:
        tok_dir = Path(m.tokenizer)
        tokenizer = Tokenizer.from_dir(tok_dir)
        config = read_config(m.init_from_config)
        model = build_model(config, tokenizer.image_context_id, meta=False)
        init_weights(model)
        model.vision_model.init_from_scratch()
        base_dtype = torch.float32
    vocab = model.config.llm.vocab_size
    if tokenizer.vocab_size > vocab:
        raise TrainingError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab}"
        )
    return model, tokenizer, base_dtype, tok_dir
