"""The `internvl` command: verbs, one-shot chat, the interactive session and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.cli.main import VERBS, build_parser
from internvl.cli.main import main as cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    Image.new("RGB", (200, 200), "green").save(d / "g.png")
    return tiny_checkpoint(d / "model", counting=True), d / "g.png"


def test_help_lists_the_verbs():
    text = build_parser().format_help()
    for verb in ("chat", "convert"):
        assert verb in VERBS and verb in text


def test_one_shot_chat_streams_the_answer(ckpt, capsys):
    model, image = ckpt
    assert cli(["chat", str(model), "-i", str(image), "-p", "red", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out.strip()
    assert cli(["chat", str(model), "-i", str(image), "-p", "red", "--max-new-tokens", "6", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == streamed and streamed


@pytest.mark.parametrize(
    "args, message",
    [
        (["-i", "nowhere.png", "-p", "q"], "nowhere.png: no such file"),
        (["-v", "nowhere.mp4", "-p", "q"], "nowhere.mp4"),
        (["-p", "<image> <image>"], "placeholder"),
    ],
)
def test_errors_are_one_line_without_traceback(ckpt, args, message):
    model, image = ckpt
    if "<image> <image>" in args:
        args = ["-i", str(image)] + args
    proc = subprocess.run([sys.executable, "-m", "internvl", "chat", str(model), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_interactive_session_commands(ckpt):
    model, image = ckpt
    script = f"/help\n/image {image}\nred\n/image {image}\n/system be brief\n/clear\nblue\n/bye\n"
    proc = subprocess.run([sys.executable, "-m", "internvl", "chat", str(model), "--max-new-tokens", "4"],
                          input=script, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "/video PATH" in proc.stdout and "(image 1 attached" in proc.stdout
    assert "attach images before the first question" in proc.stderr  # second /image after a question
    assert "(conversation cleared)" in proc.stdout and "(system message set)" in proc.stdout


def test_a_config_file_sets_any_verbs_options_and_the_flags_given_win(tmp_path, capsys):
    """Every verb built from option dataclasses reads `--config YAML` (keys = the flags' names) under its flags."""
    from internvl.options import apply_config

    parser = build_parser()
    config = tmp_path / "chat.yaml"
    config.write_text("max_new_tokens: 7\ntemperature: 0.5\nimage: [a.png, b.png]\ndevice: cpu\nmodel: some/folder\n")
    args = parser.parse_args(["chat", "--config", str(config), "--temperature", "0.0", "-p", "hi"])
    apply_config(args)
    assert (args.max_new_tokens, args.temperature, args.image, args.device) == (7, 0.0, ["a.png", "b.png"], "cpu")
    assert args.model == "some/folder" and args.top_k == 0  # a positional left out comes from the file too
    args = parser.parse_args(["chat", "mine", "--config", str(config)])
    apply_config(args)
    assert args.model == "mine"

    config.write_text("temprature: 0.5\n")
    assert cli(["chat", "--config", str(config), "-p", "hi"]) == 1
    assert "chat.yaml: unknown key 'temprature' (did you mean 'temperature'?)" in capsys.readouterr().err
    config.write_text("max_batch: many\n")
    assert cli(["serve", "--config", str(config)]) == 1
    assert "max_batch must be int, got 'many'" in capsys.readouterr().err
    config.write_text("repetition_penalty: 1.2\n")  # build-prefs has no --repetition-penalty
    assert cli(["build-prefs", "--data", "m.json", "--out", str(tmp_path / "o"), "--config", str(config)]) == 1
    assert "unknown key 'repetition_penalty'" in capsys.readouterr().err
