"""Does the count head carry the count? For count items of a split: the share of one head's attention (from
the position that predicts the answer) on `<img>` among `<img>` and the image tokens, which the COUNT query of
the binding loss trains towards 1 / (n + 1) (m / (n + m) for a head whose spread weighs `<img>` m times an
object, --sink M), the count that share implies (m / share - m), and the model's greedy answer, by the true count.

    python runs/count_probe.py MODEL --data SPLIT_DIR --layer 4 --head 2 [--sink 1] [--n 200]

With --states instead: is the count in the residual stream? The state at the answer position at the input of every
decoder layer, at every layer's MLP input and after the last layer, with fresh probes there for n (ridge
regression: held-out R^2 and the share of held-out items whose rounded prediction is n; a softmax probe over 0-9:
held-out accuracy; held out: the last fifth) and the count readout's own (train/binding.py: the RMS-normed state on
its fifth fixed direction, 2n/9 - 1; R^2 and rounded hits over all items), which at the MLP input of the layer that
a stage trained it at (--binding-count-xy-layer) says how well that training holds on this split.

    OMP_NUM_THREADS=1 python runs/count_probe.py MODEL --data SPLIT_DIR --states [--n 400]
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
from internvl.train.binding import readout_directions


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - (pred - y).square().sum() / (y - y.mean()).square().sum())


def states(model, rows: list[dict], data: Path) -> None:
    """--states: the probes of the count along the residual stream at the answer position (see the module)."""
    from place_probe import fit, ridge  # runs/ is on the path when this file is run as a script

    vlm = model.model.eval()
    layers = vlm.language_model.model.layers
    captured: list[torch.Tensor] = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda mod, a: captured.append(a[0][0, -1].detach()))
        layer.post_attention_layernorm.register_forward_pre_hook(lambda mod, a: captured.append(a[0][0, -1].detach()))
    layers[-1].register_forward_hook(lambda mod, a, out: captured.append(out[0][-1].detach()))
    names = [f"{where} {i}" for i in range(len(layers)) for where in ("in", "mlp")] + ["out"]
    digits = [model.tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    xs, counts, said = [], [], []
    for row in rows:
        meta = row["meta"]
        ids, pv, _ = model.prepare(meta["question"], str(data / row["image"]))
        captured.clear()
        with torch.no_grad():
            logits = vlm(torch.tensor(ids)[None], pixel_values=pv).logits[0, -1]
        xs.append(torch.stack(captured))
        counts.append(int(meta["answer"]))
        said.append(int(logits[digits].argmax()))
    x, n = torch.stack(xs), torch.tensor(counts)  # [N, places, H], [N]
    train, y = torch.arange(len(x)) < int(0.8 * len(x)), n.float()
    own = (torch.tensor(said) == n).float()
    print(f"{len(x)} count items, held out {int((~train).sum())}; the model's own answers right "
          f"{float(own.mean()):.3f} (held out {float(own[~train].mean()):.3f})")
    u = readout_directions(x.shape[-1])[:, 4]
    print("  state  ridge R2  ridge rounded  softmax acc  readout R2  readout rounded")
    for k, name in enumerate(names):
        f = x[:, k]
        pred = ridge(f, y, train)
        read = ((f * torch.rsqrt(f.square().mean(-1, keepdim=True) + 1e-6)) @ u + 1) * 4.5  # back to 0-9
        print(f"{name:>7}  {r2(pred[~train], y[~train]):8.3f}  {float((pred[~train].round() == y[~train]).float().mean()):13.3f}"
              f"  {fit(f, n, train, 10):11.3f}  {r2(read, y):10.3f}  {float((read.round() == y).float().mean()):15.3f}")


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
    ap.add_argument("--states", action="store_true", help="probe the residual stream instead (see the module)")
    args = ap.parse_args()
    model = internvl.load(args.model, dtype="fp32", optimize=False)
    if args.states:
        lines = (Path(args.data) / "count.jsonl").read_text(encoding="utf-8").splitlines()[: args.n]
        states(model, [json.loads(line) for line in lines], Path(args.data))
        return
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
