"""Issue 14 (README "Why the encoder reads so little"): does a CNN teacher's per-patch features, as dense
regression targets, make the nano ViT learn shapes and characters faster than the labels alone?
  python runs/encoder_distill_exp.py teacher OUT.pt [--steps 400]    # a fully convolutional teacher on the tiles
  python runs/encoder_distill_exp.py student NAME --teacher OUT.pt [--weight 1] [--steps 700]
  python runs/encoder_distill_exp.py student NAME --weight 0          # the same run without the teacher
Tile sets as in runs/encoder_vit_exp.py (ENC_EXP_CACHE); one thread by default."""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from encoder_vit_exp import schedule, tiles, train_step
from torch import nn

from internvl.nano.patches import CHARS, KINDS
from internvl.nano.vit import PatchBatch, PatchHead
from internvl.synth.scene import COLOR_NAMES

FEAT = 128  # the teacher's per-patch feature width


class Teacher(nn.Module):
    """Convolutions at half and quarter resolution, pooled onto the 16 x 16 patch grid, then a 3 x 3 convolution
    over the grid (each patch sees its neighbours): a [B, 256, FEAT] feature per patch and the patch head."""

    def __init__(self):
        super().__init__()
        g = nn.GELU
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), g(), nn.Conv2d(32, 32, 3, 1, 1), g(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, 1, 1), g(), nn.Conv2d(64, 64, 3, 1, 1), g(), nn.AdaptiveAvgPool2d(16),
            nn.Conv2d(64, FEAT, 3, 1, 1), g(), nn.Conv2d(FEAT, FEAT, 1))  # fmt: skip
        self.head = PatchHead(FEAT)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> dict:
        return self.head(self.features(x).float())


class Student(nn.Module):
    """The nano ViT with the patch head, and a linear map of its patch tokens onto the teacher's features."""

    def __init__(self, vision_model: nn.Module, dim: int):
        super().__init__()
        self.vision_model, self.head, self.to_teacher = vision_model, PatchHead(dim), nn.Linear(dim, FEAT)
        self.tokens = None

    def forward(self, x: torch.Tensor) -> dict:
        self.tokens = self.vision_model(x)[:, 1:].float()
        return self.head(self.tokens)


def evaluate(model: nn.Module, held: dict) -> tuple[float, float, float]:
    """Held-out accuracy on shape patches, character patches and colour patches."""
    hb = PatchBatch.of(held, slice(None))
    model.eval()
    out = {"kind": [], "char": [], "color": []}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(held["images"]), 64):
            p = model(hb.pixel_values[i : i + 64])
            for k, v in out.items():
                v.append(p[k].argmax(-1))
    model.train()
    pk, pc, pcol = (torch.cat(out[k]) for k in ("kind", "char", "color"))
    obj, txt, col = hb.kind > 2, hb.char >= 0, hb.color >= 0
    return tuple(float((p[m] == t[m]).float().mean()) for p, t, m in
                 ((pk, hb.kind, obj), (pc, hb.char, txt), (pcol, hb.color, col)))  # fmt: skip


def train(model, data, held, args, extra=None, name="") -> None:
    """The four patch losses, plus `args.weight` times extra(model, batch) when given."""
    opt = torch.optim.AdamW(model.parameters(), args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    lr_at, gen, t0, dist = schedule(args.lr, args.steps, 50), np.random.default_rng(0), time.time(), [None]

    def loss_of(parts: dict, b: PatchBatch) -> torch.Tensor:
        dist[0] = extra(model, b) if extra else None
        return sum(parts.values()) + (args.weight * dist[0] if dist[0] is not None else 0)

    for s in range(args.steps):
        _, _, loss = train_step(model, opt, data, gen, args.batch, lr_at(s), loss_of)
        if (s + 1) % 100 == 0 or s + 1 == args.steps:
            sh, ch, co = evaluate(model, held)
            d = f" distill {dist[0].item():.3f}" if dist[0] is not None else ""
            print(f"[{name}] step {s + 1} loss {loss.item():.3f}{d} | held shape {sh:.3f} char {ch:.3f} "
                  f"color {co:.3f} ({time.time() - t0:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("teacher", "student"))
    ap.add_argument("name")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--weight", type=float, default=1.0, help="the distillation loss's weight (0: labels only)")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    data, held = tiles(3000, 1), tiles(150, 777)
    print(f"data {time.time() - t0:.0f}s train views {len(data['images'])} held {len(held['images'])} "
          f"(kinds {len(KINDS)}, colors {len(COLOR_NAMES)}, chars {len(CHARS)})", flush=True)
    torch.manual_seed(0)
    if args.what == "teacher":
        model = Teacher()
        train(model, data, held, args, name=args.name)
        torch.save(model.state_dict(), args.name)
        return
    from internvl.checkpoint.io import build_model
    from internvl.checkpoint.layouts import read_config
    from internvl.model.llm import init_weights
    from internvl.tokenizer import Tokenizer

    init = "src/internvl/assets/nano"
    config = read_config(f"{init}/config.json")
    model = build_model(config, Tokenizer.from_dir(init).image_context_id, meta=False)
    init_weights(model)
    model.vision_model.init_from_scratch()
    student = Student(model.vision_model, config.vision.hidden_size)
    extra = None
    if args.weight > 0:
        teacher = Teacher()
        teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
        teacher.eval().requires_grad_(False)
        print(f"teacher held-out shape/char/color: {evaluate(teacher, held)}", flush=True)

        def extra(m: Student, b: PatchBatch) -> torch.Tensor:
            with torch.no_grad():
                target = F.layer_norm(teacher.features(b.pixel_values).float(), (FEAT,))
            return F.mse_loss(m.to_teacher(m.tokens), target)

    train(student, data, held, args, extra, args.name)


if __name__ == "__main__":
    main()
