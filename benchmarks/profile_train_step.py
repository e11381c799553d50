"""Where one training step of a recipe spends its time, and what packed attention costs.

Builds the run exactly as `internvl finetune MODEL --data META --config YAML` would (same model preparation,
same packed micro-batches, same objective: the binding loss and its readouts where the config sets them), then
times a few optimizer steps split into: the vision encoder, the projector, the decoder's forward and backward (the
objective's hooks included), the optimizer. Achieved FLOP/s of the decoder's matmuls are set against
a plain matmul of the same width measured in the same process (the machine's practical peak for that dtype).
The packed batches run twice: attention per sample (`Spans`, what training uses) and one block-diagonal mask
over the whole pack (the earlier code path), so the ratio of the two is measured on the same data. With
`--compile` they run a third time with the vision layers and the decoder's norms and feed-forward blocks
compiled (`--compile` of `internvl finetune`); the first compiled step, which builds the kernels, is timed
apart.

    python benchmarks/profile_train_step.py MODEL --data META.json --config configs/train/nano.yaml \
        [--steps 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import cpu_features

PARTS = ("vision", "forward (all, incl. vision again)", "backward", "optimizer", "tokens", "samples")


def matmul_peak(n: int, k: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of an [n, k] x [k, k] matmul in `dtype`, the best of a few timed bursts."""
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, k, dtype=dtype)
    best = 0.0
    for _ in range(5):
        t, reps = time.perf_counter(), 0
        while time.perf_counter() - t < seconds / 5:
            a @ b
            reps += 1
        best = max(best, 2 * n * k * k * reps / (time.perf_counter() - t))
    return best


def main() -> None:
    from internvl.model import llm as llm_module
    from internvl.train.args import TrainArgs, read_yaml
    from internvl.train.dist import init_distributed
    from internvl.train.run import prepare_model, sft_data, training_objective

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/profile_train_step")
    ap.add_argument("--compile", action="store_true", help="also time the step with torch.compile'd regions")
    a = ap.parse_args()

    values = {**read_yaml(a.config), "data": a.data, "out": a.out, "num_workers": 0}
    if (Path(a.model) / "model.safetensors").exists():
        values["model"] = a.model
    else:  # a folder `internvl nano prepare` wrote: random weights
        values.update(init_from_config=str(Path(a.model) / "config.json"), tokenizer=a.model)
    args = TrainArgs.from_dict(values)
    torch.set_num_threads(args.run.threads or torch.get_num_threads())
    torch.set_flush_denormal(True)
    ctx = init_distributed("cpu")
    prepared = prepare_model(args, ctx, log=lambda _m: None)
    model, compute = prepared.model, prepared.compute_dtype
    source = sft_data(args, prepared, ctx).source
    steps = []
    for micro, _state, _epoch in source(None):
        steps.append(micro)
        if len(steps) == a.steps + 1:
            break
    objective = training_objective(args)  # the config's: SFT, or SFT plus the binding loss and readouts
    objective.setup(model, torch.device("cpu"))
    model.train()  # as the trainer does (the binding loss scores training forwards only)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    llm = model.language_model
    hidden, layers = llm.config.hidden_size, llm.config.num_hidden_layers
    dense = sum(p.numel() for n, p in llm.named_parameters() if "layers." in n and p.dim() == 2)

    def timed_step(micro, parts: dict) -> None:
        for batch in micro:
            with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
                t = time.perf_counter()
                with torch.no_grad() if not any(p.requires_grad for p in model.vision_model.parameters()) \
                        else torch.enable_grad():  # fmt: skip
                    vit = model.vision_model(batch.pixel_values)
                parts["vision"] += time.perf_counter() - t
                t = time.perf_counter()
                out = objective(model, batch)
                parts["forward (all, incl. vision again)"] += time.perf_counter() - t
            t = time.perf_counter()
            out.loss_sum.backward()
            parts["backward"] += time.perf_counter() - t
            parts["tokens"] += batch.num_tokens
            parts["samples"] += batch.num_samples
            del vit
        t = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        parts["optimizer"] += time.perf_counter() - t

    report = {"cpu": cpu_features(), "threads": torch.get_num_threads(), "compute_dtype": str(compute),
              "objective": objective.name}
    modes = ["spans", "block-diagonal mask"] + (["spans, compiled regions"] if a.compile else [])
    for mode in modes:
        llm_module.PACKED_ATTENTION = "mask" if mode == "block-diagonal mask" else "spans"
        if mode == "spans, compiled regions":
            from internvl.train.compiled import compile_regions

            report["compiled modules"] = compile_regions(model)
        t = time.perf_counter()
        timed_step(steps[0], dict.fromkeys(PARTS, 0.0))  # warm-up
        warm = time.perf_counter() - t
        parts = dict.fromkeys(PARTS, 0.0)
        t0 = time.perf_counter()
        for micro in steps[1:]:
            timed_step(micro, parts)
        wall = time.perf_counter() - t0
        n = len(steps) - 1
        decoder_flops = 6 * dense * parts["tokens"]  # forward + backward of the decoder's linear layers
        fwd_bwd = parts["forward (all, incl. vision again)"] + parts["backward"] - parts["vision"]
        report[mode] = {
            "seconds per step": round(wall / n, 3),
            "samples per step": parts["samples"] / n,
            "tokens per step": parts["tokens"] / n,
            "vision encoder s": round(parts["vision"] / n, 3),
            "decoder+projector forward+backward s": round(fwd_bwd / n, 3),
            "optimizer s": round(parts["optimizer"] / n, 3),
            "decoder linear GFLOP/s (achieved)": round(decoder_flops / max(fwd_bwd, 1e-9) / 1e9, 1),
            "first step s (compiles when compiled)": round(warm, 1),
        }
    peak_dtype = compute if compute != torch.float32 else torch.float32
    report["matmul peak GFLOP/s"] = round(matmul_peak(2048, hidden, peak_dtype) / 1e9, 1)
    report["samples/s ratio, spans / mask"] = round(
        report["block-diagonal mask"]["seconds per step"] / report["spans"]["seconds per step"], 2
    )
    if a.compile:
        report["samples/s ratio, compiled / eager spans"] = round(
            report["spans"]["seconds per step"] / report["spans, compiled regions"]["seconds per step"], 2
        )
    report["layers"] = layers
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
