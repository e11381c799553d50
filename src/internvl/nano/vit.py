"""Dense supervised pretraining of the nano vision encoder on the targets of `nano/patches.py`, run by the one
training loop (`train/loop.py`: AdamW, warmup + cosine, bf16 autocast, atomic checkpoints), so a stopped run
continues with `resume=True`. The read-out is dropped at the end; the encoder keeps what it learned."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError
from ..model.projector import merge_and_project, pixel_shuffle
from ..processing.image import normalize
from ..synth.scene import COLOR_NAMES
from ..train.objective import Objective, ObjectiveOutput
from .patches import CHARS, KINDS, make_set

# Why: the official encoders come contrastively pretrained; the nano one starts from random weights, and a
# random frozen encoder leaves the language model to find 14-px shapes among 64 near-identical tokens (see
# configs/train/nano-stage0.yaml). Trained jointly with the language model from scratch it collapses. The
# generator knows what lies under every patch, so every patch of the view gets targets instead.

DONE = "vit_pretrain.json"  # written last: the summary of a finished run
HELD_OUT = 256  # images of the held-out set (seed + 1) that the summary reports on
TARGETS = ("kind", "color", "char", "box")
RESUME_KEYS = (
    "steps",
    "images",
    "batch",
    "lr",
    "seed",
    "train_encoder",
    "max_num",
    "keep_weights",
    "balance_kind",
    "through_projector",
    "hold",
)  # must match to resume


class PatchHead(nn.Module):
    """Linear read-outs of the patch tokens: kind, color, character and box sides."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, len(KINDS) + len(COLOR_NAMES) + len(CHARS) + 4)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.out(self.norm(tokens))
        a, b, c = len(KINDS), len(KINDS) + len(COLOR_NAMES), len(KINDS) + len(COLOR_NAMES) + len(CHARS)
        return {"kind": y[..., :a], "color": y[..., a:b], "char": y[..., b:c], "box": y[..., c:]}


class EmbedHead(nn.Module):
    """Linear read-outs of the image embeddings (the projector's output, what the language model receives): for
    each token, the kind, color and character of each of the 2x2 patches it merges, and its place on the tile."""

    def __init__(self, dim: int, tokens: int, merged: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.merged, self.sizes = merged, (len(KINDS), len(COLOR_NAMES), len(CHARS))
        self.out = nn.Linear(dim, merged * sum(self.sizes) + tokens)

    def forward(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.out(self.norm(embeds))  # [B, T, merged * (K + C + X) + T]
        per = y[..., : self.merged * sum(self.sizes)].unflatten(-1, (self.merged, sum(self.sizes)))
        kind, color, char = per.split(self.sizes, dim=-1)  # each [B, T, merged, n]
        return {"kind": kind, "color": color, "char": char, "place": y[..., self.merged * sum(self.sizes) :]}


class PatchReadout(nn.Module):
    """What the loop trains: the encoder and the read-out of its patch tokens (the CLS token is dropped).

    With `projector` (the model's mlp1 and its config) the projector trains too, and a second read-out asks the
    image embeddings for every patch's targets and each token's place (`EmbedHead`): the projector trained by the
    language loss alone drops what the language model has not learnt to use yet (see runs/probe_llm_inputs.py).
    `hold` > 0 adds hold * the mean squared change of the embeddings from the starting encoder's and projector's
    (over their variance), so that the language model above them keeps working."""

    def __init__(self, vision_model: nn.Module, dim: int, projector: nn.Module | None = None,
                 projector_cfg=None, grid: int = 0, hold: float = 0.0):  # fmt: skip
        super().__init__()
        self.vision_model = vision_model
        self.head = PatchHead(dim)
        self.projector, self.projector_cfg, self.hold = projector, projector_cfg, hold
        if projector is not None:
            # which patch each token's merged slots hold: pixel shuffle applied to the patch indices
            order = pixel_shuffle(torch.arange(grid * grid, dtype=torch.float32).reshape(1, grid, grid, 1),
                                  projector_cfg.downsample_ratio, projector_cfg.ps_version)  # fmt: skip
            order = order.reshape(-1, order.shape[-1]).long()  # [T, merged]
            self.register_buffer("order", order, persistent=False)
            self.embed_head = EmbedHead(projector[-1].out_features, order.shape[0], order.shape[1])
            # the starting encoder and projector, frozen and unregistered (not trained, not checkpointed)
            self.__dict__["reference"] = copy.deepcopy(
                nn.ModuleList([vision_model, projector])
            ).requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        vit = self.vision_model(pixel_values)
        out = self.head(vit[:, 1:].float())
        if self.projector is not None:
            embeds = merge_and_project(vit, self.projector, self.projector_cfg)
            out["embed"] = self.embed_head(embeds.float())
            if self.hold > 0:
                with torch.no_grad():
                    encoder, projector = self.reference
                    start = merge_and_project(encoder(pixel_values), projector, self.projector_cfg).float()
                out["hold"] = F.mse_loss(embeds.float(), start) / start.var().clamp_min(1e-6)
        return out


@dataclass
class PatchBatch:
    """A micro-batch: normalized images, per-patch targets, and host-side counts of the patches with each
    target (so that a batch without characters or objects needs no device sync to skip those losses)."""

    pixel_values: torch.Tensor  # float32 [B, 3, S, S]
    kind: torch.Tensor  # int64 [B, P], 0 = background
    color: torch.Tensor  # int64 [B, P], -1 where none
    char: torch.Tensor  # int64 [B, P], -1 where none
    box: torch.Tensor  # float32 [B, P, 4], distances to the object's sides in patches
    objects: int = 0  # patches with kind > 0
    colors: int = 0
    chars: int = 0

    @classmethod
    def of(cls, data: dict, idx: np.ndarray | slice) -> PatchBatch:
        t = {k: torch.from_numpy(np.ascontiguousarray(data[k][idx])) for k in TARGETS}
        return cls(normalize(data["images"][idx]), **t, objects=int((t["kind"] > 0).sum()),
                   colors=int((t["color"] >= 0).sum()), chars=int((t["char"] >= 0).sum()))  # fmt: skip

    @property
    def num_samples(self) -> int:
        return int(self.kind.shape[0])

    @property
    def num_tokens(self) -> int:  # patches: the loop's throughput is patches per second
        return int(self.kind.numel())

    def to(self, device: torch.device) -> PatchBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return PatchBatch(**moved)


def patch_losses(
    readout: nn.Module, b: PatchBatch, balance_kind: bool = False
) -> tuple[dict, dict[str, tuple[torch.Tensor, float]]]:
    """The four losses (cross-entropy on kind, color, character; smooth L1 on the box sides of object patches)
    and the read-out's accuracies as (sum, count) pairs. `balance_kind` adds a fifth: the kind cross-entropy
    over object patches alone, so that the background (most patches) no longer dominates what kind learns."""
    pred = readout(b.pixel_values)
    obj = b.kind > 0

    def ce(name: str, count: int) -> torch.Tensor:
        if not count:  # nothing of this target in the batch: no loss, every parameter still in the graph
            return pred[name].sum() * 0
        return F.cross_entropy(pred[name].flatten(0, 1), getattr(b, name).flatten(), ignore_index=-1)

    box = F.smooth_l1_loss(pred["box"][obj], b.box[obj]) if b.objects else pred["box"].sum() * 0
    parts = {"kind": ce("kind", b.num_tokens), "color": ce("color", b.colors), "char": ce("char", b.chars),
             "box": box}  # fmt: skip
    if balance_kind:
        parts["kind_objects"] = (F.cross_entropy(pred["kind"][obj], b.kind[obj]) if b.objects
                                 else pred["kind"].sum() * 0)  # fmt: skip
    embed_acc = {}
    if "embed" in pred:
        embed_parts, embed_acc = embed_losses(pred["embed"], b, readout.order, balance_kind)
        parts.update(embed_parts)
    if "hold" in pred:
        parts["hold"] = readout.hold * pred["hold"]
    with torch.no_grad():

        def hits(name: str, mask: torch.Tensor) -> torch.Tensor:
            return (pred[name].argmax(-1)[mask] == getattr(b, name)[mask]).sum().double()

        acc = {"kind_acc_objects": (hits("kind", obj), float(b.objects)),
               "color_acc": (hits("color", b.color >= 0), float(b.colors)),
               "char_acc": (hits("char", b.char >= 0), float(b.chars)),
               "box_l1": ((pred["box"][obj] - b.box[obj]).abs().sum().double(), 4.0 * b.objects)}  # fmt: skip
    return parts, {**acc, **embed_acc}


def embed_losses(pred: dict[str, torch.Tensor], b: PatchBatch, order: torch.Tensor,
                 balance_kind: bool) -> tuple[dict, dict[str, tuple[torch.Tensor, float]]]:  # fmt: skip
    """`patch_losses` for the image embeddings: each token's merged patches' kind, color and character
    (cross-entropy, the patch's targets gathered through the pixel-shuffle `order` [T, merged]), and the token's
    place on the tile (cross-entropy over its T slots)."""
    kind, color, char = (getattr(b, n)[:, order] for n in ("kind", "color", "char"))  # [B, T, merged]
    obj = kind > 0

    def ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
        return F.cross_entropy(logits[mask], target[mask]) if count else logits.sum() * 0

    place = torch.arange(order.shape[0], device=kind.device).expand(kind.shape[0], -1)
    parts = {"embed_kind": F.cross_entropy(pred["kind"].flatten(0, 2), kind.flatten()),
             "embed_color": ce(pred["color"], color, color >= 0, b.colors),
             "embed_char": ce(pred["char"], char, char >= 0, b.chars),
             "embed_place": F.cross_entropy(pred["place"].flatten(0, 1), place.flatten())}  # fmt: skip
    if balance_kind:
        parts["embed_kind_objects"] = ce(pred["kind"], kind, obj, b.objects)
    with torch.no_grad():

        def hits(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return (logits.argmax(-1)[mask] == target[mask]).sum().double()

        acc = {"embed_kind_acc_objects": (hits(pred["kind"], kind, obj), float(b.objects)),
               "embed_color_acc": (hits(pred["color"], color, color >= 0), float(b.colors)),
               "embed_char_acc": (hits(pred["char"], char, char >= 0), float(b.chars)),
               "embed_place_acc": (hits(pred["place"], place, torch.ones_like(place, dtype=torch.bool)),
                                   float(place.numel()))}  # fmt: skip
    return parts, acc


class PatchObjective(Objective):
    """The sum of the four losses (five with `balance_kind`), each a mean over its micro-batch (normalizer 1 per
    micro-batch)."""

    name = "vit_patches"
    bar_metrics = ("kind_acc_objects",)

    def __init__(self, balance_kind: bool = False):
        self.balance_kind = balance_kind

    def normalizer(self, batch: PatchBatch) -> float:
        return 1.0

    def __call__(self, model: nn.Module, batch: PatchBatch) -> ObjectiveOutput:
        parts, acc = patch_losses(model, batch, self.balance_kind)
        metrics = {k: (v.detach(), 1.0) for k, v in parts.items()}
        return ObjectiveOutput(sum(parts.values()), {**metrics, **acc})


def batch_source(pool: dict, batch: int, seed: int):
    """The loop's data: one micro-batch a step, reshuffled each pass over the pool; the position is the number
    of permutations drawn and the place in the last one, so a resumed run sees the same images."""
    n = len(pool["images"])

    def source(state: dict | None):
        perms, pos = (state or {}).get("perms", 1), (state or {}).get("pos", 0)
        gen = np.random.default_rng(seed)
        for _ in range(perms):
            order = gen.permutation(n)
        while True:
            if pos + batch > n:
                order, pos, perms = gen.permutation(n), 0, perms + 1
            idx = order[pos : pos + batch]
            pos += batch
            yield [PatchBatch.of(pool, idx)], {"perms": perms, "pos": pos}, perms - 1 + pos / n

    return source


def held_out_stats(
    readout: nn.Module, held: PatchBatch, device: torch.device, balance_kind: bool = False
) -> dict[str, float]:
    readout.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        parts, acc = patch_losses(readout, held.to(device), balance_kind)
    stats = {k: float(v) for k, v in parts.items()}
    return {**stats, **{k: float(s) / n if n else float("nan") for k, (s, n) in acc.items()}}


def check_sizes(steps: int, images: int, batch: int, save_every: int, held_out: int = HELD_OUT) -> None:
    for name, value, least in (("steps", steps, 1), ("images", images, 1), ("batch", batch, 1),
                               ("save_every", save_every, 0), ("held_out", held_out, 1)):  # fmt: skip
        if value < least:
            raise TrainingError(f"vision pretraining: {name} must be at least {least}, got {value}")


def pretrain(init: str | Path, out: str | Path, steps: int = 1200, images: int = 20000, batch: int = 32,
             lr: float = 1e-3, seed: int = 0, log_every: int = 50, save_every: int = 250,
             threads: int | None = None, data: str | Path | None = None, train_encoder: bool = True,
             progress: bool = False, resume: bool = False, stop_after: int = 0,
             device: str = "cpu", max_num: int = 1, keep_weights: bool = False,
             balance_kind: bool = False, compile: bool = False, through_projector: bool = False,
             hold: float = 1.0, held_out: int = HELD_OUT) -> dict:  # fmt: skip
    """Pretrain the encoder of `init`'s config on dense patch targets and write a model folder to `out`
    (config and tokenizer from `init`, the pretrained encoder, the rest initialized as `internvl finetune
    --init-from-config` would); also every `save_every` steps, with a checkpoint in OUT/checkpoints that
    `resume=True` continues from (`stop_after` ends the run early at that step, the schedule unchanged).
    `data` is the image cache (default OUT/vit_data.npz, written when missing). `train_encoder=False` trains
    the read-out alone on the encoder as initialized: the baseline (how much the random encoder's tokens
    already tell); it writes no model and no checkpoint. `progress` shows a bar for the image generation.
    `max_num` > 1 trains on the views of dynamic tiling (every tile at native scale, and the thumbnail) instead
    of the whole image squeezed into one tile. `keep_weights` starts from `init`'s weights (a trained model:
    its encoder continues, its projector and language model are written back unchanged). `balance_kind` adds
    the kind loss over object patches alone (see `patch_losses`). `compile` runs each vision layer through
    `torch.compile` (as `internvl finetune --compile`; it may change when a run resumes). `through_projector`
    trains the projector too, with read-outs of the image embeddings and `hold` (see `PatchReadout`); it needs
    `keep_weights` (the projector a language model was trained on). `held_out`: images of the held-out set the
    summary reports on."""
    from ..checkpoint.io import build_model, load_weights, save_model
    from ..checkpoint.layouts import read_config
    from ..model.llm import init_weights
    from ..tokenizer import Tokenizer
    from ..train.checkpoint import find_latest, load_checkpoint, read_state, save_checkpoint
    from ..train.dist import DistContext, pick_device
    from ..train.loop import LoopConfig, Trainer
    from ..train.metrics import MetricsLog
    from ..train.optim import build_optimizer

    check_sizes(steps, images, batch, save_every, held_out)
    if through_projector and not keep_weights:
        raise TrainingError("vision pretraining: --through-projector needs --keep-weights (a trained model's "
                            "projector to hold the embeddings near)")  # fmt: skip
    if hold < 0:
        raise TrainingError(f"vision pretraining: hold must be at least 0, got {hold}")
    if threads:
        torch.set_num_threads(threads)
    init, out = Path(init), Path(out)
    config = read_config(init / "config.json")
    tokenizer = Tokenizer.from_dir(init)
    ctx = DistContext(device=pick_device(device))
    run_args = {"steps": steps, "images": images, "batch": batch, "lr": lr, "seed": seed,
                "train_encoder": train_encoder, "init": str(init), "max_num": max_num,
                "keep_weights": keep_weights, "balance_kind": balance_kind,
                "through_projector": through_projector, "hold": hold if through_projector else 0.0}  # fmt: skip
    latest = find_latest(out) if train_encoder else None
    if latest is not None and not resume:
        raise TrainingError(f"{out} already has checkpoints (newest: {latest.name}); pass --resume to "
                            "continue or choose another --out")  # fmt: skip
    if latest is not None:
        before = read_state(latest).get("args", {})
        for k in RESUME_KEYS:
            if k in before and before[k] != run_args[k]:
                raise TrainingError(
                    f"cannot resume from {latest}: {k} was {before[k]!r}, now {run_args[k]!r}"
                )

    torch.manual_seed(seed)
    model = build_model(config, tokenizer.image_context_id, meta=False)
    if keep_weights:
        load_weights(model, init, dtype=torch.float32)
    else:
        init_weights(model)
        model.vision_model.init_from_scratch()
    cache = Path(data) if data else out / "vit_data.npz"
    if cache.exists():
        pool = dict(np.load(cache))
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        pool = make_set(images, seed, config.image_size, config.vision.patch_size, progress, max_num)
        np.savez(cache, **pool)
    if through_projector:
        readout = PatchReadout(model.vision_model, config.vision.hidden_size, model.mlp1, config.projector,
                               config.image_size // config.vision.patch_size, run_args["hold"])  # fmt: skip
        readout.reference.to(ctx.device)
    else:
        readout = PatchReadout(model.vision_model, config.vision.hidden_size)
    readout.to(ctx.device)
    readout.vision_model.requires_grad_(train_encoder)
    if compile:
        from ..train.compiled import compile_for_training

        compile_for_training(readout.vision_model)
    optimizer = build_optimizer(readout, lr, weight_decay=0.05, betas=(0.9, 0.98))

    start, position = 0, None
    if latest is not None:
        state, position = load_checkpoint(latest, readout, optimizer, ctx)
        start = int(state["step"])
        print(f"resumed from {latest} at step {start}")

    def save(step: int, position: dict) -> None:
        state = {"total_steps": steps, "args": run_args}
        save_checkpoint(out, step, readout, optimizer, ctx, state, position)
        if step < steps:  # a run stopped early leaves a usable encoder
            save_model(model, out, dtype="float32", tokenizer_dir=init)

    loop = LoopConfig(steps, min(100, steps // 10), lr, "cosine", 1.0, log_every, save_every, stop_after,
                      torch.bfloat16)  # fmt: skip
    metrics = MetricsLog(out, enabled=train_encoder, tensorboard=False, resume_step=start)
    source = batch_source(pool, batch, seed)
    trainer = Trainer(readout, optimizer, PatchObjective(balance_kind), source, ctx, loop, metrics,
                      save if train_encoder else None)  # fmt: skip
    ended = trainer.fit(start, position)
    metrics.close()
    result = {"steps": ended.step, "images": len(pool["images"]), "train_encoder": train_encoder}
    if ended.interrupted or ended.paused:
        stop = "interrupted" if ended.interrupted else "paused"  # a signal, or stop_after
        return {**result, stop: True, "checkpoint": str(out / "checkpoints")}
    held = make_set(held_out, seed + 1, config.image_size, config.vision.patch_size, max_num=max_num)
    held = PatchBatch.of(held, slice(None))
    result["held_out"] = held_out_stats(readout, held, ctx.device, balance_kind)
    if train_encoder:
        save_model(model, out, dtype="float32", tokenizer_dir=init)
        (out / DONE).write_text(json.dumps(result, indent=2) + "\n")  # the run finished (saves come earlier)
    return result
