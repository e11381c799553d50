"""Is a relation question's comparison computed anywhere? For the relation items of a split: the hidden state at
the position that predicts the answer, at the input of every decoder layer, at every layer's MLP input (after its
attention) and after the last layer, and fresh linear probes there for the two named objects' centres along the
asked axis (ridge regression, held-out R^2), their difference, and the answer itself (yes/no, held-out accuracy).
If the centres read well but the answer does not, the model has both places and fails to compare them. With no fit
at all: the place loss's own readout (train/binding.py: the RMS-normed state on its fixed directions), whose R^2 at
the MLP input of the layer that a stage trained it at says how well that training holds on this split; the same at
the two mentions' last tokens (their objects' centres on the first two directions: `--binding-place-xy-word-layer`).

    OMP_NUM_THREADS=1 python runs/relation_probe.py MODEL --data SPLIT_DIR [--items 600]

Held out: the last fifth of the items. Also printed: the model's own answers (yes against no at that position).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from place_probe import fit, ridge  # runs/ is on the path when this file is run as a script

import internvl
from internvl.train.binding import readout_directions


def r2(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> float:
    """Held-out R^2 of a ridge regression of y on x (standardised features) fitted on the rows `train`."""
    pred, test = ridge(x, y, train), ~train
    return float(1 - (pred[test] - y[test]).square().sum() / (y[test] - y[test].mean()).square().sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="a split folder with relation.jsonl")
    ap.add_argument("--items", type=int, default=600)
    args = ap.parse_args()
    model = internvl.load(args.model, dtype="fp32", optimize=False)
    vlm = model.model.eval()
    layers = vlm.language_model.model.layers
    captured: list[torch.Tensor] = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda mod, a: captured.append(a[0][0].detach()))
        layer.post_attention_layernorm.register_forward_pre_hook(lambda mod, a: captured.append(a[0][0].detach()))
    layers[-1].register_forward_hook(lambda mod, a, out: captured.append(out[0].detach()))
    names = [f"{where} {i}" for i in range(len(layers)) for where in ("in", "mlp")] + ["out"]
    yes, no = (model.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
    lines = (Path(args.data) / "relation.jsonl").read_text(encoding="utf-8").splitlines()[: args.items]
    states, words, first, last, answers, said, axes = [], [], [], [], [], [], []
    for line in lines:
        row = json.loads(line)
        meta = row["meta"]
        axis = 0 if meta["axis"] == "x" else 1
        size = meta["size"][axis]

        def centre(named):
            box = next(o[2] for o in meta["objects"] if [o[0], o[1]] == list(named))
            return (box[axis] + box[axis + 2]) / size - 1  # in [-1, 1]

        ids, pv, _ = model.prepare(meta["question"], str(Path(args.data) / row["image"]))
        captured.clear()
        with torch.no_grad():
            logits = vlm(torch.tensor(ids)[None], pixel_values=pv).logits[0, -1]
        seq = torch.stack(captured)  # [places, T, H]
        states.append(seq[:, -1])
        # each mention's last token: its shape word, the first such after the image for the subject, the last for
        # the object (the question names the subject first)
        ctx = max(i for i, t in enumerate(ids) if t == model.tokenizer.image_context_id)
        found = []
        for named, pick_last in ((meta["subject"], False), (meta["object"], True)):
            word = model.tokenizer.encode(" " + named[1], add_special_tokens=False)
            at = [i + len(word) - 1 for i in range(ctx, len(ids) - len(word) + 1) if ids[i : i + len(word)] == word]
            found.append(at[-1] if pick_last else at[0])
        words.append(seq[:, found])  # [places, 2, H]
        first.append(centre(meta["subject"]))
        last.append(centre(meta["object"]))
        answers.append(int(meta["answer"] == "yes"))
        axes.append(axis)
        said.append(int(logits[yes] > logits[no]))
    x = torch.stack(states)  # [N, places, H]
    y1, y2, ans = torch.tensor(first), torch.tensor(last), torch.tensor(answers)
    train = torch.arange(len(x)) < int(0.8 * len(x))
    own = float((torch.tensor(said) == ans).float().mean())
    print(f"{len(x)} relation items, held out {int((~train).sum())}; yes {float(ans.float().mean()):.2f}; "
          f"the model's own answers right {own:.3f} (says yes {sum(said) / len(said):.2f})")
    u = readout_directions(x.shape[-1])
    pick = torch.tensor(axes)[:, None]
    m = torch.stack(words)  # [N, places, 2, H]

    def readout(f: torch.Tensor) -> torch.Tensor:
        return (f * torch.rsqrt(f.square().mean(-1, keepdim=True) + 1e-6)) @ u

    def fixed_r2(got: torch.Tensor, y: torch.Tensor) -> float:
        return float(1 - (got - y).square().sum() / (y - y.mean()).square().sum())

    print("state    R2(first)  R2(last)  R2(first-last)  answer acc  readout R2(first, last)  at the mentions")
    for k, name in enumerate(names):
        f = x[:, k]
        row = (r2(f, y1, train), r2(f, y2, train), r2(f, y1 - y2, train), fit(f, ans, train, 2))
        read = readout(f)  # [N, 4]: x1, y1, x2, y2
        got = [read[:, [0, 1]].gather(1, pick)[:, 0], read[:, [2, 3]].gather(1, pick)[:, 0]]
        fixed = [fixed_r2(g, y) for g, y in zip(got, (y1, y2))]
        # a mention's own readout: its objects' (x, y) on the first two directions
        at = [fixed_r2(readout(m[:, k, j])[:, :2].gather(1, pick)[:, 0], y) for j, y in enumerate((y1, y2))]
        print(f"{name:>7}  {row[0]:9.3f}  {row[1]:8.3f}  {row[2]:14.3f}  {row[3]:10.3f}  {fixed[0]:7.3f} {fixed[1]:7.3f}"
              f"       {at[0]:7.3f} {at[1]:7.3f}")


if __name__ == "__main__":
    main()
