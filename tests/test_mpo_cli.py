"""`internvl mpo`: a few steps on a tiny model write a loadable model (full and LoRA), a run resumed from a
checkpoint ends bitwise equal to an uninterrupted one (the reward shift delta is restored), one-line errors,
and the shipped configs parse."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
from refmodels import tiny_checkpoint
from safetensors.torch import load_file

import internvl
from internvl.cli.main import main as cli
from internvl.cli.mpo import add_arguments, from_namespace

FAST = ["--num-workers", "0", "--threads", "1", "--no-grad-checkpoint", "--max-seq-length", "256", "--no-tensorboard",
        "--log-every", "1", "--lr", "2e-3", "--batch-size", "3", "--seed", "4"]  # fmt: skip
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mpo"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("mpocli") / "model")


def mpo(*args) -> int:
    return cli(["mpo", *FAST, *map(str, args)])  # the arguments given win over FAST


def test_runs_and_writes_a_loadable_model(model, pairs, tmp_path):
    assert mpo(model, "--data", pairs, "--out", tmp_path / "full", "--max-steps", 2) == 0
    m = internvl.load(tmp_path / "full" / "final")
    assert isinstance(m.chat("What color is it?", max_new_tokens=3), str)
    rows = list(csv.DictReader((tmp_path / "full" / "metrics.csv").open()))
    assert len(rows) == 2 and all(r["rewards/accuracies"] != "" and r["rewards/margins"] != "" for r in rows)
    assert mpo(model, "--data", pairs, "--out", tmp_path / "lora", "--max-steps", 2, "--lora-r", 4,
               "--beta", 0.2, "--loss-weights", "1,0.5,0.5") == 0  # fmt: skip
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()
    assert isinstance(internvl.load(tmp_path / "lora" / "final").chat("Count: 1 2", max_new_tokens=3), str)


def test_resume_restores_delta_exactly(model, pairs, tmp_path):
    """Stopped after the step-3 checkpoint and resumed: the same weights as an uninterrupted 6-step run; the same
    resume with delta reset to 0 ends elsewhere (so delta really is restored, not recomputed)."""
    steps = ["--max-steps", 6, "--save-every", 3, "--keep-last", 5]
    assert mpo(model, "--data", pairs, "--out", tmp_path / "ref", *steps) == 0
    reference = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))

    def stopped_at_3(name):
        out = tmp_path / name
        assert mpo(model, "--data", pairs, "--out", out, *steps) == 0
        for path in (out / "final", out / "checkpoints" / "step-00000006"):
            for f in sorted(path.iterdir()):
                f.unlink()
            path.rmdir()
        return out

    out = stopped_at_3("run")
    state = json.loads((out / "checkpoints" / "step-00000003" / "rank-0.json").read_text())["data"]["mpo"]
    assert (
        state["mean"] != 0 and state["count"] == pytest.approx(3) and state["loss_weights"] == [0.8, 0.2, 1.0]
    )
    assert mpo(model, "--data", pairs, "--out", out, *steps, "--resume") == 0
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    out = stopped_at_3("reset")
    rank = out / "checkpoints" / "step-00000003" / "rank-0.json"
    saved = json.loads(rank.read_text())
    saved["data"]["mpo"].update(mean=0.0, count=1e-24)
    rank.write_text(json.dumps(saved))
    assert mpo(model, "--data", pairs, "--out", out, *steps, "--resume") == 0
    reset = load_file(str(out / "final" / "model.safetensors"))
    assert not all(torch.equal(reset[k], reference[k]) for k in reference)


def test_resume_refuses_other_loss_settings(model, pairs, tmp_path, capsys):
    out = tmp_path / "r"
    assert mpo(model, "--data", pairs, "--out", out, "--max-steps", 4, "--save-every", 2) == 0
    (out / "final" / "model.safetensors").unlink()
    (out / "final").rename(tmp_path / "gone")
    for f in (out / "checkpoints" / "step-00000004").iterdir():
        f.unlink()
    (out / "checkpoints" / "step-00000004").rmdir()
    assert mpo(model, "--data", pairs, "--out", out, "--max-steps", 4, "--resume", "--beta", 0.3) == 1
    assert "cannot resume: beta was 0.1, now 0.3" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--loss-weights", "1,2"], "arguments: loss_weights must be three non-negative numbers"),
    (["--beta", "-1"], "arguments: beta must be a positive number"),
    (["--packing", "--max-steps", "2"], "--packing is not supported"),
])  # fmt: skip
def test_errors_are_one_line(model, pairs, tmp_path, capsys, extra, message):
    assert mpo(model, "--data", pairs, "--out", tmp_path / "e", *extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("internvl mpo: error: ") and message in err[0], err


def test_configs_parse_and_flags_win(tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= {"full.yaml", "lora.yaml", "nano.yaml"}
    for f in files:
        train_args, mpo_args = from_namespace(p.parse_args(["M", "--data", "d.json", "--config", str(f)]))
        assert train_args.model.model == "M" and mpo_args.beta > 0
    ns = p.parse_args(
        ["M", "--data", "d.json", "--config", str(CONFIGS / "full.yaml"), "--loss-weights", "1,1,0"]
    )
    train_args, mpo_args = from_namespace(ns)
    assert mpo_args.loss_weights == (1.0, 1.0, 0.0) and train_args.optim.lr == 1e-6
    train_args, mpo_args = from_namespace(p.parse_args(["M", "--data", "d.json"]))
    assert (
        train_args.model.out == "runs/mpo"
        and train_args.optim.lr == 1e-6
        and mpo_args.loss_weights == (0.8, 0.2, 1.0)
    )
    assert "(default: 1e-06)" in p.format_help().replace("\n", " ")


@pytest.fixture(scope="module")
def pairs8(pairs, tmp_path_factory):
    """The 7 pairs plus one: every step splits evenly over 2 ranks."""
    import shutil

    folder = tmp_path_factory.mktemp("pairs8") / "p"
    shutil.copytree(Path(pairs).parent, folder)
    with open(folder / "pairs.jsonl", "a") as f:
        f.write(json.dumps({"question": "Count: 4 5", "chosen": "6 7", "rejected": "up down"}) + "\n")
    return folder / "meta.json"


@pytest.mark.parametrize("lora, weights, one_rank", [(False, "0.8,0.2,0", ["--batch-size", 4]),
                                                     (True, "0.8,0,1", ["--batch-size", 2, "--grad-accum", 2])])
def test_two_ranks_match_one_rank(model, pairs, pairs8, tmp_path, lora, weights, one_rank):
    """FSDP2 over gloo, 2 ranks x 2 pairs a step: the same losses as one rank, in the two layouts TRL makes equal.
    - DPO + BCO on 8 pairs, against 1 rank x 4 pairs: the pair means of the two ranks average to the mean of the
      4, and the reward shift takes each rank's batch mean, all-gathered (TRL's RunningMoments).
    - DPO + NLL (one token mean per micro-batch, as TRL's) on 7 pairs, with LoRA, against 1 rank x 2 pairs x 2
      accumulation steps: the micro-batches are the ranks' pairs (2 + 1 in the last step) and weigh the same as
      the two ranks do. Against 1 rank x 4 pairs the token mean would span all 4 answers, so it differs by design;
      BCO is off, as TRL updates delta once per micro-batch but once per step across ranks."""
    if not lora:
        pairs = pairs8
    import csv
    import subprocess
    import sys

    common = [
        "--data",
        pairs,
        "--max-steps",
        3,
        "--save-every",
        0,
        "--lr",
        "1e-3",
        "--loss-weights",
        weights,
        *(["--lora-r", 4, "--lora-dropout", 0] if lora else []),
    ]
    assert mpo(model, *common, "--out", tmp_path / "one", *one_rank) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "internvl",
           "mpo", str(model), *FAST, *map(str, common), "--out", str(tmp_path / "two"), "--batch-size", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (list(csv.DictReader((tmp_path / r / "metrics.csv").open())) for r in ("one", "two"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-4, (a["loss"], b["loss"])
