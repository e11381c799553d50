"""What a head reads at the word that names an object: a linear probe of the named object's colour on one head's
attention output (its context vector, before o_proj) at the shape word (or the answer position), and on the
residual stream there after that layer, for color items of the train split with three or more objects and one of
the named shape (80% to fit, 20% held out).

    python runs/binding_probe.py MODEL --layer 2 --head 0 --n 600 [--at answer]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import internvl
from internvl.model import llm


def probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy (last 20%) of a logistic regression trained on the first 80%."""
    n = int(0.8 * len(y))
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((x[n:] @ w + b).argmax(-1) == y[n:]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", default="/work/data/nano/data")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--head", type=int, default=0)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument(
        "--at", choices=("word", "answer"), default="word", help="the shape word or the answer position"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = internvl.load(args.model, dtype="fp32", optimize=False)
    vlm = model.model.eval()
    outs: list[torch.Tensor] = []
    plain = llm.attention

    def spying(q, k, v, mask, causal):
        out = plain(q, k, v, mask, causal)
        outs.append(out[0])  # [heads, T, d]
        return out

    llm.attention = spying
    colours: list[str] = []
    heads, resid = [], []
    for line in (Path(args.data) / "color.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        meta = row["meta"]
        targets = [o for o in meta["objects"] if o[1] == meta["shape"]]
        if len(meta["objects"]) < 3 or len(targets) != 1:
            continue
        ids, pv, _ = model.prepare(meta["question"], str(Path(args.data) / row["image"]))
        marks = [i for i, t in enumerate(ids) if model.tokenizer.decode([t]).endswith("?")]
        at = (
            marks[-1] - 1 if args.at == "word" else len(ids) - 1
        )  # the shape word's last token, or the answer's
        outs.clear()
        hidden = {}
        hook = vlm.language_model.model.layers[args.layer].register_forward_hook(
            lambda m, i, o, hidden=hidden, at=at: hidden.__setitem__("x", o[0, at])
        )
        with torch.no_grad():
            vlm(torch.tensor([ids]), pixel_values=pv)
        hook.remove()
        heads.append(outs[args.layer][args.head, at])
        resid.append(hidden["x"])
        colours.append(targets[0][0])
        if len(colours) >= args.n:
            break
    llm.attention = plain
    names = sorted(set(colours))
    y = torch.tensor([names.index(c) for c in colours])
    base = max(colours.count(c) for c in names) / len(colours)
    print(f"{len(colours)} items, {len(names)} colours, majority {base:.3f}")
    where = "the shape word" if args.at == "word" else "the answer position"
    print(f"layer {args.layer} head {args.head} output at {where}: {probe(torch.stack(heads), y):.3f}")
    print(f"residual stream after layer {args.layer} at {where}: {probe(torch.stack(resid), y):.3f}")


if __name__ == "__main__":
    main()
