"""Seeing with fewer tokens (issue 19): every efficiency switch and setting on one harness, one table.

For each setting: prefill FLOPs (counted from the shapes and the tokens each layer keeps, ViT and projector
included), prefill wall time, time to first token and decode tokens/s through the engine, and the agreement
with the plain model on the same random weights (KL of the next-token distribution, the share of the first 32
greedy tokens that match). The image is 12 tiles + thumbnail on the InternVL3-1B shape (random bf16 weights,
CPU, torch paths throughout so the decode kernels do not favour the plain model). `--accuracy` adds the built-in
model's per-task accuracy on the synthetic test split (`--n` items a task) for each setting, and a PNG of
accuracy against prefill FLOPs per method. Settings whose code is missing are skipped with the reason.

    python benchmarks/bench_efficiency.py [--shape internvl3-1b] [--threads 2] [--repeats 1] [--accuracy --n 50]
    python benchmarks/bench_efficiency.py --quick            # the tiny shape, a few tokens: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from common import cpu_features, random_checkpoint
from flops import TEXT, prefill_flops
from PIL import Image

from internvl.efficiency import EfficiencyConfig
from internvl.errors import InternVLError
from internvl.processing.image import ImageProcessor
from internvl.processing.inputs import budget_tiles
from internvl.processing.pyramid import PyramidProcessor

NEW = 32  # greedy tokens compared with the plain model's


# ---- the settings ---------------------------------------------------------------------------------------


def sigmoid_schedule(
    layers: int, k: float = 0.6, alpha: float | None = None, floor: float = 0.15
) -> list[float]:
    """A P-Sigmoid-shaped keep schedule (arXiv 2412.00556): 1 at layer 0, then floor + (1 - floor) /
    (1 + e^(k (l - alpha))), non-increasing. Not calibrated: `internvl calibrate` fits one on data."""
    alpha = layers / 3 if alpha is None else alpha
    return [1.0] + [floor + (1 - floor) / (1 + math.exp(k * (i - alpha))) for i in range(1, layers)]


def settings_for(layers: int, heads: int, tile_tokens: int, folder: Path, schedule: str | None,
                 head_mask: str | None) -> list:  # fmt: skip
    """(method, label, spec) for a decoder of this depth; the schedule and head mask are written when not given
    (uncalibrated: a shape for timing, not for accuracy)."""
    k, half = min(2, layers - 1), max(1, layers // 2)
    if schedule is None:
        schedule = str(folder / "schedule.json")
        Path(schedule).write_text(
            json.dumps({"kind": "keep_schedule", "keep": sigmoid_schedule(layers)}) + "\n"
        )
    if head_mask is None:  # YOPO keeps the first 2 layers whole; here the last 30% of heads go after that
        kept = [
            [1] * heads if i < 2 else [int(h < math.ceil(0.7 * heads)) for h in range(heads)]
            for i in range(layers)
        ]
        head_mask = str(folder / "head_mask.json")
        Path(head_mask).write_text(json.dumps({"kind": "yopo_head_mask", "layers": layers, "heads": heads,
                                               "kept": kept}) + "\n")  # fmt: skip
    return [
        ("plain", "plain", "off"),
        ("FastV", f"fastv K={k} keep 50%", f"fastv={k}:0.5"),
        ("FastV", f"fastv K={k} keep 25%", f"fastv={k}:0.25"),
        ("YOPO", "window 3", "yopo_window=3"),
        ("YOPO", "window 5", "yopo_window=5"),
        ("YOPO", "head mask 70%", f"yopo_head_mask={head_mask}"),
        ("YOPO", "FFN 50%", "yopo_ffn_keep=0.5"),
        ("YOPO", f"drop after {half}", f"yopo_drop_after={half}"),
        (
            "YOPO",
            "all four",
            f"yopo_window=5,yopo_head_mask={head_mask},yopo_ffn_keep=0.5,yopo_drop_after={half}",
        ),
        ("schedule", "P-Sigmoid shape", f"schedule={schedule}"),
        ("Mini-Monkey", "pyramid", "pyramid"),
        ("Mini-Monkey", "pyramid + SCM 50%", "pyramid,scale_compress=0.5"),
        ("Mini-Monkey", "SCM 50%", "scale_compress=0.5"),
        ("budget", "7 tiles", f"max_visual_tokens={7 * tile_tokens}"),
        ("budget", "4 tiles", f"max_visual_tokens={4 * tile_tokens}"),
    ]


def chosen(settings: list, only: list[str] | None) -> list:
    """(setting number, setting) of the settings whose labels `only` names (all when None); a label that names
    none of them is an error that lists the labels there are."""
    numbered = list(enumerate(settings))
    if not only:
        return numbered
    labels = [label for _, label, _ in settings]
    unknown = [label for label in only if label not in labels]
    if len(unknown) == len(only):
        raise SystemExit(
            f"--only: no setting {', '.join(map(repr, unknown))}; the settings: {', '.join(labels)}"
        )
    for label in unknown:
        print(f"--only: no setting {label!r} for this model (its settings: {', '.join(labels)})", flush=True)
    return [(key, st) for key, st in numbered if st[1] in only]


def why_not(spec: str, model) -> str | None:
    """None when this checkout can run the setting, else why not (a switch EfficiencyConfig lacks, or
    decoder code that refuses the model or is missing)."""
    known = {f.name for f in fields(EfficiencyConfig)} | {"fastv", "off"}
    for part in spec.split(","):
        if part.partition("=")[0] not in known:
            return f"EfficiencyConfig has no switch {part.partition('=')[0]!r}"
    try:
        from internvl.model.prune import install
    except ImportError as e:
        return f"the decoder-side code is missing ({e})"
    try:
        install(model, EfficiencyConfig.from_spec(spec))
    except (InternVLError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        install(model, None)
    return None


def gflops(cfg, tiles: int, eff: EfficiencyConfig) -> dict:
    total, decoder = prefill_flops(cfg, tiles, eff)
    return {"gflops": total / 1e9, "decoder_gflops": decoder / 1e9}


# ---- measuring one setting --------------------------------------------------------------------------------


def image_tiles(cfg, eff: EfficiencyConfig, max_num: int) -> torch.Tensor:
    """Pixel values of one noise image whose plain grid is 4 x 3 (12 tiles + thumbnail at max_num 12), tiled as
    the setting's inputs room tiles it (pyramid, visual-token budget)."""
    size = cfg.image_size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (3 * size, 4 * size, 3), dtype=np.uint8))
    proc = (PyramidProcessor if eff.pyramid else ImageProcessor)(image_size=size, max_num=max_num)
    cap = max_num
    if eff.max_visual_tokens is not None:
        cap = proc.cap_within(budget_tiles(eff.max_visual_tokens, cfg.num_image_token, 1), max_num)
    return proc(image, cap)


def prompt(ids: tuple[int, int, int], tiles: int, tile_tokens: int, vocab: int) -> list[int]:
    start, end, ctx = ids
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(vocab, 150000) - 3, (sum(TEXT),), generator=g).tolist()
    return text[: TEXT[0]] + [start] + [ctx] * (tile_tokens * tiles) + [end] + text[TEXT[0] :]


def measure(model, eff: EfficiencyConfig, ids: list[int], pv: torch.Tensor, repeats: int) -> dict:
    """Prefill wall time and next-token logits (model.prefill), then TTFT, decode tokens/s and NEW greedy
    tokens through the engine; best of `repeats`."""
    from internvl.engine.engine import Engine
    from internvl.engine.sampling import SamplingParams
    from internvl.model.prune import install

    install(model, None if eff.is_off() else eff)
    x = torch.tensor([ids])
    pv = pv.to(model.dtype)
    prefill = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(1, capacity=len(ids) + NEW + 8)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model.prefill(x, pv, cache, None, 1)[0, -1].float()
        prefill = min(prefill, time.perf_counter() - t0)
    engine = Engine(model, prefix_cache=False)
    params = SamplingParams(max_new_tokens=NEW, min_new_tokens=NEW)
    ttft, rate, out = float("inf"), 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        seq = engine.add(ids, params, pv)
        engine.step()
        t1 = time.perf_counter()
        while engine.has_work():
            engine.step()
        t2 = time.perf_counter()
        ttft, rate, out = min(ttft, t1 - t0), max(rate, (NEW - 1) / max(t2 - t1, 1e-9)), seq.output_ids
    install(model, None)
    return {"prefill_s": prefill, "ttft_s": ttft, "decode_tok_s": rate, "logits": logits, "tokens": out}


def agreement(base: dict, run: dict) -> tuple[float, float]:
    """KL(plain || setting) of the next-token distributions, and the share of the NEW greedy tokens that match."""
    p, q = torch.log_softmax(base["logits"], -1), torch.log_softmax(run["logits"], -1)
    kl = float((p.exp() * (p - q)).sum())
    same = sum(a == b for a, b in zip(base["tokens"], run["tokens"])) / NEW
    return max(kl, 0.0), same


# ---- models -----------------------------------------------------------------------------------------------


def timing_model(shape: str, keep: str | None, dtype: str):
    """(model, (img start, img end, IMG_CONTEXT) ids): random weights of a released shape from a checkpoint
    written once (bf16), or the tiny test shape built in memory."""
    from internvl.checkpoint.io import build_model, load_model
    from internvl.presets import preset

    if shape == "tiny":
        cfg = preset("tiny")
        v = cfg.llm.vocab_size
        torch.manual_seed(0)
        model = build_model(cfg, v - 1, meta=False).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name and not name.endswith((".ls1", ".ls2")):
                    p.normal_(0, 0.1 if "vision_model" in name else 0.3)
        return model, (v - 3, v - 2, v - 1)
    folder = Path(keep) if keep else Path(tempfile.gettempdir()) / f"internvl-bench-{shape}"
    model, _ = load_model(random_checkpoint(folder, shape), image_token_id=151667,
                          dtype=None if dtype == "stored" else dtype)  # fmt: skip
    return model.eval(), (151665, 151666, 151667)


# ---- the run ----------------------------------------------------------------------------------------------


def timing_table(args, folder: Path) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, ids3 = timing_model(args.shape, args.keep, args.dtype)
    cfg = model.config
    rows, base = [], None
    llm = cfg.llm
    pv = image_tiles(cfg, EfficiencyConfig(), args.tiles)  # a warm-up run: the first row is not the slowest
    measure(model, EfficiencyConfig(), prompt(ids3, pv.shape[0], cfg.num_image_token, llm.vocab_size), pv, 1)
    for key, (method, label, spec) in chosen(settings_for(llm.num_hidden_layers, llm.num_attention_heads,
                                        cfg.num_image_token, folder, args.schedule, args.head_mask), args.only):  # fmt: skip
        reason = why_not(spec, model)
        if reason is not None:
            print(f"skipped {label} ({spec}): {reason}", flush=True)
            continue
        eff = EfficiencyConfig.from_spec(spec)
        pv = image_tiles(cfg, eff, args.tiles)
        ids = prompt(ids3, pv.shape[0], cfg.num_image_token, cfg.llm.vocab_size)
        run = measure(model, eff, ids, pv, args.repeats)
        base = base or run
        kl, same = agreement(base, run)
        row = {"key": key, "method": method, "label": label, "spec": spec, "tiles": pv.shape[0], "tokens": len(ids),
               **gflops(cfg, pv.shape[0], eff), "kl": kl, "greedy_agree": same,
               **{k: run[k] for k in ("prefill_s", "ttft_s", "decode_tok_s")}}  # fmt: skip
        rows.append(row)
        print(f"{label}: {row['gflops']:.4g} GFLOPs, prefill {row['prefill_s']:.3g} s, TTFT {row['ttft_s']:.3g} s, "
              f"{row['decode_tok_s']:.1f} tok/s, KL {kl:.3g}, greedy {same:.0%}", flush=True)  # fmt: skip
    return rows


def accuracy_table(args, folder: Path) -> dict[int, dict]:
    """Setting number -> the built-in model's accuracy on the synthetic test split (overall, per task) and its
    prefill GFLOPs, each setting made for its depth (FastV at layer 2, drop after half the layers)."""
    from internvl.api import load
    from internvl.eval import synthetic_split
    from internvl.eval.runner import default_max_num

    model = load(None, device="cpu")
    cfg = model.config
    tasks = args.tasks.split(",") if args.tasks else None
    split = synthetic_split("test", args.split_n, tasks)
    own = folder / "builtin"
    own.mkdir(exist_ok=True)
    out = {}
    llm = cfg.llm
    max_num = args.builtin_max_num or default_max_num(model)  # tiles per image (the built-in model: 1)
    for key, (method, label, spec) in chosen(settings_for(llm.num_hidden_layers, llm.num_attention_heads,
                                            cfg.num_image_token, own, args.builtin_schedule,
                                            args.builtin_head_mask), args.only):  # fmt: skip
        reason = why_not(spec, model.model)
        if reason is not None:
            print(f"accuracy: skipped {label}: {reason}", flush=True)
            continue
        if method == "budget":  # the same share of the plain image's tiles as in the timing table
            share = int(spec.partition("=")[2]) / cfg.num_image_token / (args.tiles + 1)
            spec = f"max_visual_tokens={max(1, round(share * (max_num + 1))) * cfg.num_image_token}"
        model.use_efficiency(spec)
        t0 = time.perf_counter()
        summary, left_out = evaluate_fitting(model, split, tasks, args, own / f"eval-{len(out)}", max_num)
        eff = EfficiencyConfig.from_spec(spec)
        tiles = image_tiles(cfg, eff, max_num).shape[0]
        out[key] = {"method": method, "label": label, "spec": spec, "overall": summary["overall"],
                    "tasks": {t: r["accuracy"] for t, r in summary["tasks"].items()}, "left_out": left_out,
                    **gflops(cfg, tiles, eff)}  # fmt: skip
        print(f"accuracy {label}: {summary['overall']:.1%} ({time.perf_counter() - t0:.0f} s)"
              + (f", without {', '.join(left_out)}" if left_out else ""), flush=True)  # fmt: skip
    model.use_efficiency(None)
    return out


def evaluate_fitting(model, split, tasks, args, folder: Path, max_num: int) -> tuple[dict, list[str]]:
    """(summary, tasks left out): the tasks whose prompts the setting refuses (a visual-token budget below one
    tile per video frame) are left out, named, and the rest evaluated."""
    from internvl.errors import PromptError
    from internvl.eval import SyntheticTask, evaluate
    from internvl.synth import TASKS

    names, left_out = list(tasks or TASKS), []
    while True:
        try:
            task = SyntheticTask(split, names, limit=args.n)
            return evaluate(model, task, folder, batch_size=args.batch_size, max_num=max_num,
                            progress=False), left_out  # fmt: skip
        except PromptError as exc:
            refused = str(exc).removeprefix("question ").partition("/")[0]
            if refused not in names or len(names) == 1:
                raise
            print(f"accuracy: {refused} left out: {exc}", flush=True)
            names.remove(refused)
            left_out.append(refused)
            shutil.rmtree(folder, ignore_errors=True)


def same_tasks(plain_acc: dict | None, a: dict, plain: float) -> float:
    """The plain model's accuracy over the tasks that setting `a` was scored on (all of them, unless it left some
    out), so that 'vs plain' compares like with like."""
    if not a.get("left_out") or not plain_acc or not plain_acc["tasks"]:
        return plain
    kept = [v for t, v in plain_acc["tasks"].items() if t not in a["left_out"]]
    return sum(kept) / len(kept)


def markdown(rows: list[dict], acc: dict[int, dict]) -> str:
    head = ["setting", "spec", "tiles", "GFLOPs", "FLOPs", "decoder FLOPs", "prefill s", "TTFT s", "TTFT speed-up",
            "decode tok/s", "KL", f"greedy {NEW}"]  # fmt: skip
    tasks = sorted({t for a in acc.values() for t in a["tasks"]})
    if acc:
        head += ["accuracy", "vs plain", *tasks]
    base = rows[0]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    plain = acc.get(base["key"], {}).get("overall")
    for r in rows:
        cells = [r["method"] + ": " + r["label"], f"`{r['spec']}`" if "/" not in r["spec"] else "(file)", r["tiles"],
                 f"{r['gflops']:.4g}", f"{r['gflops'] / base['gflops']:.0%}",
                 f"{r['decoder_gflops'] / base['decoder_gflops']:.0%}", f"{r['prefill_s']:.3g}",
                 f"{r['ttft_s']:.3g}", f"{base['ttft_s'] / r['ttft_s']:.2f}x", f"{r['decode_tok_s']:.1f}",
                 f"{r['kl']:.3g}", f"{r['greedy_agree']:.0%}"]  # fmt: skip
        if acc:
            a = acc.get(r["key"])
            cells += ["-"] * (2 + len(tasks)) if a is None else [
                f"{a['overall']:.1%}" + (f" (no {', '.join(a['left_out'])})" if a.get("left_out") else ""),
                f"{(a['overall'] - same_tasks(acc.get(base['key']), a, plain)) * 100:+.1f}" if plain is not None else "-",
                *(f"{a['tasks'].get(t, float('nan')):.0%}" for t in tasks)]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], acc: dict[int, dict], path: str) -> None:
    """Accuracy (or, without --accuracy, greedy agreement) against prefill FLOPs relative to plain, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if acc:
        base = acc[next(iter(acc))]["gflops"]
        points = [(a["method"], a["label"], a["gflops"] / base, a["overall"]) for a in acc.values()]
        ax.set_ylabel("accuracy, synthetic test split (built-in model)")
    else:
        base = rows[0]["gflops"]
        points = [(r["method"], r["label"], r["gflops"] / base, r["greedy_agree"]) for r in rows]
        ax.set_ylabel(f"first-{NEW} greedy tokens equal to the plain model's")
    for method in dict.fromkeys(p[0] for p in points):
        mine = sorted((p for p in points if p[0] == method), key=lambda p: p[2])
        ax.plot(
            [p[2] for p in mine], [p[3] for p in mine], "o-" if len(mine) > 1 else "*", label=method, ms=7
        )
        for p in mine:
            ax.annotate(p[1], (p[2], p[3]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("prefill FLOPs relative to the plain model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape", default="internvl3-1b", help="a preset: internvl3-1b (default), internvl3.5-1b, tiny"
    )
    ap.add_argument(
        "--tiles", type=int, default=12, help="the image's grid cap (12: 4 x 3 tiles + thumbnail)"
    )
    ap.add_argument("--keep", default=None, help="random checkpoint folder to reuse (written if empty)")
    ap.add_argument("--dtype", default="stored", choices=("stored", "fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--schedule", default=None, help="a keep schedule JSON (internvl calibrate) for the timing shape"
    )
    ap.add_argument(
        "--head-mask", default=None, help="a YOPO head mask JSON (internvl calibrate) for the timing shape"
    )
    ap.add_argument("--accuracy", action="store_true", help="also the built-in model's synthetic accuracy")
    ap.add_argument("--n", type=int, default=50, help="items per task for --accuracy")
    ap.add_argument("--split-n", type=int, default=200, help="items per task of the cached test split")
    ap.add_argument("--tasks", default=None, help="synthetic tasks (default: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--builtin-max-num",
        type=int,
        default=None,
        help="tiles per image for --accuracy (default: the model's; the pyramid and budget need > 1)",
    )
    ap.add_argument(
        "--builtin-schedule", default=None, help="a calibrated keep schedule for the built-in model"
    )
    ap.add_argument("--builtin-head-mask", default=None, help="a calibrated head mask for the built-in model")
    ap.add_argument("--plot", default="bench_efficiency.png")
    ap.add_argument(
        "--accuracy-only", action="store_true", help="only the accuracy table (implies --accuracy)"
    )
    ap.add_argument(
        "--only",
        type=lambda v: v.split(","),
        default=None,
        help="only these settings, by label (comma-separated): e.g. 'plain,7 tiles'",
    )
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument(
        "--quick", action="store_true", help="tiny shape, 2 x 2 tiles, 8 tokens: checks that it runs"
    )
    args = ap.parse_args()
    global NEW
    if args.quick:
        args.shape, args.tiles, args.repeats, NEW = "tiny", 4, 1, 8
        args.n, args.split_n, args.tasks = min(args.n, 2), 2, args.tasks or "color"
    print(
        f"bench_efficiency: {args.shape}, {args.tiles} tiles, {args.threads} threads, {cpu_features()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if args.accuracy_only else timing_table(args, Path(tmp))
        acc = accuracy_table(args, Path(tmp)) if args.accuracy or args.accuracy_only else {}
    if rows:
        print(markdown(rows, acc))
    for a in acc.values():
        print(f"{a['label']}: {a['overall']:.1%}", *(f"{t} {v:.0%}" for t, v in a["tasks"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "accuracy": acc}, indent=1) + "\n")
    plot(rows, acc, args.plot)


if __name__ == "__main__":
    main()
