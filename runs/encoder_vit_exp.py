"""Issue 14 (README "Why the encoder reads so little"): quick nano-ViT experiments on native-scale tiles (no
thumbnails): which recipe makes it learn shapes and characters per patch?
  python runs/encoder_vit_exp.py NAME [--lr 1e-3] [--steps 700] [--patch 7 --size 112 --max-num 12] [--mlp] [--only char]"""

import argparse
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

from internvl.nano.patches import sample_image, tiled_views

CACHE = os.environ.get("ENC_EXP_CACHE", "runs/encoder_exp")  # the tile sets (~1.4 GB each)


def tiles(n, seed, size=224, patch=14, max_num=4):
    path = f"{CACHE}/tiles_{n}_{seed}_{size}_{patch}_{max_num}.npz"
    if os.path.exists(path):
        return dict(np.load(path))
    rng = random.Random(seed)
    out = {"images": [], "kind": [], "char": [], "color": [], "box": []}
    for _ in range(n):
        image, labels, regions = sample_image(rng)
        vs = tiled_views(image, labels, regions, max_num, size, patch)
        if len(vs) > 1:
            vs = vs[:-1]
        for a, t in vs:
            out["images"].append(a)
            for k in ("kind", "char", "color", "box"):
                out[k].append(t[k])
    out = {k: np.stack(v) for k, v in out.items()}
    os.makedirs(CACHE, exist_ok=True)
    np.savez(path, **out)
    return out


def schedule(lr: float, steps: int, warmup: int):
    """Linear warmup, then cosine to zero at `steps`."""

    def at(s: int) -> float:
        if s < warmup:
            return lr * (s + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    return at


def train_step(model, opt, data, gen, batch, lr, loss_of):
    """One AdamW step at rate `lr` on `batch` random views of `data`: the loss is loss_of(parts, batch) of the four
    patch losses (gradients clipped to norm 1). Returns the parts, the read-out's accuracies and the loss."""
    from internvl.nano.vit import PatchBatch, patch_losses

    for g in opt.param_groups:
        g["lr"] = lr
    b = PatchBatch.of(data, gen.integers(0, len(data["images"]), batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts, acc = patch_losses(model, b)
        loss = loss_of(parts, b)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return parts, acc, loss


class PatchMLP(nn.Module):
    """No context: each 14x14 patch's pixels alone."""

    def __init__(self, dim=192):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(588, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, dim))

    def forward(self, x):  # [B,3,224,224] -> [B,1+256,dim]
        b = x.shape[0]
        p = x.unfold(2, 14, 14).unfold(3, 14, 14)  # B,3,16,16,14,14
        p = p.permute(0, 2, 3, 1, 4, 5).reshape(b, 256, 588)
        y = self.net(p)
        return torch.cat([y[:, :1] * 0, y], 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--init", default="scratch")
    ap.add_argument("--mlp", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--only", default="", help="train on this target alone (kind, color, char, box)")
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--max-num", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from internvl.checkpoint.io import build_model, load_weights
    from internvl.checkpoint.layouts import read_config
    from internvl.model.llm import init_weights
    from internvl.nano.vit import PatchBatch, PatchReadout
    from internvl.tokenizer import Tokenizer

    t0 = time.time()
    geo = (args.size, args.patch, args.max_num)
    data, held = tiles(args.n, 1, *geo), tiles(150, 777, *geo)
    print(f"[{args.name}] data {time.time() - t0:.0f}s train views {len(data['images'])} held {len(held['images'])}",
          flush=True)
    init = "/work/main/src/internvl/assets/nano" if args.init == "scratch" else args.init
    config = read_config(f"{init}/config.json")
    import dataclasses
    if (args.size, args.patch) != (224, 14):
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=args.size,
                                     patch_size=args.patch), force_image_size=args.size)
    torch.manual_seed(0)
    model = build_model(config, Tokenizer.from_dir(init).image_context_id, meta=False)
    if args.init == "scratch":
        init_weights(model)
        model.vision_model.init_from_scratch()
    else:
        load_weights(model, init, dtype=torch.float32)
    enc = PatchMLP() if args.mlp else model.vision_model
    ro = PatchReadout(enc, config.vision.hidden_size)
    if args.mlp:
        ro.forward = lambda x: ro.head(enc(x)[:, 1:].float())
    opt = torch.optim.AdamW(ro.parameters(), args.lr, betas=(0.9, 0.98), weight_decay=args.wd)

    lr_at = schedule(args.lr, args.steps, args.warmup)
    hb = PatchBatch.of(held, slice(None))
    gen = np.random.default_rng(0)
    acc_hist = []

    def evaluate():
        ro.eval()
        pk, pc = [], []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, len(held["images"]), 64):
                p = ro(hb.pixel_values[i : i + 64])
                pk.append(p["kind"].argmax(-1))
                pc.append(p["char"].argmax(-1))
        ro.train()
        pk, pc = torch.cat(pk), torch.cat(pc)
        obj, txt = hb.kind > 2, hb.char >= 0
        return float((pk[obj] == hb.kind[obj]).float().mean()), float((pc[txt] == hb.char[txt]).float().mean())

    for s in range(args.steps):
        parts, acc, loss = train_step(ro, opt, data, gen, args.batch, lr_at(s),
                                      lambda parts, b: parts[args.only] if args.only else sum(parts.values()))
        acc_hist.append({k: float(v[0]) / max(v[1], 1) for k, v in acc.items()})
        if (s + 1) % 100 == 0 or s + 1 == args.steps:
            last = acc_hist[-100:]
            tr = {k: sum(a[k] for a in last) / len(last) for k in ("kind_acc_objects", "char_acc")}
            sh, ch = evaluate()
            print(f"[{args.name}] step {s + 1} loss {loss.item():.3f} char {parts['char'].item():.3f} "
                  f"train kind_obj {tr['kind_acc_objects']:.3f} char {tr['char_acc']:.3f} | held shape {sh:.3f} "
                  f"char {ch:.3f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
