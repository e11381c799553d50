"""`internvl chat` on a CPU (issue 16): tiles per image capped when --max-num is left out (with a one-line notice;
GPUs, small models and evaluation keep their own defaults), and a progress line while a long prefill runs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from types import SimpleNamespace as NS

import pytest
import torch
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.api import load
from internvl.cli.options import CPU_MAX_NUM, cpu_tile_default
from internvl.engine.prefill import Progress, console_progress
from internvl.eval.runner import default_max_num


def fake(own: int, device: str = "cpu"):
    return NS(config=NS(processor=NS(max_dynamic_patch=own)), model=NS(device=torch.device(device)))


def test_cpu_default_caps_the_tiles_only_when_nothing_else_says():
    args = NS(max_num=None)
    notice = cpu_tile_default(args, fake(12))
    assert args.max_num == CPU_MAX_NUM == 4
    assert notice.startswith("cpu: up to 4 tiles per image (the model's default is 12") and "--max-num 12" in notice
    args = NS(max_num=12)
    assert cpu_tile_default(args, fake(12)) is None and args.max_num == 12  # asked for: kept
    for model in (fake(12, "cuda"), fake(4), fake(1)):  # a GPU; the built-in model's 4; fewer
        args = NS(max_num=None)
        assert cpu_tile_default(args, model) is None and args.max_num is None
    assert default_max_num(fake(12)) == 6  # evaluation keeps the reference's 6 tiles


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tiny_checkpoint(tmp_path_factory.mktemp("cpuchat"))
    Image.new("RGB", (224, 224), (200, 40, 40)).save(d / "square.png")  # 3x3 tiles of 56 px at most
    return d


def test_progress_line_shows_after_its_threshold_and_is_erased(folder):
    llm = load(folder)
    for after, shown in ((0.0, True), (1e9, False)):
        out = io.StringIO()
        llm.engine.prefill_run.progress = Progress(out, after_s=after)
        llm.chat("What is this?", folder / "square.png", max_num=12, max_new_tokens=2)
        text = out.getvalue()
        assert ("reading 10 image tiles and " in text and "100%" in text) == shown, text
        assert text.endswith("\r") == shown  # the line is erased before the answer prints
    llm.engine.prefill_run.progress = None


def test_progress_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("INTERNVL_PROGRESS", raising=False)
    assert console_progress(io.StringIO()) is None  # piped or JSON output: never
    assert isinstance(console_progress(Tty()), Progress)
    monkeypatch.setenv("INTERNVL_PROGRESS", "0")
    assert console_progress(Tty()) is None
    monkeypatch.setenv("INTERNVL_PROGRESS", "1")
    monkeypatch.setenv("INTERNVL_PROGRESS_AFTER", "0")
    assert console_progress(io.StringIO()).after_s == 0


def chat(folder, *flags: str, **env: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "internvl", "chat", str(folder), "--device", "cpu", "-i", str(folder / "square.png"),
            "-p", "What is this?", "--max-new-tokens", "2", *flags]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **env}, check=False)


def test_chat_on_a_cpu_says_the_tile_cap_its_prefill_path_and_shows_progress(folder):
    done = chat(folder, "--dtype", "bf16", "--verbose", INTERNVL_PROGRESS="1", INTERNVL_PROGRESS_AFTER="0",
                INTERNVL_PREFILL_DTYPE="fp32")
    assert done.returncode == 0, done.stderr
    assert "; prefill: fp32 (forced)" in done.stderr  # --verbose names the prefill path after the decode one
    assert "cpu: up to 4 tiles per image (the model's default is 12" in done.stderr
    assert "reading 5 image tiles and " in done.stderr  # 2x2 tiles + thumbnail, not 3x3 + 1
    plain = chat(folder, "--max-num", "12", INTERNVL_PROGRESS="")  # stderr is a pipe: no progress line
    assert plain.returncode == 0, plain.stderr
    assert "tiles per image" not in plain.stderr and "reading " not in plain.stderr
