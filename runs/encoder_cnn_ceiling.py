"""Issue 14 (README "Why the encoder reads so little"): the vit4 read-out's accuracy on tiles and thumbnails, and
the label ceiling: a small CNN on each patch's 3x3-patch neighbourhood (pixels) at native scale.
  python runs/encoder_cnn_ceiling.py eval CKPT_DIR INIT_DIR      # vit4 head: tiles vs thumbnails
  python runs/encoder_cnn_ceiling.py cnn                          # CNN ceiling for char and shape on tiles"""

import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from internvl.nano.patches import CHARS, KINDS, sample_image, tiled_views


def views(n, seed, max_num=4):
    rng = random.Random(seed)
    imgs, kind, char, thumb = [], [], [], []
    for _ in range(n):
        image, labels, regions = sample_image(rng)
        vs = tiled_views(image, labels, regions, max_num)
        for i, (a, t) in enumerate(vs):
            imgs.append(a)
            kind.append(t["kind"])
            char.append(t["char"])
            thumb.append(len(vs) > 1 and i == len(vs) - 1)
    return np.stack(imgs), np.stack(kind), np.stack(char), np.array(thumb)


def eval_vit(ckpt, init):
    from safetensors.torch import load_file

    from internvl.checkpoint.io import build_model
    from internvl.checkpoint.layouts import read_config
    from internvl.nano.vit import PatchReadout
    from internvl.processing.image import normalize
    from internvl.tokenizer import Tokenizer

    config = read_config(f"{init}/config.json")
    model = build_model(config, Tokenizer.from_dir(init).image_context_id, meta=False)
    ro = PatchReadout(model.vision_model, config.vision.hidden_size)
    ro.load_state_dict(load_file(f"{ckpt}/model.safetensors"), strict=False)
    ro.eval()
    imgs, kind, char, thumb = views(200, 777)
    pk, pc = [], []
    with torch.no_grad():
        for i in range(0, len(imgs), 32):
            p = ro(normalize(imgs[i : i + 32]))
            pk.append(p["kind"].argmax(-1).numpy())
            pc.append(p["char"].argmax(-1).numpy())
    pk, pc = np.concatenate(pk), np.concatenate(pc)
    for name, sel in (("tiles", ~thumb), ("thumbs", thumb)):
        k, c = kind[sel], char[sel]
        obj = (k > 2)
        txt = c >= 0
        print(f"{name}: views {sel.sum()} shape-acc {(pk[sel][obj] == k[obj]).mean():.3f} (n {obj.sum()}) "
              f"char-acc {(pc[sel][txt] == c[txt]).mean():.3f} (n {txt.sum()}) "
              f"kind-acc-all {(pk[sel] == k).mean():.3f}")


def crops(imgs, lab, want, patch=14):
    """42x42 crops (3x3 patches) around each patch whose label `want` selects."""
    s = imgs.shape[1]
    g = s // patch
    pad = np.pad(imgs, ((0, 0), (patch, patch), (patch, patch), (0, 0)))
    xs, ys = [], []
    for v, p in zip(*np.nonzero(want(lab))):
        r, c = divmod(p, g)
        xs.append(pad[v, r * patch : r * patch + 3 * patch, c * patch : c * patch + 3 * patch])
        ys.append(lab[v, p])
    return np.stack(xs), np.array(ys)


class CNN(nn.Module):
    def __init__(self, classes):
        super().__init__()
        ch = 32
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * ch, 2 * ch, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * ch, 2 * ch, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(2 * ch, classes))

    def forward(self, x):
        return self.net(x)


def cnn():
    t0 = time.time()
    imgs, kind, char, thumb = views(1500, 1)
    imgs, kind, char = imgs[~thumb], kind[~thumb], char[~thumb]
    timgs, tkind, tchar, tthumb = views(200, 777)
    timgs, tkind, tchar = timgs[~tthumb], tkind[~tthumb], tchar[~tthumb]
    print(f"data {time.time() - t0:.0f}s tiles {len(imgs)}", flush=True)
    for name, lab, tlab, want, classes in (
        ("char", char, tchar, lambda a: a >= 0, len(CHARS)),
        ("shape", kind, tkind, lambda a: a > 2, len(KINDS)),
    ):
        x, y = crops(imgs, lab, want)
        tx, ty = crops(timgs, tlab, want)
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5
        tx = torch.from_numpy(tx).permute(0, 3, 1, 2).float() / 255 - 0.5
        y, ty = torch.from_numpy(y), torch.from_numpy(ty)
        print(f"{name}: train {len(y)} test {len(ty)}", flush=True)
        torch.manual_seed(0)
        m = CNN(classes)
        opt = torch.optim.AdamW(m.parameters(), 2e-3)
        steps = 1000
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
        for s in range(steps):
            idx = torch.randint(0, len(y), (128,))
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if (s + 1) % 500 == 0:
                with torch.no_grad():
                    acc = (m(tx).argmax(-1) == ty).float().mean().item()
                print(f"  {name} step {s + 1} loss {loss.item():.3f} test-acc {acc:.3f} ({time.time() - t0:.0f}s)",
                      flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "eval":
        eval_vit(sys.argv[2], sys.argv[3])
    else:
        cnn()
