"""The README's shell commands in the sections a new user follows (Quick start, Using it, Checkpoints): they run
as root in a fresh container (no sudo; apt-get update before apt-get install), install the CPU build of torch,
name files that exist, and every `internvl` command in them parses."""

from __future__ import annotations

import re
import shlex
from itertools import pairwise
from pathlib import Path

import pytest

from internvl.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Quick start", "## Using it", "## Checkpoints")
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def section_blocks() -> list[list[str]]:
    """The ```bash blocks of SECTIONS, as lists of lines."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    parts = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    mine = [p for p in parts if p.startswith(SECTIONS)]
    assert len(mine) == len(SECTIONS), "a README section this test reads was renamed"
    return [b.strip("\n").splitlines() for p in mine for b in re.findall(r"```bash\n(.*?)```", p, re.DOTALL)]


def commands() -> list[list[str]]:
    """Each simple command of those blocks (split at &&, ||, ;, {, }), comments and env assignments dropped."""
    out = []
    for block in section_blocks():
        for line in block:
            line = line.split("  #")[0]
            for part in re.split(r"&&|\|\||;|[{}]", line):
                words = shlex.split(part, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words:
                    out.append(words)
    return out


def test_no_sudo_and_apt_get_update_before_install():
    blocks = section_blocks()
    assert blocks and not any("sudo" in line for block in blocks for line in block)
    for block in blocks:
        text = "\n".join(block)
        if "apt-get install" in text:
            assert text.index("apt-get update") < text.index("apt-get install")


def test_the_quick_start_installs_torch_as_ci_does_and_says_how_to_get_the_cpu_build_elsewhere():
    """On this project's machines `torch==2.13.0` is the CPU build (CI's line); elsewhere the README gives
    the CPU index, since a plain `pip install torch` fetches a CUDA build."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_torch = next(line for line in ci.splitlines() if "pip install" in line and "torch" in line)
    tests = "\n".join(section_blocks()[1])
    assert ci_torch.replace(" -q", "") in tests and "pytest -q -m \"not slow\"" in tests
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quick start") : readme.index("## Using it")]
    assert CPU_TORCH in quick


def test_files_the_commands_name_exist():
    made = set()  # folders an earlier command writes (--out DIR)
    for words in commands():
        for flag, value in pairwise(words):
            if flag == "--out":
                made.add(value.rstrip("/"))
        for word in words:
            if re.fullmatch(r"(examples|configs)/\S+", word):
                assert (ROOT / word).exists(), f"README names {word}, which is not in the repository"
        for flag, value in pairwise(words):
            if words[0] == "internvl" and flag in ("-i", "--image", "-v", "--video", "--config"):
                assert (ROOT / value).exists() or any(value.startswith(m) for m in made), (words, value)


@pytest.mark.parametrize("words", [w for w in commands() if w[0] == "internvl"], ids=lambda w: " ".join(w[:3]))
def test_every_internvl_command_parses(words):
    build_parser().parse_args(words[1:])  # argparse exits on an unknown verb or flag
