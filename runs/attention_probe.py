"""Where the language model looks when it answers a question about one object of a scene.

For color items of the train split (a question naming one shape in a scene of several), this runs the prompt
through the model and records, at the last prompt position (the one that predicts the answer), the shape word and the question mark, every layer's and
head's attention over the prompt. Image tokens are sorted into the target's (their 28-px cell overlaps the object
the question names), the other objects', and background, on the tiles and on the thumbnail. It prints, per layer,
the attention mass on image tokens and the mass per token on the target against per token on other objects
(>1: the layer finds the named object), split by whether the answer was right; from the shape word's last token
and the question mark as well as from the answer position.

    python runs/attention_probe.py MODEL --data /work/data/nano/data --n 60
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

import internvl
from internvl.model import llm
from internvl.processing.image import choose_grid
from internvl.train.binding import object_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", default="/work/data/nano/data")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--min-objects", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = internvl.load(args.model, dtype="fp32", optimize=False)
    vlm = model.model
    max_num = model.config.processor.max_dynamic_patch
    record: list[torch.Tensor] = []
    at: list[int] = []  # the query positions to record
    plain = llm.attention

    def spying(q, k, v, mask, causal):
        if q.shape[2] > 1:  # the prompt: the recorded rows' weights over the keys they see
            kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = q[:, :, at] @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
            seen_keys = torch.arange(k.shape[2])[None, :] <= torch.tensor(at)[:, None]
            scores = scores.masked_fill(~seen_keys, float("-inf"))
            record.append(F.softmax(scores.float(), -1)[0])  # [heads, rows, keys]
        return plain(q, k, v, mask, causal)

    llm.attention = spying
    # (query row, right, layer) -> per item: image mass, target/token, other/token, bg/token, best head
    stats = defaultdict(list)
    seen = 0
    for line in (Path(args.data) / "color.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        objects = row["meta"]["objects"]
        if len(objects) < args.min_objects:
            continue
        shape = row["meta"]["shape"]
        targets = [o for o in objects if o[1] == shape]
        if len(targets) != 1:
            continue
        question = row["meta"]["question"]
        width, height = row["meta"]["size"]
        ids, pv, _ = model.prepare(question, str(Path(args.data) / row["image"]))
        marks = [i for i, t in enumerate(ids) if model.tokenizer.decode([t]).endswith("?")]
        # the shape word's last token, the question mark and the answer position
        at[:] = [marks[-1] - 1, marks[-1], len(ids) - 1]
        record.clear()
        with torch.no_grad():
            logits = vlm(torch.tensor([ids]), pixel_values=pv).logits[0, -1]
        answer = model.tokenizer.decode([int(logits.argmax())]).strip()
        right = row["meta"]["answer"].startswith(answer) and answer != ""
        image_pos = [i for i, t in enumerate(ids) if t == vlm.image_token_id]
        grid = choose_grid(width, height, 1, max_num, 224)
        target = object_tokens(targets[0][2], width, height, grid, 224, 64)
        others = [object_tokens(o[2], width, height, grid, 224, 64) for o in objects if o is not targets[0]]
        others = set().union(*others) - target
        bg = set(range(len(image_pos))) - target - others
        groups = [[image_pos[i] for i in sorted(g)] for g in (target, others, bg)]
        for layer, weights in enumerate(record):
            for name, rows in zip(("shape", "?", "answer"), weights.unbind(1)):
                w = rows.mean(0)  # heads averaged
                mass = float(w[image_pos].sum())
                per = [float(w[g].sum()) / max(1, len(g)) for g in groups]
                best_head = max(float(h[groups[0]].sum() / max(1, len(groups[0]))) /
                                max(1e-9, float(h[groups[1]].sum() / max(1, len(groups[1])))) for h in rows)  # fmt: skip
                stats[(name, right, layer)].append((mass, *per, best_head))
        seen += 1
        if seen >= args.n:
            break
    llm.attention = plain
    print(f"{seen} color items with >= {args.min_objects} objects and one target")
    print("query  right layer items image_mass target/tok other/tok bg/tok target:other best_head(median)")
    for (name, right, layer), rows in sorted(stats.items()):
        t = torch.tensor(rows).mean(0).tolist()
        best = torch.tensor(rows)[:, 4].median()
        print(f"{name:6s} {int(right):5d} {layer:5d} {len(rows):5d} {t[0]:10.3f} {t[1]:10.5f} {t[2]:9.5f} {t[3]:6.5f} "
              f"{t[1] / max(1e-9, t[2]):13.2f} {best:10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
