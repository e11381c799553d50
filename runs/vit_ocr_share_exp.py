"""Is the encoder's character reading starved of examples? Continue a model's encoder on the views of dynamic
tiling (as stage vit4b does: `internvl nano vit --keep-weights --max-num 4 --balance-kind`) from images drawn as
the vision stages draw them, but with a share of them drawn from the OCR builder alone (`--share`; 0 is the
stages' own mix, where 1 image in 12 is an OCR scene), and report the held-out per-patch accuracies (the
default mix's held-out images, so that runs with different shares are scored on the same views).

    python runs/vit_ocr_share_exp.py MODEL --out DIR --share 0.5 [--images 3000 --steps 400]

Run it twice from the same MODEL (--share 0 and, e.g., 0.5) with the same steps: the difference in `char` on the
held-out views is what the share bought. Each run writes DIR/result.json (and the encoder as a model folder).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np


def draw_pool(n: int, share: float, seed: int, max_num: int = 4) -> dict:
    """The views of `n` images: each with probability `share` an OCR scene, else drawn as the vision stages draw."""
    from internvl.nano import patches

    rng = random.Random(seed)
    images, cols = [], {"kind": [], "color": [], "char": [], "box": []}
    for _ in range(n):
        sources = ("ocr",) if rng.random() < share else patches.SOURCES
        image, labels, regions = patches.sample_image(rng, sources)
        for array, targets in patches.tiled_views(image, labels, regions, max_num):
            images.append(array)
            for k, v in targets.items():
                cols[k].append(v)
    return {"images": np.stack(images), **{k: np.stack(v) for k, v in cols.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder whose encoder continues (e.g. src/internvl/assets/nano)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--share", type=float, default=0.5, help="share of images drawn from the OCR builder")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.share <= 1:
        parser.error(f"--share must be in [0, 1], got {args.share}")

    from internvl.nano.patches import CHARS
    from internvl.nano.vit import pretrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "views.npz"
    t0 = time.time()
    if not cache.exists():
        pool = draw_pool(args.images, args.share, args.seed + 100)
        np.savez(cache, **pool)
    pool = np.load(cache)
    chars = int((pool["char"] >= 0).sum())
    print(f"{len(pool['images'])} views of {args.images} images, {chars} character patches "
          f"({chars / pool['char'].size:.2%} of all, {len(CHARS)} classes), {time.time() - t0:.0f} s")  # fmt: skip
    t0 = time.time()
    result = pretrain(args.model, out / "model", steps=args.steps, images=args.images, batch=args.batch, lr=args.lr,
                      seed=args.seed, data=cache, max_num=4, keep_weights=True, balance_kind=True,
                      held_out=args.held_out)  # fmt: skip
    result.update(share=args.share, char_patches=chars, views=len(pool["images"]), train_s=round(time.time() - t0))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["held_out"], indent=2))


if __name__ == "__main__":
    main()
