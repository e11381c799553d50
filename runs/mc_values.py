"""Is the letter in what the option head copies? For the mc items of a split: a fresh linear probe for each option's
letter from the option head's value vectors (its KV head's v) at the option's last token, one for the right letter
from the head's output at the answer position (its attention-weighted values, before o_proj), and the head's direct
effect on the four letters' logits (lm_head applied to its o_proj output, without the final norm): how often it
picks the right letter, and the right letter's effect minus the mean of the four against their spread.

    OMP_NUM_THREADS=1 python runs/mc_values.py MODEL --data SPLIT_DIR [--n 150] [--layer 5 --head 2]

The option head is 5:2 (the default) in the 6-layer models and 6:2 (--layer 6) in the shipped 8-layer one.
"""

import argparse
import math

import torch
from mc_probe import mc_items  # runs/ is on the path when this file is run as a script
from place_probe import fit

import internvl
from internvl.model import llm
from internvl.train.binding import LETTER, OPTION


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="a split folder with mc.jsonl (internvl synth --tasks mc)")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--head", type=int, default=2)
    a = ap.parse_args()
    model = internvl.load(a.model, dtype="fp32", optimize=False)
    vlm = model.model.eval()
    index, ds, letters = mc_items(model, a.data)
    cap: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per layer: q, k, v of the sample
    plain = llm.attention

    def spying(q, k, v, mask, causal):
        cap.append((q[0].detach(), k[0].detach(), v[0].detach()))
        return plain(q, k, v, mask, causal)

    attn = vlm.language_model.model.layers[a.layer].self_attn
    kv, d = a.head // (attn.num_heads // attn.num_kv_heads), attn.head_dim
    w_o = attn.o_proj.weight[:, a.head * d : (a.head + 1) * d]  # [H, d]
    lm = vlm.language_model.lm_head.weight[letters]  # [4, H]
    values, owners, outs, rights, effects, answered = [], [], [], [], [], []
    llm.attention = spying
    try:
        for i in range(min(a.n, len(index))):
            sample = ds[i]
            cap.clear()
            with torch.no_grad():
                logits = vlm(sample.input_ids[None], pixel_values=sample.pixel_values).logits[0]
            q, k, v = cap[a.layer]
            ends, right, answer = [], None, None
            for query, keys, hits, kind in sample.binding:
                if kind == LETTER:
                    ends.append(query)
                elif kind == OPTION:
                    right, answer = next(key for key, hit in zip(keys, hits) if hit), query
            if right is None or len(ends) != 4:
                continue
            for j, end in enumerate(ends):
                values.append(v[kv, end])
                owners.append(j)
            p = ((q[a.head, answer] @ k[kv, : answer + 1].T) / math.sqrt(d)).softmax(-1)
            out = p @ v[kv, : answer + 1]
            outs.append(out)
            rights.append(ends.index(right))
            effects.append(lm @ (w_o @ out))
            answered.append(int(logits[answer, letters].argmax()) == ends.index(right))
    finally:
        llm.attention = plain
    values_t, owners_t = torch.stack(values), torch.tensor(owners)
    outs_t, rights_t, effects_t = torch.stack(outs), torch.tensor(rights), torch.stack(effects)
    train = torch.arange(len(owners_t)) < int(0.8 * len(owners_t))
    train_answers = torch.arange(len(rights_t)) < int(0.8 * len(rights_t))
    lift = effects_t.gather(1, rights_t[:, None]).squeeze(1) - effects_t.mean(1)
    print(f"items {len(rights_t)}; answers right {sum(answered) / len(answered):.3f}")
    print(f"values at the options' last tokens -> their letter (held out): {fit(values_t, owners_t, train, 4):.3f}")
    print(f"head output at the answer -> the right letter (held out): {fit(outs_t, rights_t, train_answers, 4):.3f}")
    print(f"the head's direct effect picks the right letter: {(effects_t.argmax(-1) == rights_t).float().mean():.3f}; "
          f"right minus mean {lift.mean():.3f}, spread (std over the four) {effects_t.std(1).mean():.3f}")


if __name__ == "__main__":
    main()
