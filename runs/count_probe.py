"""Does the count head carry the count? For count items of a split: the share of one head's attention (from
the position that predicts the answer) on `<img>` among `<img>` and the image tokens, which the COUNT query of
the binding loss trains towards 1 / (n + 1) (m / (n + m) for a head whose spread weighs `<img>` m times an
object, --sink M), the count that share implies (m / share - m), and the model's greedy answer, by the true count.

    python runs/count_probe.py MODEL --data SPLIT_DIR --layer 4 --head 2 [--sink 1] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

import internvl
from internvl.model import llm
from internvl.tokenizer import IMG_START


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="a split folder with count.jsonl")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--head", type=int, default=2)
    ap.add_argument(
        "--sink", type=float, default=1.0, help="the head's weight of <img> (--binding-count-sinks)"
    )
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    model = internvl.load(args.model, dtype="fp32", optimize=False)
    vlm = model.model.eval()
    tok = model.tokenizer
    img_start, ctx = tok.token_to_id(IMG_START), tok.image_context_id
    probs: list[torch.Tensor] = []
    plain = llm.attention

    def spying(q, k, v, mask, causal):
        groups = q.shape[1] // k.shape[1]
        s = q[0, args.head, -1] @ k[0, args.head // groups].T / math.sqrt(q.shape[-1])
        probs.append(s.softmax(-1))
        return plain(q, k, v, mask, causal)

    llm.attention = spying
    by_n: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    rows = (Path(args.data) / "count.jsonl").read_text(encoding="utf-8").splitlines()[: args.n]
    for line in rows:
        row = json.loads(line)
        q = row["conversations"][0]["value"].replace("<image>\n", "")
        truth = row["conversations"][1]["value"].strip()
        ids, pv, _ = model.prepare(q, str(Path(args.data) / row["image"]))
        ids_t = torch.tensor(ids)
        probs.clear()
        with torch.no_grad():
            logits = vlm(ids_t[None], pixel_values=pv).logits[0, -1]
        p = probs[args.layer]
        sink = float(p[ids_t == img_start].sum())
        share = sink / (sink + float(p[ids_t == ctx].sum()))
        answer = tok.decode([int(logits.argmax())]).strip()
        by_n[int(truth)].append((share, answer, truth))
    llm.attention = plain
    m = args.sink
    print(
        f"layer {args.layer} head {args.head}: n, items, mean share (target {m:g}/(n+{m:g})), implied n, "
        f"rounded implied n right, answer right"
    )
    for n in sorted(by_n):
        rows_n = by_n[n]
        share = sum(s for s, _, _ in rows_n) / len(rows_n)
        implied = [m / max(s, 1e-6) - m for s, _, _ in rows_n]
        right = sum(round(x) == n for x in implied)
        ans = sum(a == t for _, a, t in rows_n)
        print(
            f"{n:2d} {len(rows_n):4d}  {share:.3f} ({m / (n + m):.3f})  {sum(implied) / len(implied):5.2f}  "
            f"{right:3d}  {ans:3d}"
        )


if __name__ == "__main__":
    main()
