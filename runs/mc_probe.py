"""Does a multiple-choice answer find its option? For the mc items of a split, by the scene task they ask about: the
binding loss's multiple-choice queries (train/binding.py) read on the model as it is, each as the share of one head's
attention that falls on the query's targets among the keys the loss compares them with:

- LETTER: from each option's last token onto its letter (--letter HEAD, the head stage 2m trained: 1:1);
- CHOICE: from each option's last token onto the question's mentions (--choice, 3:0 in stage 2o);
- OPTION: from the answer position onto the right option's last token, among the four options' last tokens
  (--option, 5:2 in the 6-layer models; 6:2 in the shipped 8-layer one, stages 2y and 2z), how often that head
  weighs the right option most, and its share among every key before the answer (`option all`: what the head's
  output is made of);
- MATCH: the place loss's readout at each option's last token (the RMS-normed state at the MLP input of --match-layer
  on its sixth fixed direction, +1 for the right option): how often the right option reads highest;

and the model's own answer (the highest of the four letters' logits at the answer position). With `--letters`, also
where the letters are, at every layer's MLP input: held-out accuracy (the last fifth of the items) of fresh linear
probes for each option's letter at its last token and for the right letter at the answer position, and how often
the letter readout (`--binding-letter-xy-layer`: the code on the seventh and eighth directions) gives the right one
there. If the options' tokens carry their letters but the answer position does not, the option head copies nothing.

    OMP_NUM_THREADS=1 python runs/mc_probe.py MODEL --data SPLIT_DIR [--n 200] [--letters]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import torch
from place_probe import fit  # runs/ is on the path when this file is run as a script

import internvl
from internvl.model import llm
from internvl.train.binding import CHOICE, LETTER, LETTER_CODES, MATCH, OPTION, readout_directions
from internvl.train.data import build_index, read_meta
from internvl.train.dataset import SampleOptions, SFTDataset


def pair(spec: str) -> tuple[int, int]:
    layer, head = spec.split(":")
    return int(layer), int(head)


def mc_items(model, data: str):
    """The mc rows of the split folder `data` for `model`: their index, the dataset that gives each one's binding
    queries and place rows, and the token ids of the letters A-D."""
    index = build_index([s for s in read_meta(Path(data) / "meta.json") if s.name == "synth_mc"])
    options = SampleOptions(**{**SampleOptions.for_model(model.config).__dict__, "binding": True})
    ds = SFTDataset(index, model.tokenizer, model.config, options)
    return index, ds, [model.tokenizer.encode(c, add_special_tokens=False)[0] for c in "ABCD"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="a split folder with mc.jsonl (internvl synth --tasks mc)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--letter", type=pair, default=(1, 1))
    ap.add_argument("--choice", type=pair, default=(3, 0))
    ap.add_argument("--option", type=pair, default=(5, 2))
    ap.add_argument("--match-layer", type=int, default=4)
    ap.add_argument("--letters", action="store_true", help="probe for the letters at every layer too")
    args = ap.parse_args()
    model = internvl.load(args.model, dtype="fp32", optimize=False)
    vlm = model.model.eval()
    index, ds, letters = mc_items(model, args.data)
    u = readout_directions(vlm.language_model.config.hidden_size)[:, 5]

    scores: list[torch.Tensor] = []  # per layer: [heads, T, T] attention logits of the sample
    plain = llm.attention

    def spying(q, k, v, mask, causal):
        groups = q.shape[1] // k.shape[1]
        kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        s = q[0] @ kk[0].transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = s.shape[-1]
        scores.append(s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")))
        return plain(q, k, v, mask, causal)

    states: dict[int, torch.Tensor] = {}  # by layer: its MLP input, the sample's tokens
    for i, layer in enumerate(vlm.language_model.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, a, i=i: states.__setitem__(i, a[0][0].detach()))  # fmt: skip
    at_options: list[torch.Tensor] = []  # per item: [layers, 4, H] at the options' last tokens
    at_answer: list[torch.Tensor] = []  # per item: [layers, H] at the answer position
    truth: list[int] = []  # the right option's index

    def share(la_head: tuple[int, int], q: int, keys: list[int], hits: list[bool]) -> float:
        p = scores[la_head[0]][la_head[1], q, keys].softmax(-1)
        return float(p[torch.tensor(hits)].sum())

    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    llm.attention = spying
    try:
        for i in range(min(args.n, len(index))):
            row = index.read(i)[0]
            sample = ds[i]
            scores.clear()
            with torch.no_grad():
                logits = vlm(sample.input_ids[None], pixel_values=sample.pixel_values).logits[0]
            cat = row["meta"].get("category", "?")
            out = stats[cat]
            ends, right = [], None
            for q, keys, hits, kind in sample.binding:
                if kind == LETTER:
                    out["letter"].append(share(args.letter, q, keys, hits))
                    ends.append(q)
                elif kind == CHOICE:
                    out["choice"].append(share(args.choice, q, keys, hits))
                elif kind == OPTION:
                    right = next(k for k, hit in zip(keys, hits) if hit)
                    answer = q
            if right is None or len(ends) != 4:
                continue
            p = scores[args.option[0]][args.option[1], answer, ends].softmax(-1)
            out["option"].append(float(p[ends.index(right)]))
            out["option top"].append(float(int(p.argmax()) == ends.index(right)))
            # the same head's attention over every key before the answer, not just the four options' last tokens
            out["option all"].append(float(scores[args.option[0]][args.option[1], answer, : answer + 1].softmax(-1)[right]))
            h = states[args.match_layer][[q for q, _, kind in sample.places if kind == MATCH]]
            read = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)) @ u
            out["match top"].append(float(int(read.argmax()) == ends.index(right)))
            out["match sign"].append(float(((read > 0) == torch.tensor([e == right for e in ends])).float().mean()))
            out["answer"].append(float(int(logits[answer, letters].argmax()) == ends.index(right)))
            if args.letters:
                every = torch.stack([states[i] for i in sorted(states)])  # [layers, T, H]
                at_options.append(every[:, ends])
                at_answer.append(every[:, answer])
                truth.append(ends.index(right))
    finally:
        llm.attention = plain
    names = ["letter", "choice", "option", "option top", "option all", "match top", "match sign", "answer"]
    print(f"{'category':>9} {'items':>5} " + " ".join(f"{n:>10}" for n in names))
    total: dict[str, list[float]] = defaultdict(list)
    for cat in sorted(stats):
        for n in names:
            total[n] += stats[cat][n]
        print(f"{cat:>9} {len(stats[cat]['answer']):5d} " + " ".join(
            f"{sum(stats[cat][n]) / max(1, len(stats[cat][n])):10.3f}" for n in names))
    print(f"{'all':>9} {len(total['answer']):5d} " + " ".join(
        f"{sum(total[n]) / max(1, len(total[n])):10.3f}" for n in names))
    if args.letters and truth:
        opts, ans, y = torch.stack(at_options), torch.stack(at_answer), torch.tensor(truth)  # [N, L, 4, H], [N, L, H]
        train = torch.arange(len(y)) < int(0.8 * len(y))
        codes = torch.tensor([LETTER_CODES[c] for c in "ABCD"])  # [4, 2]
        u = readout_directions(ans.shape[-1])[:, 6:8]
        print(f"letters, {len(y)} items (held out {int((~train).sum())})")
        print("layer  option's letter  right letter at the answer  letter readout there")
        for la in range(ans.shape[1]):
            # every option's last token is a row: 4 per item, its letter the class
            x = opts[:, la].reshape(-1, opts.shape[-1])
            per_option = fit(x, torch.arange(4).repeat(len(y)), train.repeat_interleave(4), 4)
            at = fit(ans[:, la], y, train, 4)
            h = ans[:, la]
            read = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)) @ u  # [N, 2]
            hit = float(((read[:, None] - codes).square().sum(-1).argmin(-1) == y).float().mean())
            print(f"{la:>5} {per_option:16.3f} {at:27.3f} {hit:21.3f}")


if __name__ == "__main__":
    main()
