"""`internvl chat` says which decode kernels run: with --verbose always, and without it whenever a CPU has no fast
path (never a silent slowdown)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chat(*flags: str, **env: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "internvl", "chat", "-i", str(ROOT / "examples" / "circles.png"), "-p",
            "How many circles are there?", "--max-new-tokens", "2", *flags]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **env}, check=False)


def test_no_fast_path_is_said_in_one_line_without_verbose():
    done = chat("--quantize", "int8", INTERNVL_KERNELS="torch")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "no fast path" in line]
    assert len(lines) == 1 and "int8" in lines[0]
    assert done.stdout.strip()  # and it still answers


def test_verbose_names_the_decode_path():
    done = chat("--quantize", "int8", "--verbose")
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("decode (int8 weights): ") for line in done.stderr.splitlines()), done.stderr
    quiet = chat("--quantize", "int8")
    assert "decode (" not in quiet.stderr or "no fast path" in quiet.stderr
