"""Where is each object, as the language model sees it? For scene images of a split (rows with `meta.objects`):
the hidden states of each object's image tokens (mean over the tokens whose cell overlaps its box, in every tile
and the thumbnail, or in the thumbnail only) at the input of every decoder layer and after the last, and fresh
linear probes for the object's column and row thirds of the canvas (the position task's 3x3 grid is both). If a
probe reads the place well at a layer, an attention head there can fetch it from the object; if it cannot, the
position and relation answers have nothing to compare.

    OMP_NUM_THREADS=1 python runs/place_probe.py MODEL --data SPLIT_DIR [--images 400]

Held out: the objects of the last fifth of the images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import internvl
from internvl.processing.image import choose_grid
from internvl.train.binding import object_tokens


def third(v: float, size: float) -> int:
    return min(2, int(3 * v / size))


def ridge(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, strength: float = 300.0) -> torch.Tensor:
    """The predictions for every row of a ridge regression of y on x (standardised features) fitted on `train`."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-5
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1)], 1).double()
    a = z[train]
    w = torch.linalg.solve(a.T @ a + strength * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y[train].double())
    return (z @ w).float()


def fit(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a fresh softmax probe (standardised features, L2) trained on the rows `train`."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-5
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(z[train] @ w + b, y[train]) + 1e-3 * (w**2).sum()
        loss.backward()
        opt.step()
    test = ~train
    return float(((z[test] @ w + b).argmax(-1) == y[test]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="a split folder with scene-task jsonl files")
    ap.add_argument("--tasks", default="position,relation,color,shape")
    ap.add_argument("--images", type=int, default=400)
    args = ap.parse_args()
    model = internvl.load(args.model, dtype="fp32", optimize=False)
    vlm = model.model.eval()
    cfg = vlm.config
    layers = vlm.language_model.model.layers
    captured: list[torch.Tensor] = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda mod, a: captured.append(a[0][0].detach()))
    layers[-1].register_forward_hook(lambda mod, a, out: captured.append(out[0].detach()))
    ctx = model.tokenizer.image_context_id
    n_tok = vlm.num_image_token
    rows = []
    per_task = args.images // len(args.tasks.split(",")) + 1
    for task in args.tasks.split(","):
        lines = (Path(args.data) / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()[:per_task]
        rows += [json.loads(line) for line in lines]
    feats_all: list[list[torch.Tensor]] = []  # per object: [layers+1, H] all tiles
    feats_thumb: list[list[torch.Tensor]] = []
    cols, rws = [], []
    image_of = []
    for i, row in enumerate(rows[: args.images]):
        meta = row["meta"]
        w, h = meta["size"]
        ids, pv, _ = model.prepare("Describe.", str(Path(args.data) / row["image"]))
        ids_t = torch.tensor(ids)
        captured.clear()
        with torch.no_grad():
            vlm(ids_t[None], pixel_values=pv)
        image = (ids_t == ctx).nonzero().squeeze(1)
        pc = cfg.processor
        grid = choose_grid(w, h, pc.min_dynamic_patch, pc.max_dynamic_patch, cfg.force_image_size)
        tiles = grid[0] * grid[1]
        states = torch.stack([c[image] for c in captured])  # [L+1, T_img, H]
        for color, shape, box in meta["objects"]:
            offs = sorted(object_tokens(box, w, h, grid, cfg.force_image_size, n_tok))
            if not offs:
                continue
            thumb = [o for o in offs if o >= tiles * n_tok] if tiles > 1 else offs
            feats_all.append(states[:, offs].mean(1))
            feats_thumb.append(states[:, thumb].mean(1) if thumb else states[:, offs].mean(1))
            cols.append(third((box[0] + box[2]) / 2, w))
            rws.append(third((box[1] + box[3]) / 2, h))
            image_of.append(i)
    n_img = max(image_of) + 1
    train = torch.tensor(image_of) < int(0.8 * n_img)
    xa, xt = torch.stack(feats_all), torch.stack(feats_thumb)  # [N, L+1, H]
    yc, yr = torch.tensor(cols), torch.tensor(rws)
    print(f"{len(cols)} objects of {n_img} images; held out {int((~train).sum())}; chance ~0.33 each")
    print("layer  col(all)  row(all)  col(thumb)  row(thumb)")
    for layer in range(xa.shape[1]):
        accs = [fit(x[:, layer], y, train, 3) for x in (xa, xt) for y in (yc, yr)]
        name = f"in {layer}" if layer < len(layers) else "out"
        print(f"{name:>6}  {accs[0]:.3f}     {accs[1]:.3f}     {accs[2]:.3f}       {accs[3]:.3f}")


if __name__ == "__main__":
    main()
