"""Dense supervised pretraining of the nano vision encoder on Synthetic Visual World images.

The official encoders come contrastively pretrained; the nano one starts from random weights, and a random
frozen encoder leaves the language model to find 14-px shapes among 64 near-identical tokens (see
configs/train/nano-stage0.yaml). Trained jointly with the language model from scratch it collapses. This
module gives it what it lacks, cheaply: the generator knows what lies under every patch, so every one of the
256 patches of a 224-px view gets targets (what kind of thing covers it: background, text, a bar or one of
the five shapes; the shape's color; the character of a text patch; and the distances from the patch to the
four sides of the object's box, which tells apart touching instances and gives sizes). A linear read-out of
the last layer's patch tokens is trained on these, then dropped; the encoder keeps what it learned.

    python -m internvl.train.nano vit --init DIR --out DIR [--steps 1200] [--images 20000]

writes a model folder (config and tokenizer from --init, the pretrained encoder, the rest randomly
initialized as `internvl finetune --init-from-config` would) to train the next stages from.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..errors import TrainingError
from ..processing.image import dynamic_preprocess, normalize
from ..synth.builders import BUILDERS
from ..synth.chart import Chart, bar_boxes, layout, render_chart
from ..synth.render import pick_font, render_scene
from ..synth.scene import COLOR_NAMES, COLORS, SHAPES, Scene, fit_points

KINDS = ("background", "text", "bar") + SHAPES
CHARS = string.ascii_uppercase + string.digits
# builders whose images are single scenes or charts; multi_image gives several scenes, one is kept
SOURCES = ("color", "shape", "count", "position", "relation", "ocr", "grounding", "caption", "reasoning",
           "multi_image", "chart_value", "chart_max")  # fmt: skip
DONE = "vit_pretrain.json"  # written last: the summary of a finished run
MIN_COVER = 0.1  # a patch is labelled with the region covering the most of it, if that is >= 10% of it


@dataclass
class Region:
    kind: int
    color: int  # index into COLOR_NAMES, -1 where it does not apply
    char: int  # index into CHARS, -1 where it does not apply
    box: tuple[float, float, float, float]


def nearest_color(rgb: tuple[int, int, int]) -> int:
    def dist(name: str) -> int:
        return sum((a - b) ** 2 for a, b in zip(rgb, COLORS[name]))

    return min(range(len(COLOR_NAMES)), key=lambda i: dist(COLOR_NAMES[i]))


def _text_regions(scene: Scene) -> list[Region]:
    """One region per character, laid out exactly as `render.draw_text` draws the string."""
    t = scene.text
    x1, y1, x2, y2 = t.box
    font = pick_font(t.font_u, t.cap, x2 - x1 - 4, t.text)
    left, _, right, _ = font.getbbox(t.text, anchor="ls")
    cap_top = font.getbbox("H", anchor="ls")[1]
    base = y1 + 3 - cap_top
    x = x1 + (x2 - x1 - (right - left)) / 2 - left
    out = []
    for i, c in enumerate(t.text):
        a, b = x + font.getlength(t.text[:i]), x + font.getlength(t.text[: i + 1])
        out.append(Region(KINDS.index("text"), -1, CHARS.index(c), (a, base + cap_top, b, base)))
    return out


def _chart_regions(chart: Chart) -> list[Region]:
    *_, bottom, _, label = layout(chart)
    font = pick_font(chart.font_u, label)
    out = []
    for box, rgb, letter in zip(bar_boxes(chart), chart.colors, chart.letters):
        out.append(Region(KINDS.index("bar"), nearest_color(rgb), -1, box))
        cx, by = (box[0] + box[2]) / 2, bottom + 6 + label
        x0, y0, x1, y1 = font.getbbox(letter, anchor="ms")
        out.append(Region(KINDS.index("text"), -1, CHARS.index(letter), (cx + x0, by + y0, cx + x1, by + y1)))
    return out


def sample_image(rng: random.Random) -> tuple[Image.Image, np.ndarray, list[Region]]:
    """A training image drawn like the split's, its region map (0 background, k region k-1) and regions."""
    while True:
        made = BUILDERS[rng.choice(SOURCES)](rng, False)[0]
        if isinstance(made, list):
            made = rng.choice(made)
        if isinstance(made, (Scene, Chart)):
            break
    labels = Image.new("L", (made.width, made.height), 0)
    draw = ImageDraw.Draw(labels)
    if isinstance(made, Chart):
        image, regions = render_chart(made), _chart_regions(made)
        for k, r in enumerate(regions):
            draw.rectangle((r.box[0], r.box[1], r.box[2] - 1, r.box[3] - 1), fill=k + 1)
        return image, np.asarray(labels), regions
    image, regions = render_scene(made), []
    for o in made.objects:
        regions.append(Region(KINDS.index(o.shape), COLOR_NAMES.index(o.color), -1, o.box))
        x1, y1, x2, y2 = o.box
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=len(regions))
        else:
            draw.polygon(fit_points(o.shape, o.angle, o.box), fill=len(regions))
    if made.text is not None:
        for r in _text_regions(made):
            regions.append(r)
            draw.rectangle((r.box[0], r.box[1], r.box[2] - 1, r.box[3] - 1), fill=len(regions))
    return image, np.asarray(labels), regions


def patch_targets(labels: np.ndarray, regions: list[Region], image_size: int = 224, patch: int = 14) -> dict:
    """Per-patch targets on the `image_size` view (the whole image resized, as one tile is)."""
    h, w = labels.shape
    g = image_size // patch
    small = np.asarray(Image.fromarray(labels).resize((image_size, image_size), Image.Resampling.NEAREST))
    blocks = small.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    counts = np.stack([(blocks == k).sum(1) for k in range(len(regions) + 1)], 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    best[counts.max(1) < MIN_COVER * patch * patch] = 0
    kind = np.zeros(g * g, np.int64)
    color = np.full(g * g, -1, np.int64)
    char = np.full(g * g, -1, np.int64)
    box = np.zeros((g * g, 4), np.float32)
    sx, sy = image_size / w / patch, image_size / h / patch  # canvas pixels -> patch units
    centers = np.arange(g) + 0.5
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    for p in np.nonzero(best)[0]:
        r = regions[best[p] - 1]
        kind[p], color[p], char[p] = r.kind, r.color, r.char
        x1, y1, x2, y2 = r.box
        box[p] = (cx[p] - x1 * sx, cy[p] - y1 * sy, x2 * sx - cx[p], y2 * sy - cy[p])
    return {"kind": kind, "color": color, "char": char, "box": box}


def make_set(n: int, seed: int, image_size: int = 224, patch: int = 14, progress: bool = False) -> dict:
    """`n` images (uint8 [n, S, S, 3], resized as one tile is) with their patch targets."""
    from tqdm import tqdm

    rng = random.Random(seed)
    images, cols = [], {"kind": [], "color": [], "char": [], "box": []}
    for _ in tqdm(range(n), desc="vision pretraining images", unit="img", disable=not progress):
        image, labels, regions = sample_image(rng)
        tile = dynamic_preprocess(image, 1, 1, image_size, True)[0]
        images.append(np.asarray(tile, np.uint8))
        for k, v in patch_targets(labels, regions, image_size, patch).items():
            cols[k].append(v)
    return {"images": np.stack(images), **{k: np.stack(v) for k, v in cols.items()}}


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


def losses(vit: nn.Module, head: PatchHead, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    tokens = vit(normalize(batch["images"]))[:, 1:]  # drop CLS
    pred = head(tokens.float())
    t = {k: torch.from_numpy(batch[k]) for k in ("kind", "color", "char", "box")}
    obj = t["kind"] > 0
    parts = {
        "kind": F.cross_entropy(pred["kind"].flatten(0, 1), t["kind"].flatten()),
        "color": F.cross_entropy(pred["color"].flatten(0, 1), t["color"].flatten(), ignore_index=-1),
        "char": F.cross_entropy(pred["char"].flatten(0, 1), t["char"].flatten(), ignore_index=-1),
        "box": F.smooth_l1_loss(pred["box"][obj], t["box"][obj]) if obj.any() else pred["box"].sum() * 0,
    }
    parts = {k: v if torch.isfinite(v) else v.new_zeros(()) for k, v in parts.items()}  # no chars in a batch
    with torch.no_grad():
        acc = {
            "kind_acc_objects": (pred["kind"].argmax(-1)[obj] == t["kind"][obj]).float().mean().item(),
            "color_acc": _masked_acc(pred["color"], t["color"]),
            "char_acc": _masked_acc(pred["char"], t["char"]),
            "box_l1": (pred["box"][obj] - t["box"][obj]).abs().mean().item() if obj.any() else 0.0,
        }
    return sum(parts.values()), {**{k: float(v.detach()) for k, v in parts.items()}, **acc}


def _masked_acc(logits: torch.Tensor, target: torch.Tensor) -> float:
    m = target >= 0
    return (logits.argmax(-1)[m] == target[m]).float().mean().item() if m.any() else float("nan")


def _take(data: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in data.items()}


def pretrain(init: str | Path, out: str | Path, steps: int = 1200, images: int = 20000, batch: int = 32,
             lr: float = 1e-3, seed: int = 0, log_every: int = 50, save_every: int = 250,
             threads: int | None = None, data: str | Path | None = None,
             train_encoder: bool = True, progress: bool = False) -> dict:  # fmt: skip
    """Pretrain the encoder of `init`'s config on dense patch targets; write a model folder to `out` (also
    every `save_every` steps, so that a run stopped early leaves a usable encoder). `data` is the image cache
    (default OUT/vit_data.npz, written when missing). `train_encoder=False` trains the read-out alone on the
    encoder as initialized: the baseline (how much the random encoder's tokens already tell) and writes
    nothing. `progress` shows bars for the image generation and the steps."""
    from tqdm import tqdm

    from ..checkpoint.io import build_model, save_model
    from ..config import ModelConfig
    from ..model.llm import init_weights
    from ..tokenizer import Tokenizer

    for name, value, least in (("steps", steps, 1), ("images", images, 1), ("batch", batch, 1),
                               ("save_every", save_every, 0)):  # fmt: skip
        if value < least:
            raise TrainingError(f"vision pretraining: {name} must be at least {least}, got {value}")
    if threads:
        torch.set_num_threads(threads)
    init, out = Path(init), Path(out)
    config = ModelConfig.from_file(init / "config.json")
    tokenizer = Tokenizer.from_dir(init)
    torch.manual_seed(seed)
    model = build_model(config, tokenizer.image_context_id, meta=False)
    init_weights(model)
    model.vision_model.init_from_scratch()
    vit = model.vision_model.train()
    vcfg = config.vision
    patch = vcfg.patch_size
    cache = Path(data) if data else out / "vit_data.npz"
    if cache.exists():
        pool = dict(np.load(cache))
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        pool = make_set(images, seed, config.image_size, patch, progress=progress)
        np.savez(cache, **pool)
    held = make_set(256, seed + 1, config.image_size, patch)
    head = PatchHead(vcfg.hidden_size)
    vit.requires_grad_(train_encoder)
    params = [p for p in vit.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warm = min(100, steps // 10)

    def schedule(s: int) -> float:  # linear warmup, then cosine to zero
        return (
            (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = np.random.default_rng(seed)
    n = len(pool["images"])
    order, pos, t0 = gen.permutation(n), 0, time.time()
    bar = tqdm(range(1, steps + 1), desc="vision pretraining", unit="step", disable=not progress)
    for step in bar:
        if pos + batch > n:
            order, pos = gen.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        b = _take(pool, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, stats = losses(vit, head, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            shown = " ".join(f"{k} {v:.3f}" for k, v in stats.items())
            bar.write(f"step {step}/{steps} loss {loss.item():.4f} {shown} ({time.time() - t0:.0f}s)")
        if train_encoder and save_every and step % save_every == 0 and step < steps:
            save_model(model, out, dtype="float32", tokenizer_dir=init)
    vit.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, held_stats = losses(vit, head, held)
    result = {"steps": steps, "images": n, "train_encoder": train_encoder, "held_out": held_stats}
    if train_encoder:
        save_model(model, out, dtype="float32", tokenizer_dir=init)
        (out / DONE).write_text(json.dumps(result, indent=2) + "\n")  # the run finished (saves come earlier)
    return result
