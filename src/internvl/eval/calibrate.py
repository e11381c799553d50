"""`internvl calibrate`: the decoder switches' settings from a small validation set of synthetic rows. A per-layer
keep schedule by G-Search or P-Sigmoid ("Accelerating MLLMs by Searching Optimal Vision Token Reduction", arXiv
2412.00556) and YOPO's head mask from head statistics (arXiv 2410.06169). Deterministic for a seed.

The objective is the mean negative log-likelihood of the rows' reference answers (teacher-forced after the
prompt's prefill, as generation sees them). The cost is the fraction of the decoder's token-rows computed,
sum over layers of (text + keep * visual) tokens: the linear layers' share, the attention's quadratic term left out.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..efficiency import EfficiencyConfig
from ..errors import DataError
from ..model.prune import DecoderEfficiency, save_schedule
from ..model.yopo import save_head_mask
from ..processing.inputs import tiles_per_image
from .items import ImageSource
from .runner import DEFAULT_MAX_NUM
from .synthetic import SyntheticTask


@dataclass
class Row:
    ids: torch.Tensor  # [1, T] prompt ids
    embeds: torch.Tensor  # [1, T, H] with the image embeddings in place (the vision side runs once)
    answer: torch.Tensor  # [A] reference answer ids
    visual: int  # visual tokens in the prompt


def validation_rows(llm, data_dir: str | Path, rows: int, tasks=None, seed: int = 0,
                    max_num: int = DEFAULT_MAX_NUM) -> list[Row]:  # fmt: skip
    """`rows` questions with images, drawn with `seed` from a synthetic split's tasks (mc left out: its answer is
    a letter of a rotated prompt)."""
    task = SyntheticTask(data_dir, tasks=tasks, circular="off")
    pool = [ex for ex in task.examples if ex.info["task"] != "mc" and ex.images]
    if not pool:
        raise DataError(f"{data_dir}: no synthetic questions with images to calibrate on")
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(rows, len(pool))))
    model, out = llm.model, []
    for i in picked:
        ex = pool[i]
        images = [im.load() if isinstance(im, ImageSource) else im for im in ex.images]
        ids, pv, _ = llm.prepare(ex.prompt, images, max_num=tiles_per_image(max_num, len(images)))
        ids = torch.tensor([ids], device=model.device)
        answer = llm.tokenizer.encode(ex.ref.ref["conversations"][1]["value"], add_special_tokens=False)
        with torch.inference_mode():
            embeds = model.embed(ids, pv.to(model.device) if pv is not None else None)
        visual = int((ids == model.image_token_id).sum())
        out.append(Row(ids, embeds, torch.tensor(answer, device=model.device), visual))
    return out


@torch.inference_mode()
def answer_loss(model, rows: list[Row], eff: DecoderEfficiency | None) -> float:
    """Mean per-row NLL of the reference answers with `eff` on the language model (None: the plain model)."""
    lm, total = model.language_model, 0.0
    saved, lm.efficiency = lm.efficiency, eff
    try:
        for row in rows:
            cache = lm.new_cache(1, capacity=row.ids.shape[1] + row.answer.numel() + 8)
            first = lm(row.embeds, cache=cache, logits_to_keep=1, **model.lm_inputs(row.ids, None, cache, None))
            logits = first[0]
            if row.answer.numel() > 1:
                logits = torch.cat([logits, lm(lm.embed(row.answer[None, :-1]), cache=cache)[0]])
            total += float(F.cross_entropy(logits.float(), row.answer))
    finally:
        lm.efficiency = saved
    return total / len(rows)


def cost(keep: list[float], rows: list[Row]) -> float:
    """Fraction of the plain decoder's token-rows a schedule computes, over the rows."""
    full = sum(len(keep) * r.ids.shape[1] for r in rows)
    return sum((r.ids.shape[1] - r.visual) + k * r.visual for r in rows for k in keep) / full


class Calibrator:
    def __init__(self, model, rows: list[Row]):
        self.model, self.rows = model, rows
        c = model.config.llm
        self.layers, self.heads = c.num_hidden_layers, c.num_attention_heads
        self.evaluations = 0

    def loss(self, keep: list[float] | None) -> float:
        self.evaluations += 1
        if keep is None:
            return answer_loss(self.model, self.rows, None)
        eff = DecoderEfficiency(EfficiencyConfig(), self.layers, self.heads, self.model.num_image_token, keep=keep)
        eff.force = True
        return answer_loss(self.model, self.rows, eff)

    def g_search(self, tolerance: float, step: float) -> tuple[list[float], dict]:
        """Layer by layer from shallow to deep, the smallest ratio (on a grid of `step`, at most the layer
        before's) whose loss stays within `tolerance` nats of the plain model's; the deeper layers take it too."""
        base = self.loss(None)
        keep, loss = [1.0] * self.layers, base
        grid = [round(1.0 - i * step, 6) for i in range(round(1.0 / step) + 1)]
        for layer in range(1, self.layers):
            for c in (g for g in grid if g < keep[layer - 1] - 1e-9):
                trial = keep[:layer] + [c] * (self.layers - layer)
                trial_loss = self.loss(trial)
                if trial_loss > base + tolerance:
                    break
                keep, loss = trial, trial_loss
        return keep, {"method": "g-search", "tolerance": tolerance, "grid_step": step, "baseline_loss": base,
                      "loss": loss}  # fmt: skip

    def p_sigmoid(self, budget: float, trials: int, seed: int) -> tuple[list[float], dict]:
        """r(l) = b + (1 - b) / (1 + exp(k (l - alpha))) (r(0) = 1): (k, alpha) drawn with `seed` (a seeded
        random search in place of the paper's Bayesian optimisation), b the largest floor within the cost
        `budget`; the lowest loss wins."""
        gen, best = random.Random(seed), None
        for _ in range(trials):
            k, alpha = gen.uniform(0.3, 3.0), gen.uniform(1.0, max(1.0, self.layers - 1.0))
            if cost(sigmoid(k, alpha, 0.0, self.layers), self.rows) > budget:
                continue
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if cost(sigmoid(k, alpha, mid, self.layers), self.rows) <= budget else (lo, mid)
            keep = sigmoid(k, alpha, lo, self.layers)
            loss = self.loss(keep)
            if best is None or loss < best[1]:
                best = (keep, loss, {"k": k, "alpha": alpha, "b": lo})
        if best is None:
            raise DataError(f"p-sigmoid: none of {trials} sigmoid shapes meets the budget {budget:g} "
                            "(the text and layer 0 cost the most)")  # fmt: skip
        return best[0], {"method": "p-sigmoid", "budget": budget, "trials": trials, "params": best[2],
                         "baseline_loss": self.loss(None), "loss": best[1]}  # fmt: skip

    def head_statistics(self) -> torch.Tensor:
        """Per row, layer and head [rows, L, H]: attention mass the text after the image pays visual keys over
        the mass it pays text keys (YOPO's activity ratio), on the plain model."""
        ratios = torch.zeros(len(self.rows), self.layers, self.heads)
        row = [0]

        def probe(layer, q, k, start, key_visual, q_visual):
            if not bool(q_visual.any()):
                return
            rows = (~q_visual).nonzero().flatten()
            rows = rows[rows > int(q_visual.nonzero().max())]
            if rows.numel() == 0:
                return
            kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            s = (q[0][:, rows] @ kk[0].transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
            keys = torch.arange(k.shape[2], device=q.device)
            p = torch.softmax(s.masked_fill(keys[None, :] > (start + rows)[:, None], float("-inf")), -1)
            vis = p[..., key_visual].sum(dim=(-1, -2))
            ratios[row[0], layer] = (vis / (p.sum(dim=(-1, -2)) - vis).clamp_min(1e-12)).cpu()

        eff = DecoderEfficiency(EfficiencyConfig(), self.layers, self.heads, self.model.num_image_token)
        eff.force, eff.probe = True, probe
        for i, r in enumerate(self.rows):
            row[0] = i
            answer_loss(self.model, [r], eff)
        self.evaluations += 1
        return ratios


def head_mask(ratios: torch.Tensor, prune: int | None = None, tau: float | None = None,
              vote: float = 0.4, keep_first: int = 2) -> torch.Tensor:  # fmt: skip
    """Kept heads [L, H] from head statistics: the `prune` heads of lowest mean ratio, or (YOPO) the heads whose
    ratio is at most `tau` in more than `vote` of the rows. The first `keep_first` layers keep every head."""
    layers, heads = ratios.shape[1:]
    kept = torch.ones(layers, heads, dtype=torch.bool)
    if prune is not None:
        mean = ratios.mean(0)
        mean[:keep_first] = float("inf")
        order = mean.flatten().argsort(stable=True)[: min(prune, (layers - keep_first) * heads)]
        kept.view(-1)[order] = False
    elif tau is not None:
        kept = (ratios <= tau).float().mean(0) <= vote
        kept[:keep_first] = True
    return kept


def sigmoid(k: float, alpha: float, b: float, layers: int) -> list[float]:
    keep = [1.0] + [b + (1 - b) / (1 + math.exp(k * (i - alpha))) for i in range(1, layers)]
    out = []
    for r in keep:  # rounded for the file; never increasing
        out.append(min(round(r, 4), out[-1] if out else 1.0))
    return out


def calibrate(llm, data_dir: str | Path, *, rows: int = 16, tasks=None, seed: int = 0, method: str = "g-search",
              out: str | Path | None = None, budget: float = 0.5, tolerance: float = 0.05, step: float = 0.1,
              trials: int = 16, head_mask_out: str | Path | None = None, prune_heads: int | None = None,
              tau: float | None = None, max_num: int = DEFAULT_MAX_NUM) -> dict:  # fmt: skip
    """Search a keep schedule (method g-search or p-sigmoid; none: skip) into `out` and/or a head mask into
    `head_mask_out`. Returns what was written, with the losses and costs."""
    torch.manual_seed(seed)
    cal = Calibrator(llm.model, validation_rows(llm, data_dir, rows, tasks, seed, max_num))
    report: dict = {"rows": len(cal.rows), "seed": seed}
    if method != "none":
        if method == "g-search":
            keep, meta = cal.g_search(tolerance, step)
        elif method == "p-sigmoid":
            keep, meta = cal.p_sigmoid(budget, trials, seed)
        else:
            raise DataError(f"calibrate: unknown method {method!r} (g-search, p-sigmoid or none)")
        meta.update(cost=cost(keep, cal.rows), rows=len(cal.rows), seed=seed)
        if out is not None:
            save_schedule(out, keep, **meta)
        report["schedule"] = {"keep": keep, **meta, "path": str(out) if out else None}
    if head_mask_out is not None:
        ratios = cal.head_statistics()
        kept = head_mask(ratios, prune_heads, tau if prune_heads is None else None)
        save_head_mask(head_mask_out, kept, rows=len(cal.rows), seed=seed, prune_heads=prune_heads, tau=tau,
                       mean_ratio=[[round(float(x), 6) for x in r] for r in ratios.mean(0)])  # fmt: skip
        report["head_mask"] = {"path": str(head_mask_out), "pruned": int((~kept).sum())}
    report["evaluations"] = cal.evaluations
    return report
