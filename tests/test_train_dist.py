"""Two CPU processes under torchrun (gloo, FSDP2) give the same losses as one process with the same global batch."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from refmodels import tiny_checkpoint

from internvl.train.args import TrainArgs
from internvl.train.run import train


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("dist") / "model")


def losses(path):
    return [float(r["loss"]) for r in csv.DictReader(open(path))]


def test_two_ranks_match_one_rank(model, meta, tmp_path):
    common = {"model": str(model), "data": str(meta), "max_steps": 10, "lr": 1e-3, "log_every": 1, "num_workers": 0,
              "max_seq_length": 256, "grad_checkpoint": False, "tensorboard": False, "save_every": 0, "threads": 1,
              "seed": 5}  # fmt: skip
    # one process: micro-batch 2, accumulation 2 (global batch 4)
    n = torch.get_num_threads()
    try:
        one = train(TrainArgs.from_dict({**common, "out": str(tmp_path / "one"), "batch_size": 2, "grad_accum": 2}),
                    log=lambda _m: None)  # fmt: skip
    finally:
        torch.set_num_threads(n)
    # two processes: micro-batch 2 each, no accumulation (global batch 4), FSDP2 over gloo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # = torchrun
           "-m", "internvl", "finetune", str(model), "--data", str(meta), "--out", str(tmp_path / "two"),
           "--batch-size", "2", "--max-steps", "10", "--lr", "1e-3", "--log-every", "1", "--num-workers", "0",
           "--max-seq-length", "256", "--no-grad-checkpoint", "--no-tensorboard", "--save-every", "0",
           "--threads", "1", "--seed", "5"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = losses(tmp_path / "two" / "metrics.csv")
    assert len(two) == 10 and len(one.history) == 10
    for a, b in zip([h["loss"] for h in one.history], two):
        assert abs(a - b) < 1e-4, (a, b)
    # the sharded run's final weights are gathered into a normal checkpoint close to the single-process one
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3
