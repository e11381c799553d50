"""Decode-time matrix-vector throughput on CPU: torch bf16 / int8 against the internvl AVX-512 kernels.

Prints the measured read bandwidth, GB/s of weight bytes read per shape of a Qwen2.5-0.5B decoder layer
and its lm_head, and a whole simulated decode step (24 layers x 7 distinct matrices + lm_head) in
ms/token, tokens/s and fraction of the bandwidth roofline, alone and alternating with small torch ops.
`--model-step` also times the real decoder of that shape (random weights): the one-call decode step of
`internvl.kernels.decode` against the same model's modules, in bf16, int8, int4 (x rounded to int8 per group, the
default) and int4-fp32x (the exact fp32-x int4 path); `--only-model-step bf16,int4,int4-fp32x` times just those.
Each shape loops over enough distinct matrices (> 600 MB) that the host's last-level cache cannot
serve them. Times are the best of several repeats (the machine may have other tenants), every path
measured the same way in the same run, and the read bandwidth is sampled between them.

    python benchmarks/bench_gemv.py [--quick] [--rows 1] [--threads N] [--skip-shapes] [--model-step]
    python benchmarks/bench_gemv.py --threads 2 --only-model-step bf16,int4,int4-fp32x
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from internvl import kernels

HIDDEN, INTER, VOCAB, LAYERS, KV = 896, 4864, 151674, 24, 128
LAYER_SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
                "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
SHAPES = {**LAYER_SHAPES, "lm_head": (VOCAB, HIDDEN)}
REFERENCE = "torch F.linear bf16"
INT4_BYTES = 18 / 32  # per weight: 16 bytes of nibbles and a 2-byte scale per group of 32
STEP_MODES = ("bf16", "int8", "int4", "int4-fp32x")  # int4: x rounded to int8 per group (the default); fp32x: not


def best_time(fn, repeats: int) -> float:
    """Best seconds of fn() over repeats, after a warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class Bandwidth:
    """Read bandwidth sampled between measurements: the host's memory is shared, so the roofline is
    the best of all samples taken during the run (a 1 GiB read each time)."""

    def __init__(self):
        self.buf = torch.ones(256 * 1024 * 1024)
        self.sum_gbs = self.pass_gbs = 0.0

    def sample(self, repeats: int = 2) -> None:
        nbytes = self.buf.numel() * 4
        self.sum_gbs = max(self.sum_gbs, nbytes / best_time(self.buf.sum, repeats) / 1e9)
        if kernels.available():
            t = best_time(lambda: kernels.read_pass(self.buf), repeats)
            self.pass_gbs = max(self.pass_gbs, nbytes / t / 1e9)

    @property
    def roofline(self) -> float:
        return max(self.sum_gbs, self.pass_gbs)


def _onednn(w):
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def _int8pack(w):
    q, s = kernels.quantize_int8(w)
    return q, s.to(torch.bfloat16)


def make_paths():
    """name -> (prepare(w_bf16) -> handle, run(x, handle), bytes per weight element)."""
    paths = {
        REFERENCE: (lambda w: w, lambda x, w: F.linear(x, w), 2),
        "torch oneDNN prepacked": (
            _onednn, lambda x, h: torch.ops.mkldnn._linear_pointwise(x, h, None, "none", [], ""), 2),
        "torch int8pack_mm": (_int8pack, lambda x, h: torch._weight_int8pack_mm(x, *h), 1),
    }
    if kernels.available():
        paths["ours bf16"] = (lambda w: w, lambda x, w: kernels.linear_bf16(x, w), 2)
        paths["ours int8"] = (kernels.quantize_int8, lambda x, h: kernels.linear_int8(x, *h), 1)
        paths["ours int8 quantize_x"] = (kernels.quantize_int8,
                                         lambda x, h: kernels.linear_int8(x, *h, quantize_x=True), 1)
        paths["ours int4 fp32 x"] = (kernels.quantize_int4, lambda x, h: kernels.linear_int4(x, *h), INT4_BYTES)
        paths["ours int4 int8 x"] = (kernels.quantize_int4,
                                     lambda x, h: kernels.linear_int4(x, *h, quantize_x=True), INT4_BYTES)
    return paths


def bench_shape(shape, paths, rows, min_bytes, repeats, bw):
    n, k = shape
    count = max(2, -(-min_bytes // (n * k)))  # distinct matrices, counted in int8 bytes (bf16 doubles)
    ws = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    out = {}
    for pname, (prep, run, esize) in paths.items():
        hs = [prep(w) for w in ws]

        def loop(hs=hs, run=run):
            for h in hs:
                run(x, h)

        bw.sample(1)
        t = best_time(loop, repeats) / count
        out[pname] = (t, n * k * esize / t / 1e9)
        del hs, loop
    return out


def per_call_overhead(paths, repeats):
    """Microseconds per call on a 16 x 64 weight that stays in L1: the fixed cost of a call."""
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    res = {}
    for pname, (prep, run, _) in paths.items():
        h = prep(w)
        res[pname] = best_time(lambda run=run, h=h: [run(x, h) for _ in range(2000)], repeats) / 2000 * 1e6
    return res


def decode_step(paths, rows, repeats, bw):
    """All 24 layers' 7 matrices + lm_head with distinct weights, the paths alternating round by round.

    Returns path -> (seconds matmuls only, seconds matmuls alternating with torch ops, bytes), and the
    seconds of the torch ops alone: interleaving costs nothing when alternating ~= matmuls + ops.
    """
    shapes = [s for _ in range(LAYERS) for s in LAYER_SHAPES.values()] + [SHAPES["lm_head"]]
    ws = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for n, k in shapes]
    xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
    ys = [torch.randn(rows, n, dtype=torch.bfloat16) for n, _ in shapes]

    def torch_ops(y):  # the small ops a layer runs between its matmuls (activation, norm)
        y = F.silu(y) * y
        return y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(y.dtype)

    handles = {p: [prep(w) for w in ws] for p, (prep, _, _) in paths.items()}
    t_ops = best_time(lambda: [torch_ops(y) for y in ys], repeats)
    best = {p: [float("inf"), float("inf")] for p in paths}
    for _ in range(repeats):
        bw.sample(1)
        for p, (_, run, _) in paths.items():
            pairs = list(zip([xs[k] for _, k in shapes], handles[p]))
            best[p][0] = min(best[p][0], best_time(
                lambda run=run, pairs=pairs: [run(x, h) for x, h in pairs], 1))
            best[p][1] = min(best[p][1], best_time(
                lambda run=run, pairs=pairs: [torch_ops(run(x, h)) for x, h in pairs], 1))
    res = {p: (*best[p], sum(n * k * esize for n, k in shapes)) for p, (_, _, esize) in paths.items()}
    return res, t_ops


def random_decoder(rows: int, context: int):
    """A Qwen2.5-0.5B-shaped CausalLM with random bf16 weights, and a cache of `rows` rows of `context`."""
    from internvl.config import LLMConfig
    from internvl.model.llm import CausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            lm = CausalLM(LLMConfig())
    finally:
        torch.set_default_dtype(old)
    lm = lm.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02, generator=g)
        cache = lm.new_cache(rows, capacity=context + 256)
        lm(lm.model.embed_tokens(torch.randint(0, 1000, (rows, context), generator=g)), cache=cache,
           logits_to_keep=1)
    return lm, cache


def model_step(rows: int, repeats: int, bw, context: int = 300, modes=STEP_MODES) -> dict:
    """ms per decoding step of the real decoder: the one-call C step against its modules, per weight format
    (int4-fp32x: int4 layers built with INTERNVL_INT4_ACTIVATIONS=fp32, the exact path int4 had before)."""
    import os
    from types import SimpleNamespace

    from internvl.engine.accelerate import FusedStep, decode_step, quantize_model, use_decode_kernels

    out = {}
    for mode in modes:
        lm, cache = random_decoder(rows, context)
        if mode == "bf16":
            use_decode_kernels(SimpleNamespace(language_model=lm))
        else:  # the int4 layers read INTERNVL_INT4_ACTIVATIONS when they are built
            os.environ[kernels.ops.INT4_X_ENV] = "fp32" if mode == "int4-fp32x" else "int8"
            quantize_model(SimpleNamespace(language_model=lm), mode.split("-")[0])
            del os.environ[kernels.ops.INT4_X_ENV]
        streamed = sum(t.numel() * t.element_size() for name, t in [*lm.named_parameters(), *lm.named_buffers()]
                       if "embed_tokens" not in name)
        fused = decode_step(SimpleNamespace(language_model=lm, decode=lm.decode))
        tokens = torch.full((rows,), 5)
        best = {"one C call": float("inf"), "modules": float("inf")}
        with torch.inference_mode():
            for _ in range(repeats):
                bw.sample(1)
                for path, decode in (("one C call", fused), ("modules", lm.decode)):
                    if path == "one C call" and not isinstance(fused, FusedStep):
                        continue

                    def step(decode=decode, cache=cache, tokens=tokens):
                        decode(tokens, cache)
                        cache.lengths -= 1  # the same position every time

                    best[path] = min(best[path], best_time(step, 3))
        out[mode] = (best, streamed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="rows of x (decode batch), at most 8 for the kernels")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and ~300 MB per shape")
    ap.add_argument("--skip-shapes", action="store_true", help="only the whole decode step")
    ap.add_argument("--model-step", action="store_true", help="also the real decoder's step (2 GB of memory)")
    ap.add_argument("--only-model-step", default=None, metavar="MODES",
                    help=f"only the real decoder's step, for these comma-separated formats of {','.join(STEP_MODES)} "
                         "(e.g. bf16,int4,int4-fp32x: int4 decode with int8 x against the exact fp32-x path)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    min_bytes = (300 if args.quick else 700) * 2**20
    status = "available" if kernels.available() else f"UNAVAILABLE ({kernels.unavailable_reason()})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rows={args.rows}, kernels {status}")
    bw = Bandwidth()
    bw.sample(repeats)
    if args.only_model_step:
        modes = tuple(args.only_model_step.split(","))
        if not set(modes) <= set(STEP_MODES):
            raise SystemExit(f"--only-model-step: expected formats among {','.join(STEP_MODES)}, got {args.only_model_step}")
        print_steps(model_step(args.rows, repeats, bw, modes=modes), args.rows, bw.roofline)
        return
    paths = make_paths()
    width = max(len(p) for p in paths)
    overhead = per_call_overhead(paths, repeats)
    results = {} if args.skip_shapes else {
        name: bench_shape(shape, paths, args.rows, min_bytes, repeats, bw) for name, shape in SHAPES.items()}
    res, t_ops = decode_step(paths, args.rows, repeats, bw)
    steps = model_step(args.rows, repeats, bw) if args.model_step else {}
    roof = bw.roofline

    print(f"read bandwidth, best of the samples over the run: torch.sum {bw.sum_gbs:.1f} GB/s, "
          f"prefetching read pass {bw.pass_gbs:.1f} GB/s; the roofline below is the higher, {roof:.1f} GB/s")
    print("per-call overhead (16x64 weight): " + ", ".join(f"{p} {us:.1f} us" for p, us in overhead.items()))
    if results:
        print(f"\nGB/s of weight bytes read (fraction of {roof:.1f} GB/s) and time per matrix, "
              f"rows={args.rows}")
        print(f"{'path':>{width}} | " + " | ".join(f"{n:>7} {s[0]}x{s[1]:<5}" for n, s in SHAPES.items()))
        for p in paths:
            cells = [f"{results[n][p][1]:5.1f} {results[n][p][1] / roof:4.0%} {results[n][p][0] * 1e6:5.0f}us"
                     for n in SHAPES]
            print(f"{p:>{width}} | " + " | ".join(f"{c:>20}" for c in cells))
    print(f"\nwhole decode step ({LAYERS} layers x 7 matrices + lm_head, distinct weights), "
          f"rows={args.rows}; {LAYERS * 7 + 1} rounds of small torch ops alone take {t_ops * 1e3:.2f} ms")
    for p, (t_mm, t_mix, nbytes) in res.items():
        gbs = nbytes / t_mm / 1e9
        print(f"  {p:>{width}}: {t_mm * 1e3:6.2f} ms/token {1 / t_mm:5.1f} tok/s {nbytes / 1e6:4.0f} MB "
              f"{gbs:5.1f} GB/s = {gbs / roof:4.0%} of roofline, "
              f"{res[REFERENCE][0] / t_mm:4.2f}x {REFERENCE} | "
              f"with torch ops {t_mix * 1e3:6.2f} ms (matmuls + ops alone {(t_mm + t_ops) * 1e3:6.2f})")
    if "ours bf16" in res:
        b = res["ours bf16"][0]
        print("  speedup over ours bf16: " + ", ".join(f"{p.removeprefix('ours ')} {b / res[p][0]:.2f}x" for p in res
                                                       if p.startswith("ours ") and p != "ours bf16"))
    if steps:
        print_steps(steps, args.rows, roof)


def print_steps(steps: dict, rows: int, roof: float) -> None:
    print(f"\nreal decoder step (random Qwen2.5-0.5B weights = InternVL3-1B's decoder, 300 cached tokens), rows={rows}: "
          f"norms, RoPE, attention and the rest included")
    for mode, (best, nbytes) in steps.items():
        for path, t in best.items():
            if t == float("inf"):
                print(f"  {mode} {path:>10}: unavailable here")
                continue
            gbs = nbytes / t / 1e9
            print(f"  {mode} {path:>10}: {t * 1e3:6.2f} ms/token {rows / t:6.1f} tok/s {nbytes / 1e6:4.0f} MB "
                  f"{gbs:5.1f} GB/s = {gbs / roof:4.0%} of roofline, {best['modules'] / t:4.2f}x the modules")
    c = {mode: best["one C call"] for mode, (best, _) in steps.items()}
    if c.get("bf16", float("inf")) < float("inf"):
        print("  speedup over bf16 (one C call): " + ", ".join(f"{m} {c['bf16'] / t:.2f}x" for m, t in c.items()
                                                               if m != "bf16" and t < float("inf")))


if __name__ == "__main__":
    main()
