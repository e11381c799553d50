"""Whether the language model's image embeddings say which character a glyph is: for the OCR rows of a split, the
embeddings (the projector's output) averaged over the tokens of each character's slice of the text box (the box cut
evenly by the string's length; tiles and thumbnail apart, then both), and a fresh linear probe of the character (36
classes) fitted on the first 80% of the images and scored on the rest. If it cannot read them, no attention in the
language model can: OCR and chart_max wait on the encoder.

    OMP_NUM_THREADS=1 python runs/ocr_probe.py [MODEL] --data SPLIT_DIR [--images 1500] [--steps 500]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import internvl
from internvl.processing.image import ImageProcessor, choose_grid
from internvl.train.binding import object_tokens

CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def slice_features(model, processor: ImageProcessor, root: Path, rows: list[dict]) -> tuple[dict, list, list]:
    """{view: [character feature]}, the characters' classes and their images' indices."""
    per = model.num_image_token
    feats: dict[str, list[torch.Tensor]] = {"tiles": [], "thumbnail": [], "both": []}
    labels, images = [], []
    with torch.no_grad():
        for i, row in enumerate(rows):
            emb = model.extract_feature(processor(root / row["image"])).float()
            flat = emb.reshape(-1, emb.shape[-1])
            w, h = row["meta"]["size"]
            grid = choose_grid(w, h, processor.min_num, processor.max_num, processor.image_size)
            tiles = grid[0] * grid[1] * per
            x0, y0, x1, y1 = row["meta"]["text_box"]
            text = row["meta"]["text"]
            for k, ch in enumerate(text):
                box = [x0 + (x1 - x0) * k / len(text), y0, x0 + (x1 - x0) * (k + 1) / len(text), y1]
                cells = sorted(object_tokens(box, w, h, grid, processor.image_size, per, True))
                tile = flat[[c for c in cells if c < tiles] or cells].mean(0)
                thumb = flat[[c for c in cells if c >= tiles] or cells].mean(0)
                feats["tiles"].append(tile)
                feats["thumbnail"].append(thumb)
                feats["both"].append(torch.cat([tile, thumb]))
                labels.append(CHARACTERS.index(ch))
                images.append(i)
    return feats, labels, images


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int) -> tuple[float, float]:
    """(train, held-out) accuracy of a linear read-out (full-batch Adam, weight decay 1e-2)."""
    xtr, ytr, xte, yte = x[train], y[train], x[~train], y[~train]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    head = torch.nn.Linear(x.shape[1], len(CHARACTERS))
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(xtr).argmax(-1) == ytr).float().mean()), float((head(xte).argmax(-1) == yte).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--data", required=True, help="a split written by `internvl synth` (its ocr.jsonl)")
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=500)
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model = internvl.load(a.model, optimize=False).model.eval()
    processor = ImageProcessor.from_config(model.config)
    root = Path(a.data)
    rows = [json.loads(line) for line in (root / "ocr.jsonl").read_text().splitlines()[: a.images]]
    feats, labels, images = slice_features(model, processor, root, rows)
    y, train = torch.tensor(labels), torch.tensor(images) < int(0.8 * len(rows))
    print(f"{len(labels)} characters of {len(rows)} images in {time.time() - t0:.0f} s; chance {100 / len(CHARACTERS):.1f}%")
    for name, f in feats.items():
        fit, held = probe(torch.stack(f), y, train, a.steps)
        print(f"{name:<10} train {100 * fit:.1f}%, held out {100 * held:.1f}% ({int((~train).sum())} characters)")


if __name__ == "__main__":
    main()
