"""Checkpoint loading: time against a plain read of the same files, and peak memory against their size.

A random-weight checkpoint of the InternVL3-1B shape is written in bf16 (original layout), then two fresh
processes run: one reads every byte of the files into memory, one loads the model with `load_model`.
Both run with a warm page cache. Prints the time ratio (target < 2) and peak RSS / checkpoint size (< 1.3).

    python benchmarks/bench_load.py [--preset internvl3-1b] [--layout original|hf] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import random_checkpoint

READ = r"""
import resource, sys, time
from pathlib import Path
files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
bufs = []
for f in files:
    b = bytearray(f.stat().st_size)
    with open(f, "rb", buffering=0) as fh:
        view, done = memoryview(b), 0
        while done < len(b):
            done += fh.readinto(view[done:])
    bufs.append(b)
dt = time.perf_counter() - t
print(dt, base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

LOAD = r"""
import resource, sys, time
import torch
from internvl.checkpoint.io import load_model
torch.set_num_threads(2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
model, report = load_model(sys.argv[1], dtype="bf16")
dt = time.perf_counter() - t
assert not report.missing and all(p.dtype == torch.bfloat16 for p in model.parameters())
print(dt, base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

def run(code: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--layout", default="original", choices=["original", "hf"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    args = ap.parse_args()
    folder = random_checkpoint(Path(args.keep or tempfile.mkdtemp(prefix="bench_load_")), args.preset, args.layout)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    run(READ, str(folder))  # warm the page cache for both measurements
    reads, loads = [], []
    for _ in range(args.repeats):  # interleaved, best of n: the machine is shared and noisy
        reads.append(run(READ, str(folder)))
        loads.append(run(LOAD, str(folder)))
    read_t = min(r[0] for r in reads)
    load = min(loads, key=lambda r: r[0])
    peak_delta = max(r[2] - r[1] for r in loads)
    peak_total = max(r[2] for r in loads)
    result = {
        "checkpoint_gb": round(size / 1e9, 3),
        "read_s": round(read_t, 3),
        "load_s": round(load[0], 3),
        "load_over_read": round(load[0] / read_t, 2),
        "peak_rss_over_size": round(peak_delta / size, 3),
        "peak_rss_total_over_size": round(peak_total / size, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"load time / file read time: {result['load_over_read']:.2f}x (target < 2)")
    print(f"peak RSS added by loading / checkpoint size: {result['peak_rss_over_size']:.3f}x (target < 1.3); "
          f"whole process incl. Python and torch: {result['peak_rss_total_over_size']:.3f}x")
    if not args.keep:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
