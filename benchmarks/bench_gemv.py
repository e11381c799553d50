"""Decode-time matrix-vector throughput on CPU: torch bf16 / int8 against the internvl AVX-512 kernels.

Prints the measured read bandwidth, GB/s of weight bytes read per shape of a Qwen2.5-0.5B decoder layer
and its lm_head (one row of x), and a whole simulated decode step (24 layers x 7 distinct matrices +
lm_head) in ms/token, tokens/s and fraction of the bandwidth roofline. Each shape loops over enough
distinct matrices (> 600 MB) that the host's last-level cache cannot serve them.

    python benchmarks/bench_gemv.py [--quick] [--rows 1] [--threads N]
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


def timed(fn, repeats: int) -> float:
    """Best seconds of fn() over repeats after a warm-up call (the machine may have other tenants)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth(repeats: int) -> tuple[float, float]:
    """GB/s of a 1 GiB read: torch.sum over fp32 and the kernel library's prefetching read pass."""
    buf = torch.ones(256 * 1024 * 1024)
    t_sum = min(timed(buf.sum, 3) for _ in range(repeats))
    t_pass = min(timed(lambda: kernels.read_pass(buf), 3) for _ in range(repeats)) if kernels.available() else 0
    nbytes = buf.numel() * 4
    return nbytes / t_sum / 1e9, (nbytes / t_pass / 1e9 if t_pass else float("nan"))


def make_paths(rows: int):
    """name -> (prepare(w_bf16) -> handle, run(x, handle), bytes per weight element)."""
    paths = {
        "torch bf16 F.linear": (lambda w: w, lambda x, w: F.linear(x, w), 2),
        "torch int8pack_mm": (lambda w: _int8pack(w), lambda x, h: torch._weight_int8pack_mm(x, *h), 1),
    }
    if kernels.available():
        paths["ours bf16"] = (lambda w: w, lambda x, w: kernels.linear_bf16(x, w), 2)
        paths["ours int8"] = (lambda w: kernels.quantize_int8(w), lambda x, h: kernels.linear_int8(x, *h), 1)
    return paths


def _int8pack(w):
    q, s = kernels.quantize_int8(w)
    return q, s.to(torch.bfloat16)


def bench_shape(name, shape, paths, rows, min_bytes, repeats):
    n, k = shape
    count = max(2, -(-min_bytes // (n * k)))  # distinct matrices, counted in int8 bytes (bf16 doubles)
    ws = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    out = {}
    for pname, (prep, run, esize) in paths.items():
        hs = [prep(w) for w in ws]

        def loop():
            for h in hs:
                run(x, h)

        t = timed(loop, repeats) / count
        out[pname] = (t, n * k * esize / t / 1e9)
        del hs
    return out


def decode_step(paths, rows, repeats, interleave):
    """All 24 layers' 7 matrices + lm_head with distinct weights; returns seconds per step per path."""
    shapes = [s for _ in range(LAYERS) for s in LAYER_SHAPES.values()] + [SHAPES["lm_head"]]
    ws = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for n, k in shapes]
    xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
    res = {}
    for pname, (prep, run, esize) in paths.items():
        hs = [prep(w) for w in ws]
        nbytes = sum(n * k * esize for n, k in shapes)

        def step():
            for (n, k), h in zip(shapes, hs):
                y = run(xs[k], h)
                if interleave:  # the small torch ops a real layer runs between its matmuls
                    y = F.silu(y) * y
                    y = y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(y.dtype)

        res[pname] = (timed(step, repeats), nbytes)
        del hs
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="rows of x (decode batch)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and ~300 MB per shape")
    ap.add_argument("--skip-shapes", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    min_bytes = (300 if args.quick else 700) * 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rows={args.rows}, "
          f"kernels: {'available' if kernels.available() else 'UNAVAILABLE: ' + str(kernels.unavailable_reason())}")
    bw_sum, bw_pass = bandwidth(3)
    bw = max(bw_sum, bw_pass) if bw_pass == bw_pass else bw_sum
    print(f"read bandwidth: torch.sum {bw_sum:.1f} GB/s, prefetching read pass {bw_pass:.1f} GB/s "
          f"-> roofline uses {bw:.1f} GB/s")
    paths = make_paths(args.rows)
    if not args.skip_shapes:
        print(f"\n{'shape':>8} {'N x K':>13} | " + " | ".join(f"{p:>22}" for p in paths))
        for name, shape in SHAPES.items():
            r = bench_shape(name, shape, paths, args.rows, min_bytes, repeats)
            cells = [f"{r[p][1]:5.1f} GB/s {r[p][1] / bw:4.0%} {r[p][0] * 1e6:6.0f}us" for p in paths]
            print(f"{name:>8} {shape[0]:>6}x{shape[1]:<6} | " + " | ".join(f"{c:>22}" for c in cells))
    for interleave in (False, True):
        res = decode_step(paths, args.rows, max(3, repeats // 2), interleave)
        label = "with silu/rmsnorm torch ops between matmuls" if interleave else "matmuls only"
        print(f"\nwhole decode step ({LAYERS} layers x 7 + lm_head, distinct weights), {label}:")
        base = res["torch bf16 F.linear"][0]
        for p, (t, nbytes) in res.items():
            print(f"  {p:>22}: {t * 1e3:7.2f} ms/token {1 / t:6.1f} tok/s  {nbytes / 1e6:5.0f} MB  "
                  f"{nbytes / t / 1e9:5.1f} GB/s = {nbytes / t / 1e9 / bw:4.0%} of roofline  "
                  f"{base / t:4.2f}x torch bf16")
        if "ours bf16" in res:
            print(f"  ours int8 / ours bf16 speedup: {res['ours bf16'][0] / res['ours int8'][0]:.2f}x")


if __name__ == "__main__":
    main()
