"""What the language model is given: fresh linear probes on a model's image embeddings (the projector's output, one
token per 2x2 patches) for the object kind (and, among tokens of shapes, which shape), its colour and the token's
place in the tile, next to the same probes on the encoder's patch tokens. If a probe reads a property well from the
embeddings, the language model has it within one attention hop and a wrong answer about it is the language model's
doing.

    OMP_NUM_THREADS=1 python runs/probe_llm_inputs.py [MODEL] [--images 300] [--steps 400]

Targets come from the generator (internvl.nano.patches): a token's kind and colour are those of the most frequent
object among its four patches (tokens of background alone are left out of those two probes); its place is its row
and column on the tile's 8x8 grid (64 classes, every token). Held out: the views of the last fifth of the images.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import internvl
from internvl.model.projector import pixel_shuffle
from internvl.nano.patches import KINDS, SHAPES, make_set
from internvl.processing.image import normalize
from internvl.synth.scene import COLOR_NAMES


def token_targets(kind: np.ndarray, color: np.ndarray, grid: int) -> dict[str, np.ndarray]:
    """Per-patch targets [V, grid*grid] -> per-token targets [V, (grid/2)^2]: the most frequent object kind (and
    its colour) among each token's 2x2 patches, -1 where all four are background; the token's index on its grid."""
    v = kind.shape[0]
    k = kind.reshape(v, grid // 2, 2, grid // 2, 2).transpose(0, 1, 3, 2, 4).reshape(v, -1, 4)
    c = color.reshape(v, grid // 2, 2, grid // 2, 2).transpose(0, 1, 3, 2, 4).reshape(v, -1, 4)
    out_k = np.full(k.shape[:2], -1, np.int64)
    out_c = np.full(k.shape[:2], -1, np.int64)
    for i, j in zip(*np.nonzero((k > 0).any(-1))):
        ks = k[i, j][k[i, j] > 0]
        best = np.bincount(ks).argmax()
        out_k[i, j] = best
        out_c[i, j] = c[i, j][k[i, j] == best][0]
    place = np.broadcast_to(np.arange(k.shape[1]), k.shape[:2]).copy()
    return {"kind": out_k, "color": out_c, "place": place}


def patch_place(kind: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.arange(kind.shape[1]), kind.shape).copy()


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int, steps: int) -> float:
    """Held-out accuracy of a linear read-out trained with Adam on the rows of `train` (targets -1 ignored)."""
    keep = y >= 0
    xtr, ytr = x[train & keep], y[train & keep]
    xte, yte = x[~train & keep], y[~train & keep]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(len(xtr), (min(4096, len(xtr)),))
        loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(xte).argmax(-1) == yte).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=4242)
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    m = internvl.load(a.model, optimize=False).model.eval()
    size, patch = m.config.image_size, m.config.vision.patch_size
    grid = size // patch
    # views of each image kept together so that held-out views come from held-out images
    parts = [make_set(1, a.seed + i, size, patch, max_num=4) for i in range(a.images)]
    cut = int(a.images * 0.8)
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n_train_views = sum(len(p["images"]) for p in parts[:cut])
    views = len(data["images"])
    feats, merged, embeds = [], [], []
    cfg = m.config.projector
    with torch.no_grad():
        for s in range(0, views, 32):
            px = normalize(data["images"][s : s + 32])
            vit = m.vision_model(px, select_layer=m.config.select_layer)
            feats.append(vit[:, 1:].float())  # the CLS token dropped, as the projector does
            x = pixel_shuffle(
                vit[:, 1:].reshape(len(px), grid, grid, -1), cfg.downsample_ratio, cfg.ps_version
            )
            merged.append(x.reshape(len(px), -1, x.shape[-1]).float())
            embeds.append(m.extract_feature(px).float())
    feats, merged, embeds = torch.cat(feats), torch.cat(merged), torch.cat(embeds)
    tok = token_targets(data["kind"], data["color"], grid)
    print(
        f"{views} views of {a.images} images ({n_train_views} to fit), features in {time.time() - t0:.0f} s"
    )

    def run(x: torch.Tensor, targets: dict[str, np.ndarray], label: str) -> None:
        per = x.shape[1]
        train = (torch.arange(views) < n_train_views).repeat_interleave(per)
        flat = x.reshape(-1, x.shape[-1])
        row = []
        for name, classes in (("kind", len(KINDS)), ("shape", len(KINDS)), ("color", len(COLOR_NAMES)),
                              ("place", per)):  # fmt: skip
            y = torch.from_numpy(targets["kind" if name == "shape" else name].reshape(-1)).long()
            if name == "shape":  # the five shapes alone: tokens of a shape, which of them
                y = torch.where(y >= KINDS.index(SHAPES[0]), y, -1)
            elif name != "place":
                y = torch.where(y > 0 if name == "kind" else y >= 0, y, -1)
            row.append(f"{name} {100 * probe(flat, y, train, classes, a.steps):.1f}%")
        print(f"{label:<28} " + ", ".join(row))

    patch_t = {"kind": data["kind"], "color": np.where(data["kind"] > 0, data["color"], -1),
               "place": patch_place(data["kind"])}  # fmt: skip
    run(feats, patch_t, "encoder patch tokens")
    run(merged, tok, "2x2 merged (projector input)")
    run(embeds, tok, "image embeddings (LLM input)")


if __name__ == "__main__":
    main()
