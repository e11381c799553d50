"""`train(args)`: a whole run from arguments (the `internvl finetune` verb is a thin wrapper around it).

Model (a checkpoint, or random weights from a config) -> trainable parameters (freezing, LoRA) -> data
(meta JSON, validation, loader) -> optional FSDP2 sharding -> AdamW -> resume -> the loop -> the final model
(merged weights, or the LoRA adapter and optionally the merged weights) plus metrics and a loss curve.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainingError
from .args import TrainArgs
from .data import BadRow

# arguments that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "save_every", "keep_last", "log_every", "tensorboard", "num_workers", "threads",
                     "device", "save_layout", "save_dtype", "save_merged", "out"}  # fmt: skip
FINAL, MERGED = "final", "merged"


@dataclass
class TrainResult:
    out: Path
    steps: int
    total_steps: int
    interrupted: bool = False
    final: Path | None = None  # the model folder (the adapter folder for LoRA)
    merged: Path | None = None
    last_loss: float | None = None
    skipped: list[BadRow] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def train(args: TrainArgs, objective=None, log: Callable[[str], None] = print) -> TrainResult:
    """Run training as configured by `args` (under torchrun: one call per process). `objective` defaults to
    SFT with `args.data.loss_reduction`."""
    from .dist import init_distributed, shutdown

    ctx = init_distributed(args.run.device)
    try:
        return _train(args, objective, ctx, log if ctx.is_main else (lambda _msg: None))
    finally:
        shutdown()


def _train(args: TrainArgs, objective, ctx, log) -> TrainResult:
    from .checkpoint import find_latest, load_checkpoint, read_state, save_checkpoint
    from .collate import Collator, Packer
    from .data import build_index, read_meta
    from .dataset import SampleOptions, SFTDataset
    from .dist import shard_model
    from .freeze import TuneSpec, configure_trainable, count_parameters
    from .loop import LoopConfig, Trainer
    from .metrics import MetricsLog
    from .objective import SFTObjective
    from .optim import build_optimizer, warmup_steps
    from .stream import PackedBatches, PaddedBatches, PaddedPlan

    m, d, o, r = args.model, args.data, args.optim, args.run
    out = Path(m.out)
    latest = find_latest(out)
    if latest is not None and not r.resume:
        raise TrainingError(f"{out} already has checkpoints (newest: {latest.name}); pass --resume to continue "
                            "or choose another --out")  # fmt: skip
    if latest is None and (out / FINAL).exists() and not r.resume:
        raise TrainingError(f"{out / FINAL} already exists; choose another --out")
    if r.resume and latest is None:
        log(f"no checkpoint in {out}: starting at step 0")
    if r.threads:
        torch.set_num_threads(r.threads)
    random.seed(r.seed)
    np.random.seed(r.seed)
    torch.manual_seed(r.seed)

    model, tokenizer, base_dtype, tok_dir = _build_model(args)
    cfg = model.config
    template = m.template or cfg.template
    system = m.system_message if m.system_message is not None else cfg.system_message
    max_patch = d.max_dynamic_patch or cfg.max_dynamic_patch
    model.config = cfg.replace(template=template, system_message=system, max_dynamic_patch=max_patch)
    model.config.vision.drop_path_rate = args.tune.drop_path_rate
    model.vision_model.set_drop_path_rate(args.tune.drop_path_rate)
    compute = torch.bfloat16 if r.dtype == "bf16" else torch.float32

    t = args.tune
    spec = TuneSpec(t.freeze_vision, t.freeze_mlp, t.freeze_llm, t.unfreeze_vit_layers, t.unfreeze_lm_head,
                    t.lora_r, t.vision_lora_r, t.lora_alpha, t.lora_dropout)  # fmt: skip
    if spec.uses_lora and m.model is None:
        raise TrainingError("LoRA needs a pretrained MODEL folder (the adapter records its base model)")
    model.float()
    configure_trainable(model, spec)
    from .lora import full_modules

    modules_to_save = full_modules(model) if spec.uses_lora else []
    if compute != torch.float32 and not ctx.distributed:
        for p in model.parameters():  # frozen weights are only read: keep them in the compute dtype
            if not p.requires_grad:
                p.data = p.data.to(compute)
    model.set_gradient_checkpointing(t.grad_checkpoint)
    model.to(ctx.device)
    trainable, total_params = count_parameters(model)
    log(f"model: {total_params / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable"
        + (f" (LoRA r={t.lora_r}/{t.vision_lora_r})" if spec.uses_lora else ""))  # fmt: skip

    # ---- data ----
    specs = read_meta(d.data)
    index = build_index(specs, d.skip_bad_rows)
    options = SampleOptions(template, system, d.max_seq_length, max_patch, d.min_num_frame, d.max_num_frame,
                            r.seed)  # fmt: skip
    dataset = SFTDataset(index, tokenizer, model.config, options)
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    collator = Collator(pad_id, dataset.dummy, packed=d.packing)
    pin = ctx.device.type == "cuda"
    if d.packing:
        total = o.max_steps
        source = PackedBatches(dataset, collator, Packer(d.max_packed_tokens, d.max_packed_images), len(index),
                               r.seed, o.batch_size, o.grad_accum, ctx.world_size, ctx.rank, d.skip_bad_rows,
                               d.num_workers, pin)  # fmt: skip
    else:
        plan = PaddedPlan(len(index), r.seed, o.batch_size, o.grad_accum, ctx.world_size, ctx.rank)
        total = o.max_steps or max(1, math.ceil(o.epochs * plan.steps_per_epoch))
        source = PaddedBatches(dataset, collator, plan, total, d.skip_bad_rows, d.num_workers, pin)
    log(f"data: {len(index)} rows from {len(specs)} dataset(s)"
        + (f", {len(index.bad)} bad rows skipped" if index.bad else "")
        + f"; {total} steps of {o.batch_size * o.grad_accum * ctx.world_size} "
        + ("packed sequences" if d.packing else "samples"))  # fmt: skip

    if ctx.distributed:
        shard_model(model, compute if compute != torch.float32 else None)
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), o.adam_eps)
    objective = objective or SFTObjective(d.loss_reduction)
    objective.setup(model, ctx.device)

    start_step, data_state = 0, None
    if r.resume and latest is not None:
        _check_resumable(read_state(latest), args, total, ctx.world_size, latest)
        _, data_state = load_checkpoint(latest, model, optimizer, ctx)
        start_step = int(read_state(latest)["step"])
        log(f"resumed from {latest} at step {start_step}")

    metrics = MetricsLog(out, ctx.is_main, r.tensorboard, resume_step=start_step)
    if metrics.note:
        log(metrics.note)
    from_scratch = m.init_from_config is not None

    def save(step: int, state: dict) -> None:
        save_checkpoint(out, step, model, optimizer, ctx, {"total_steps": total, "args": args.to_dict()}, state,
                        r.keep_last, trainable_only=not from_scratch)  # fmt: skip

    loop_cfg = LoopConfig(total, warmup_steps(total, o.warmup_ratio, o.warmup_steps), o.lr, o.lr_scheduler,
                          o.max_grad_norm, r.log_every, r.save_every, compute)  # fmt: skip
    trainer = Trainer(model, optimizer, objective, source, ctx, loop_cfg, metrics, save)
    result = trainer.fit(start_step, data_state)
    metrics.close()

    res = TrainResult(out, result.step, total, result.interrupted, last_loss=result.last_loss,
                      history=result.history)  # fmt: skip
    res.skipped = _gather_bad(list(index.bad) + source.bad, ctx)
    if ctx.is_main:
        from .metrics import plot_loss

        plot_loss(out / "metrics.csv", out / "loss.png")
        _report_bad(res.skipped, out, log)
    if result.interrupted:
        log(f"stopped at step {result.step}: checkpoint in {out / 'checkpoints'}; continue with --resume")
        return res
    save_dtype = m.save_dtype or _dtype_name(base_dtype)
    if spec.uses_lora:
        res.final, res.merged = _save_lora(model, args, ctx, out, modules_to_save, tokenizer, tok_dir, save_dtype)
    else:
        res.final = _save_full(model, args, ctx, out, tokenizer, tok_dir, save_dtype)
    log(f"done: {result.step} steps, final loss {result.last_loss:.4f}; model in {res.final}"
        + (f", merged model in {res.merged}" if res.merged else ""))  # fmt: skip
    return res


def _build_model(args: TrainArgs):
    """(model, tokenizer, stored dtype of the base weights, tokenizer folder)."""
    from ..checkpoint.io import build_model, load_model
    from ..config import ModelConfig
    from ..model.llm import init_weights
    from ..tokenizer import Tokenizer
    from .lora import is_adapter

    m = args.model
    if m.model is not None:
        folder = Path(m.model)
        if not folder.is_dir():
            raise TrainingError(f"{folder}: no such model folder")
        if is_adapter(folder):
            raise TrainingError(f"{folder} is a LoRA adapter: merge it into its base first (internvl merge-lora)")
        tok_dir = Path(m.tokenizer or folder)
        tokenizer = Tokenizer.from_dir(tok_dir)
        model, _ = load_model(folder, dtype=None, image_token_id=tokenizer.image_context_id)
        base_dtype = model.dtype
    else:
        tok_dir = Path(m.tokenizer)
        tokenizer = Tokenizer.from_dir(tok_dir)
        config = ModelConfig.from_file(m.init_from_config)
        model = build_model(config, tokenizer.image_context_id, meta=False)
        init_weights(model)
        base_dtype = torch.float32
    vocab = model.config.llm.vocab_size
    if tokenizer.vocab_size > vocab:
        raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab}")
    return model, tokenizer, base_dtype, tok_dir


def _check_resumable(state: dict, args: TrainArgs, total: int, world: int, path: Path) -> None:
    before = state.get("args", {})
    now = args.to_dict()
    for k, v in now.items():
        if k in RESUMABLE_CHANGES or k not in before:
            continue
        if before[k] != v:
            raise TrainingError(f"cannot resume from {path}: {k} was {before[k]!r}, now {v!r}")
    if state.get("world_size", world) != world:
        raise TrainingError(f"cannot resume from {path}: it was written by {state['world_size']} process(es), "
                            f"this run has {world}")  # fmt: skip
    if state.get("total_steps", total) != total:
        raise TrainingError(f"cannot resume from {path}: {state['total_steps']} total steps then, {total} now")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _save_full(model, args: TrainArgs, ctx, out: Path, tokenizer, tok_dir: Path, save_dtype: str) -> Path:
    from ..checkpoint.io import build_model, save_model
    from .dist import full_state_dict, is_sharded

    state = full_state_dict(model)  # collective when sharded
    final = out / FINAL
    if ctx.is_main:
        plain = model
        if is_sharded(model):
            plain = build_model(model.config, tokenizer.image_context_id, meta=True)
            plain.load_state_dict(state, assign=True)
        save_model(plain, final, layout=args.model.save_layout, dtype=save_dtype, tokenizer_dir=tok_dir)
    ctx.barrier()
    return final


def _save_lora(model, args: TrainArgs, ctx, out: Path, modules_to_save: list[str], tokenizer, tok_dir: Path,
               save_dtype: str) -> tuple[Path, Path | None]:  # fmt: skip
    from ..checkpoint.io import load_model, save_model
    from .dist import full_state_dict
    from .lora import apply_adapter, lora_config, save_adapter

    t = args.tune
    state = full_state_dict(model, trainable_only=True)
    final, merged = out / FINAL, None
    if ctx.is_main:
        base = str(Path(args.model.model).resolve())
        config = lora_config(t.lora_r, t.vision_lora_r, t.lora_alpha, t.lora_dropout, modules_to_save, base)
        save_adapter(final, state, config, dtype=torch.bfloat16 if args.model.save_dtype == "bf16" else None)
        if args.model.save_merged:
            merged = out / MERGED
            base_model, _ = load_model(base, dtype="fp32", image_token_id=tokenizer.image_context_id)
            base_model.config = model.config
            save_model(apply_adapter(base_model, final, merge=True), merged, layout=args.model.save_layout,
                       dtype=save_dtype, tokenizer_dir=tok_dir)  # fmt: skip
    ctx.barrier()
    return final, merged if args.model.save_merged else None


def _gather_bad(bad: list[BadRow], ctx) -> list[BadRow]:
    if ctx.distributed:
        import torch.distributed as dist

        parts: list = [None] * ctx.world_size
        dist.all_gather_object(parts, bad)
        bad = [b for p in parts for b in p]
    seen, out = set(), []
    for b in bad:
        if (b.source, b.reason) not in seen:
            seen.add((b.source, b.reason))
            out.append(b)
    return out


def _report_bad(bad: list[BadRow], out: Path, log) -> None:
    if not bad:
        return
    path = out / "skipped_rows.txt"
    path.write_text("".join(f"{b}\n" for b in bad))
    shown = "\n".join(f"  {b}" for b in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    log(f"skipped {len(bad)} bad row(s) (listed in {path}):\n{shown}{more}")
