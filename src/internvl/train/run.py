"""`train(args)`: a whole run from arguments (the `internvl finetune` verb is a thin wrapper around it).

Model (a checkpoint, or random weights from a config) -> trainable parameters (freezing, LoRA) -> data
(meta JSON, validation, loader) -> optional FSDP2 sharding -> AdamW -> resume -> the loop -> the final model
(merged weights, or the LoRA adapter and optionally the merged weights) plus metrics and a loss curve.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainingError
from .args import TrainArgs
from .data import BadRow
from .prepare import Prepared, prepare_model

# arguments that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "save_every", "keep_last", "log_every", "tensorboard", "num_workers", "threads",
                     "device", "save_layout", "save_dtype", "save_merged", "out", "stop_after",
                     "compile"}  # fmt: skip
FINAL, MERGED = "final", "merged"


@dataclass
class TrainResult:
    out: Path
    steps: int
    total_steps: int
    interrupted: bool = False
    paused: bool = False  # ended at --stop-after; --resume continues
    final: Path | None = None  # the model folder (the adapter folder for LoRA)
    merged: Path | None = None
    last_loss: float | None = None
    skipped: list[BadRow] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


@dataclass
class DataSource:
    """What the loop reads: `source(position)` yields (micro-batches, position after, epoch) per step."""

    source: Callable
    total_steps: int
    rows: int
    bad: list[BadRow]  # rows skipped while scanning; `source.bad` collects those that fail to load


def train(args: TrainArgs, objective=None, data: Callable | None = None,
          log: Callable[[str], None] = print) -> TrainResult:  # fmt: skip
    """Run training as configured by `args` (under torchrun: one call per process).

    `objective` defaults to SFT with `args.data.loss_reduction`; `data(args, prepared, ctx) -> DataSource`
    defaults to the SFT rows of `args.data.data`. Preference optimization passes its own of both.
    """
    from .dist import init_distributed, shutdown

    args = _resolve_hub_model(args)
    ctx = init_distributed(args.run.device)
    try:
        result = _train(args, objective, data or sft_data, ctx, log if ctx.is_main else (lambda _msg: None))
        # every rank leaves together: a rank that tore the group down while its peer was still writing the
        # final model made gloo abort the peer at exit ("terminate called without an active exception")
        ctx.barrier()
        return result
    finally:
        shutdown()


def _resolve_hub_model(args: TrainArgs) -> TrainArgs:
    """A Hub MODEL id (at --revision) becomes its local snapshot, downloaded if needed; folders stay as given."""
    from ..checkpoint.hub import is_hub_id, resolve_model

    m = args.model
    if m.model is None or (m.revision is None and not is_hub_id(m.model)):
        return args
    folder = resolve_model(m.model, m.revision)
    return replace(args, model=replace(m, model=str(folder), revision=None))


def _train(args: TrainArgs, objective, data: Callable, ctx, log) -> TrainResult:
    from .checkpoint import find_latest

    out, r = Path(args.model.out), args.run
    latest = find_latest(out)
    if latest is not None and not r.resume:
        raise TrainingError(f"{out} already has checkpoints (newest: {latest.name}); pass --resume to continue "
                            "or choose another --out")  # fmt: skip
    if latest is None and (out / FINAL).exists() and not r.resume:
        raise TrainingError(f"{out / FINAL} already exists; choose another --out")
    if r.resume and latest is None:
        log(f"no checkpoint in {out}: starting at step 0")
    threads = _threads(args, ctx)
    if threads:
        torch.set_num_threads(threads)
    random.seed(r.seed)
    np.random.seed(r.seed)
    torch.manual_seed(r.seed)
    prepared = prepare_model(args, ctx, log)
    source = data(args, prepared, ctx)
    o = args.optim
    log(f"data: {source.rows} rows" + (f", {len(source.bad)} bad rows skipped" if source.bad else "")
        + f"; {source.total_steps} steps x {o.batch_size * o.grad_accum * ctx.world_size} "
        + ("packed sequences" if args.data.packing else "samples") + " per step")  # fmt: skip
    return run_loop(args, prepared, source, objective, ctx, log, latest if r.resume else None)


def sft_data(args: TrainArgs, prepared: Prepared, ctx) -> DataSource:
    """The rows of the meta file as padded or packed micro-batches for this rank."""
    from .collate import Collator, Packer
    from .data import build_index, read_meta
    from .dataset import SampleOptions, SFTDataset, pad_token_id
    from .stream import PackedBatches, PaddedBatches, PaddedPlan

    d, o, seed = args.data, args.optim, args.run.seed
    cfg, tokenizer = prepared.model.config, prepared.tokenizer
    index = build_index(read_meta(d.data), d.skip_bad_rows, progress=ctx.is_main)
    options = SampleOptions.for_model(cfg, d, seed)
    dataset = SFTDataset(index, tokenizer, cfg, options)
    pad_id = pad_token_id(tokenizer)
    collator = Collator(pad_id, dataset.dummy, packed=d.packing)
    pin = ctx.device.type == "cuda"
    if d.packing:
        total = o.max_steps
        source = PackedBatches(dataset, collator, Packer(d.max_packed_tokens, d.max_packed_images), len(index),
                               seed, o.batch_size, o.grad_accum, ctx.world_size, ctx.rank, d.skip_bad_rows,
                               d.num_workers, pin)  # fmt: skip
    else:
        plan = PaddedPlan(len(index), seed, o.batch_size, o.grad_accum, ctx.world_size, ctx.rank)
        total = o.max_steps or max(1, math.ceil(o.epochs * plan.steps_per_epoch))
        source = PaddedBatches(dataset, collator, plan, total, d.skip_bad_rows, d.num_workers, pin)
    return DataSource(source, total, len(index), list(index.bad))


def training_objective(args: TrainArgs):
    """The objective `args` train with: SFT, plus the binding loss and its readouts when --binding-loss > 0."""
    from .objective import SFTObjective

    if args.data.binding_loss > 0:
        from .binding import BindingObjective, parse_heads

        d = args.data
        more = {name: parse_heads(spec, flag) if spec else [] for name, spec, flag in d.more_binding_heads()}
        return BindingObjective(d.loss_reduction, d.binding_loss, parse_heads(d.binding_heads), **more,
                                 count_sinks=d.count_sinks(), place_xy_layer=d.binding_place_xy_layer,
                                 place_xy_weight=d.binding_place_xy_loss,
                                 place_xy_word_layer=d.binding_place_xy_word_layer,
                                 count_xy_layer=d.binding_count_xy_layer,
                                 match_xy_layer=d.binding_match_xy_layer,
                                 count_word_sinks=d.count_sinks(word=True),
                                 count_xy_word_layer=d.binding_count_xy_word_layer,
                                 letter_xy_layer=d.binding_letter_xy_layer,
                                 count_weight=d.binding_count_weight,
                                 option_letter_xy_layer=d.binding_option_letter_xy_layer,
                                 box_xy_layer=d.binding_box_xy_layer,
                                 object_xy_layer=d.binding_object_xy_layer,
                                 object_weight=d.binding_object_xy_weight,
                                 region_xy_layer=d.binding_region_xy_layer)  # fmt: skip
    return SFTObjective(args.data.loss_reduction)


def run_loop(args: TrainArgs, prepared: Prepared, data: DataSource, objective, ctx, log,
             resume_from: Path | None = None) -> TrainResult:  # fmt: skip
    """Shard (several processes), build AdamW, resume, train, then write the final model."""
    from .checkpoint import load_checkpoint, read_state, save_checkpoint
    from .dist import shard_model
    from .loop import LoopConfig, Trainer
    from .metrics import MetricsLog, plot_loss
    from .optim import build_optimizer, warmup_steps

    m, o, r = args.model, args.optim, args.run
    out, model, total, compute = Path(m.out), prepared.model, data.total_steps, prepared.compute_dtype
    if ctx.distributed:
        shard_model(model, compute if compute != torch.float32 else None)
    if r.compile:
        from .compiled import compile_for_training

        log(f"torch.compile: {compile_for_training(model)} modules (the first step builds their kernels)")
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), o.adam_eps)
    objective = objective or training_objective(args)
    objective.setup(model, ctx.device)

    start_step, data_state = 0, None
    if resume_from is not None:
        state = read_state(resume_from)
        _check_resumable(state, args, total, ctx.world_size, resume_from)
        _, data_state = load_checkpoint(resume_from, model, optimizer, ctx)
        start_step = int(state["step"])
        log(f"resumed from {resume_from} at step {start_step}")

    metrics = MetricsLog(out, ctx.is_main, r.tensorboard, resume_step=start_step)
    if metrics.note:
        log(metrics.note)
    from_scratch = m.init_from_config is not None

    def save(step: int, state: dict) -> None:
        save_checkpoint(out, step, model, optimizer, ctx, {"total_steps": total, "args": args.to_dict()}, state,
                        r.keep_last, trainable_only=not from_scratch)  # fmt: skip

    loop_cfg = LoopConfig(total, warmup_steps(total, o.warmup_ratio, o.warmup_steps), o.lr, o.lr_scheduler,
                          o.max_grad_norm, r.log_every, r.save_every, r.stop_after, compute)  # fmt: skip
    result = Trainer(model, optimizer, objective, data.source, ctx, loop_cfg, metrics, save).fit(
        start_step, data_state
    )
    metrics.close()

    res = TrainResult(out, result.step, total, result.interrupted, result.paused, last_loss=result.last_loss,
                      history=result.history)  # fmt: skip
    res.skipped = _gather_bad(data.bad + list(getattr(data.source, "bad", [])), ctx)
    if ctx.is_main:
        plot_loss(out / "metrics.csv", out / "loss.png")
        _report_bad(res.skipped, out, log)
    if result.interrupted or result.paused:
        log(
            f"stopped at step {result.step} of {total}: checkpoint in {out / 'checkpoints'}; continue with --resume"
        )
        return res
    save_dtype = m.save_dtype or _dtype_name(prepared.base_dtype)
    if prepared.tune.uses_lora:
        res.final, res.merged = _save_lora(prepared, args, ctx, out, save_dtype)
    else:
        res.final = _save_full(prepared, args, ctx, out, save_dtype)
    loss = f"final loss {result.last_loss:.4f}" if result.last_loss is not None else "nothing left to train"
    log(f"done: {result.step} steps, {loss}; model in {res.final}"
        + (f", merged model in {res.merged}" if res.merged else ""))  # fmt: skip
    return res


def _threads(args: TrainArgs, ctx) -> int | None:
    """Intra-op threads. More threads than free cores makes OpenMP spin against the data workers (or other
    jobs): a step can get 10x slower, so by default the trainer leaves one core per worker."""
    if args.run.threads:
        return args.run.threads
    if ctx.device.type != "cpu" or ctx.distributed or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) - args.data.num_workers)


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
        raise TrainingError(
            f"cannot resume from {path}: {state['total_steps']} total steps then, {total} now"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _save_full(prepared: Prepared, args: TrainArgs, ctx, out: Path, save_dtype: str) -> Path:
    from ..checkpoint.io import build_model, save_model
    from .dist import full_state_dict, is_sharded

    model, tokenizer, tok_dir = prepared.model, prepared.tokenizer, prepared.tokenizer_dir
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


def _save_lora(
    prepared: Prepared, args: TrainArgs, ctx, out: Path, save_dtype: str
) -> tuple[Path, Path | None]:
    from ..checkpoint.adapter import load_adapter_model
    from ..checkpoint.io import save_model
    from .dist import full_state_dict
    from .lora import lora_config, save_adapter

    t, model, tok_dir = args.tune, prepared.model, prepared.tokenizer_dir
    modules_to_save = prepared.modules_to_save
    state = full_state_dict(model, trainable_only=True)
    final, merged = out / FINAL, None
    if ctx.is_main:
        base = str(Path(args.model.model).resolve())
        config = lora_config(t.lora_r, t.vision_lora_r, t.lora_alpha, t.lora_dropout, modules_to_save, base)
        save_adapter(final, state, config, dtype=torch.bfloat16 if args.model.save_dtype == "bf16" else None)
        if args.model.save_merged:
            merged = out / MERGED
            model_merged, _, _ = load_adapter_model(final, base, dtype=save_dtype)
            model_merged.config = model.config
            save_model(model_merged, merged, layout=args.model.save_layout, tokenizer_dir=tok_dir)
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
