"""CPU decoding: ours vs llama.cpp (llama-cpp-python) on the same language model, the Qwen2 decoder of InternVL3-1B
(Qwen2.5-0.5B shape) with random weights, or a small Qwen2 with --shape small for a quick check.

The random bf16 checkpoint is written once; its language model goes into three GGUF files (benchmarks/gguf_export.py:
BF16, Q8_0 and Q4_0, every matrix in that format, the embedding table BF16 as ours keeps it), so both engines start
from the same tensors, each quantizing in its own format (our int8 is per output row, Q8_0 per 32 weights; our
int4 is Q4_0). Each run is a fresh
process: a 300-token prompt of random ids (prefill tokens/s), then 64 greedy tokens (decode tokens/s), best of
--repeats after a warm-up. Prints the CPU's features and both engines' kernel paths, one table with the ratios
ours / llama.cpp per precision, and each run's last prompt logits' cosine similarity to our bf16 (llama.cpp BF16
vs ours bf16 is the correctness check: the same weights must give the same logits; below 0.99 the script fails).
llama-cpp-python has no binary wheel on PyPI: pip builds it for the CPU it runs on (-march=native).

    pip install -e '.[bench]'   # gguf and llama-cpp-python
    python benchmarks/bench_llamacpp.py [--shape small] [--kernels avx2] [--threads 2] [--keep DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import KERNEL_CHOICES, cpu_features, kernels_env, logits_cosine, random_checkpoint, run_child

# --shape small: a Qwen2 decoder of 4 layers (hidden 512, head_dim 64, 2 KV heads), 8192 tokens, tiny vision
SMALL = {"family": "qwen2", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "rope_theta": 1e6, "max_position_embeddings": 4096}  # fmt: skip
PAIRS = (("bf16", "bf16"), ("int8", "q8_0"), ("int4", "q4_0"))  # ours, llama.cpp's

OURS = r"""
import json, resource, sys, time, torch
folder, mode, threads, repeats, prompt_file, new, logits_file = sys.argv[1:8]
torch.set_num_threads(int(threads))
from internvl.checkpoint.io import load_model
from internvl.engine.accelerate import kernel_report, quantize_model, use_decode_kernels
from internvl.engine.engine import Engine
from internvl.engine.sampling import SamplingParams
model, _ = load_model(folder)
if mode in ("int8", "int4"):
    quantize_model(model, mode)
else:
    use_decode_kernels(model)
prompt, new = json.load(open(prompt_file)), int(new)
lm = model.language_model
with torch.inference_mode():
    torch.save(lm(lm.embed(torch.tensor([prompt])), logits_to_keep=1)[0].float(), logits_file + ".pt")
engine = Engine(model, prefix_cache=False)  # every repeat prefills the whole prompt
params = SamplingParams(max_new_tokens=new, min_new_tokens=new)
prefill, decode = float("inf"), 0.0
for i in range(int(repeats) + 1):  # the first run warms up
    t0 = time.perf_counter()
    seq = engine.add(prompt, params)
    engine.step()
    t1 = time.perf_counter()
    while engine.has_work():
        engine.step()
    t2 = time.perf_counter()
    if i:
        prefill, decode = min(prefill, t1 - t0), max(decode, (new - 1) / (t2 - t1))
print(json.dumps({"prefill_s": prefill, "decode_tok_s": decode, "tokens": seq.output_ids,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "kernels": kernel_report(model)}))
"""

LLAMA = r"""
import json, resource, sys, time
import numpy as np
import llama_cpp
path, threads, repeats, prompt_file, new, logits_file = sys.argv[1:7]
prompt, new, threads = json.load(open(prompt_file)), int(new), int(threads)
llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()


def last_logits():  # Llama.eval keeps no logits unless logits_all: read the last row from the context
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))


prefill, decode = float("inf"), 0.0
for i in range(int(repeats) + 1):  # the first run warms up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    last = last_logits().copy()
    tokens = [int(last.argmax())]
    for _ in range(new - 1):
        llm.eval(tokens[-1:])
        tokens.append(int(last_logits().argmax()))
    t2 = time.perf_counter()
    if i:
        prefill, decode = min(prefill, t1 - t0), max(decode, (new - 1) / (t2 - t1))
np.save(logits_file + ".npy", last[None])
print(json.dumps({"prefill_s": prefill, "decode_tok_s": decode, "tokens": tokens,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "kernels": f"llama.cpp {llama_cpp.__version__}: "
                             + llama_cpp.llama_print_system_info().decode().strip()}))
"""


def models(root: Path, shape: str) -> tuple[Path, dict[str, Path]]:
    """The random checkpoint and its language model's GGUF files, written once under `root`."""
    name = "original" if shape == "1b" else "small-original"  # "original" is bench_inference's folder too
    folder = random_checkpoint(root / name, "internvl3-1b" if shape == "1b" else "tiny", "original",
                               None if shape == "1b" else SMALL)  # fmt: skip
    files = {fmt: root / f"{name}-{fmt}.gguf" for _, fmt in PAIRS}
    todo = [fmt for fmt, f in files.items() if not f.exists()]
    if todo:
        from gguf_export import write_gguf

        from internvl.checkpoint.io import load_model

        model, _ = load_model(folder)
        lm = model.language_model
        for fmt in todo:
            print(f"writing {files[fmt]} ...", flush=True)
            write_gguf(lm.state_dict(), lm.config, files[fmt].with_suffix(".part"), fmt).rename(files[fmt])
        del model, lm
    return folder, files


def _agree(a: list[int], b: list[int]) -> int:
    """How many greedy tokens agree before the first difference."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=["1b", "small"], help="1b: InternVL3-1B's Qwen2-0.5B decoder")
    ap.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES, help="our kernel variant (INTERNVL_KERNELS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens decoded")
    ap.add_argument("--keep", default=None, help="folder for the checkpoint and GGUF files (reused when present)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("bench_llamacpp: llama-cpp-python is not installed (pip install -e '.[bench]')")
    header = (f"bench_llamacpp: {args.shape} shape, {args.threads} threads, {args.prompt}-token prompt, {args.new} new "
              f"tokens; {cpu_features()}; {kernels_env(args.kernels)}")  # fmt: skip
    print(header, flush=True)
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_llamacpp_"))
    folder, files = models(root, args.shape)
    import numpy as np
    import torch

    from internvl.checkpoint.layouts import read_config

    vocab = read_config(folder).llm.vocab_size
    prompt = torch.randint(259, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    (root / "prompt.json").write_text(json.dumps(prompt))
    common = (str(args.threads), str(args.repeats), str(root / "prompt.json"), str(args.new))
    runs = {}
    for ours, fmt in PAIRS:
        runs[ours] = run_child(OURS, str(folder), ours, *common, str(root / f"logits_{ours}"))
        runs[fmt.upper()] = run_child(LLAMA, str(files[fmt]), *common, str(root / f"logits_{fmt}"))
    ref = torch.load(root / "logits_bf16.pt", weights_only=True)
    for name, run in runs.items():
        f = root / f"logits_{name.lower()}"
        if name.islower():
            other = torch.load(f.with_suffix(".pt"), weights_only=True)
        else:
            other = torch.from_numpy(np.load(f.with_suffix(".npy")))
        run["logits_cosine_to_our_bf16"] = logits_cosine(other, ref)["mean"]
        top = [set(x[-1].topk(10).indices.tolist()) for x in (other, ref)]
        run["top10_overlap_with_our_bf16"] = len(top[0] & top[1])
    res = {"header": header, "shape": args.shape, "runs": runs,
           "ratios": {ours: {"decode": round(runs[ours]["decode_tok_s"] / runs[fmt.upper()]["decode_tok_s"], 2),
                             "prefill": round(runs[fmt.upper()]["prefill_s"] / runs[ours]["prefill_s"], 2)}
                      for ours, fmt in PAIRS},
           "bf16_greedy_tokens_agreeing": _agree(runs["bf16"]["tokens"], runs["BF16"]["tokens"])}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"\n{header}\nours: {runs['bf16']['kernels']}\n{runs['BF16']['kernels']}")
    if args.kernels == "avx2" and "AVX512 = 1" in runs["BF16"]["kernels"]:
        print("note: llama.cpp runs its AVX-512 build here; for AVX2 against AVX2, install llama-cpp-python with "
              "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' (another virtualenv)")
    print()
    print("| engine | weights | decode tok/s | prefill tok/s | peak memory | last-logits cosine to our bf16 |")
    print("|---|---|---:|---:|---:|---:|")
    for ours, fmt in PAIRS:
        for engine, name in (("llama.cpp", fmt.upper()), ("ours", ours)):
            r = runs[name]
            print(f"| {engine} | {name} | {r['decode_tok_s']:.2f} | {args.prompt / r['prefill_s']:.1f} | "
                  f"{r['peak_rss'] / 1e9:.2f} GB | {r['logits_cosine_to_our_bf16']:.5f} |")  # fmt: skip
    for ours, fmt in PAIRS:
        q = res["ratios"][ours]
        print(f"ours {ours} / llama.cpp {fmt.upper()}: decode {q['decode']}x (target >= 1), prefill {q['prefill']}x")
    cos = runs["BF16"]["logits_cosine_to_our_bf16"]
    print(f"correctness: llama.cpp BF16 vs ours bf16 last logits: cosine {cos:.5f}, top-10 tokens in common "
          f"{runs['BF16']['top10_overlap_with_our_bf16']} of 10; greedy tokens agreeing "
          f"{res['bf16_greedy_tokens_agreeing']} "
          f"of {args.new} (random weights give near-ties, and our bf16 logits round some to equal values)")
    if cos < 0.99:
        sys.exit(f"bench_llamacpp: llama.cpp and ours disagree on the same bf16 weights (cosine {cos:.4f} < 0.99)")


if __name__ == "__main__":
    main()
