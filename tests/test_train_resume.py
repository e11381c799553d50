"""Exact resume: a run killed with SIGKILL after a checkpoint, then stopped with SIGTERM, then resumed to the end,
ends with weights bitwise identical to an uninterrupted run (CPU, fixed seed; drop-path, JPEG augmentation and a
data-loader worker all in play)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from refmodels import tiny_checkpoint
from safetensors.torch import load_file

from internvl.train.args import TrainArgs
from internvl.train.checkpoint import find_latest
from internvl.train.run import train

STEPS = 40
OPTIONS = {"max_steps": STEPS, "batch_size": 2, "lr": 1e-3, "drop_path_rate": 0.1, "num_workers": 1,
           "max_seq_length": 256, "grad_checkpoint": False, "tensorboard": False, "threads": 1, "seed": 11,
           "log_every": 4, "save_every": 4}  # fmt: skip


def flags(options):
    out = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("resume") / "model")


def start(model, meta, out, *extra, group: bool = False):
    cmd = [sys.executable, "-m", "internvl", "finetune", str(model), "--data", str(meta), "--out", str(out),
           *flags(OPTIONS), *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)  # fmt: skip


def wait_for_checkpoint(proc, out, after: int = 0, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = find_latest(out)
        if latest is not None and int(latest.name.split("-")[1]) > after:
            return int(latest.name.split("-")[1])
        if proc.poll() is not None:
            pytest.fail(f"the run ended before writing a checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def test_killed_and_resumed_run_is_bitwise_identical(model, meta, tmp_path):
    n = torch.get_num_threads()
    try:
        options = {**OPTIONS, "model": str(model), "data": str(meta), "out": str(tmp_path / "ref")}
        reference = train(TrainArgs.from_dict(options), log=lambda _m: None)
    finally:
        torch.set_num_threads(n)
    assert reference.steps == STEPS
    out = tmp_path / "run"

    proc = start(model, meta, out)
    first = wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()

    proc = start(model, meta, out, "--resume")
    wait_for_checkpoint(proc, out, after=first)
    proc.send_signal(signal.SIGTERM)  # a clean stop: checkpoint at the current step, exit code 130
    stdout, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 130, err[-2000:]
    stopped = int(find_latest(out).name.split("-")[1])
    assert stopped < STEPS and not (out / "final").exists()
    assert f"stopped at step {stopped}" in stdout

    proc = start(model, meta, out, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.exists(out / "loss.png")


def test_stop_after_then_resume_equals_one_run(model, meta, tmp_path):
    """--stop-after ends a run early with a checkpoint and the full schedule; --resume finishes it exactly."""
    n = torch.get_num_threads()
    options = {**OPTIONS, "max_steps": 12, "save_every": 0, "model": str(model), "data": str(meta)}
    try:
        whole = train(TrainArgs.from_dict({**options, "out": str(tmp_path / "whole")}), log=lambda _m: None)
        lines = []
        first = train(
            TrainArgs.from_dict({**options, "out": str(tmp_path / "two"), "stop_after": 5}), log=lines.append
        )
        assert first.paused and not first.interrupted and first.steps == 5 and first.final is None
        assert (
            find_latest(tmp_path / "two").name.endswith("-00000005")
            and not (tmp_path / "two" / "final").exists()
        )
        assert any("stopped at step 5 of 12" in line for line in lines)
        again = train(TrainArgs.from_dict({**options, "out": str(tmp_path / "two"), "stop_after": 5, "resume": True}),
                      log=lambda _m: None)  # fmt: skip
        assert again.paused and again.steps == 5  # resumed at the stop: no step taken
        rest = train(
            TrainArgs.from_dict({**options, "out": str(tmp_path / "two"), "resume": True}),
            log=lambda _m: None,
        )
    finally:
        torch.set_num_threads(n)
    assert rest.steps == 12 and not rest.paused
    a = load_file(str(whole.final / "model.safetensors"))
    b = load_file(str(rest.final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_whole_process_group_stops_cleanly(model, meta, tmp_path):
    """`kill -- -PGID`, `pkill -f` or `docker stop` signal the data workers too: the run still stops after its
    step with a checkpoint, instead of failing on a dead worker."""
    out = tmp_path / "run"
    proc = start(model, meta, out, "--max-steps", "400", group=True)
    first = wait_for_checkpoint(proc, out)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "DataLoader worker" not in err and "Traceback" not in err
    stopped = int(find_latest(out).name.split("-")[1])
    assert stopped >= first and f"stopped at step {stopped}" in stdout
