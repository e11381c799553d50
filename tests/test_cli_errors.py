"""Rough edges of the `internvl` command: each bad input is one line on stderr and exit code 1, found before a
model is loaded or a video decoded; the same message for a missing model in every verb; one default device."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.cli.main import VERBS, build_parser
from internvl.cli.main import main as cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clierr")
    Image.new("RGB", (64, 48), "green").save(d / "g.png")
    (d / "bench.tsv").write_text("index\tquestion\tA\tB\tanswer\timage_path\n0\tq\tx\ty\tA\tg.png\n")
    (d / "meta.json").write_text('{"sft": {"root": ".", "annotation": "sft.jsonl"}}')
    turns = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "green"}]
    (d / "sft.jsonl").write_text(json.dumps({"image": "g.png", "conversations": turns}) + "\n")
    return {"model": tiny_checkpoint(d / "model"), "image": d / "g.png", "tsv": d / "bench.tsv",
            "meta": d / "meta.json", "dir": d}  # fmt: skip


def one_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"internvl {verb}: error: "), err
    return err[0]


def base(verb, files):
    """The smallest command line of `verb` that gets past its own checks."""
    model = str(files["model"])
    return {
        "chat": ["chat", model, "-p", "hi"],
        "serve": ["serve", model, "--port", "1"],
        "eval": ["eval", model, "--data", str(files["tsv"])],
        "build-prefs": ["build-prefs", model, "--data", str(files["meta"]), "--out", str(files["dir"] / "p")],
    }[verb]


# ---- --device -----------------------------------------------------------------------------------------------

NO_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("verb", ["chat", "serve", "eval", "build-prefs"])
@pytest.mark.parametrize("device, message",
                         [(NO_GPU, f"device {NO_GPU!r}: "), ("gpu", "unknown device 'gpu': use cpu")])
def test_a_device_this_machine_lacks_is_one_line(files, capsys, verb, device, message):
    assert cli([*base(verb, files), "--device", device]) == 1
    assert message in one_line(capsys, verb)


def test_finetune_and_mpo_say_it_in_one_line_too(files, capsys):
    for verb in ("finetune", "mpo"):
        assert cli([verb, str(files["model"]), "--data", str(files["meta"]), "--device", "gpu"]) == 1
        assert "--device must be cpu, cuda[:N] or auto, got 'gpu'" in one_line(capsys, verb)


def test_every_verb_that_loads_a_model_defaults_to_auto():
    parser = build_parser()
    needs = {"convert": ["a", "b", "--to", "hf"], "merge-lora": ["a", "b", "c"],
             "synth": ["--out", "o", "--split", "test"], "build-prefs": ["--data", "m.json", "--out", "o"],
             "prm-data": ["split", "--out", "o"], "bon": ["--prm", "p"], "prm-bench": ["--data", "m.json"]}
    defaults = {}
    for verb in VERBS:
        args = parser.parse_args([verb, *needs.get(verb, [])])
        if hasattr(args, "device"):
            defaults[verb] = args.device
    # the training verbs layer defaults <- --config <- flags, so their defaults live in TrainArgs
    from internvl.cli.mpo import from_namespace as mpo_args
    from internvl.train.args import from_namespace as train_args

    defaults["finetune"] = train_args(parser.parse_args(["finetune", "m", "--data", "x"])).run.device
    defaults["mpo"] = mpo_args(parser.parse_args(["mpo", "m", "--data", "x"]))[0].run.device
    assert set(defaults) == {"chat", "serve", "eval", "finetune", "mpo", "build-prefs", "bon", "prm-bench",
                             "calibrate"}  # fmt: skip
    assert set(defaults.values()) == {"auto"}


# ---- numbers out of range -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["100000", "0", "-3", "65"])
@pytest.mark.parametrize("verb", ["chat", "eval", "build-prefs"])
def test_max_num_out_of_range_is_one_line(files, capsys, verb, value):
    started = time.perf_counter()
    assert cli([*base(verb, files), "--max-num", value]) == 1
    assert one_line(capsys, verb).endswith(f"--max-num must be between 1 and 64, got {value}")
    assert time.perf_counter() - started < 5


def test_the_tile_grid_search_is_cheap_and_unchanged():
    """The reference search is cubic in max_num (minutes at 100,000); the grids and their order are the same."""
    from internvl.processing.image import candidate_grids

    def reference(lo, hi):
        grids = {(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if lo <= i * j <= hi}  # fmt: skip
        return sorted(grids, key=lambda g: g[0] * g[1])

    for lo, hi in [(1, 6), (1, 12), (1, 40), (2, 24), (3, 64)]:
        assert candidate_grids(lo, hi) == reference(lo, hi)
    # in a process of its own, so that a slow search fails the test instead of hanging it
    code = "from internvl.processing.image import candidate_grids; print(len(candidate_grids(1, 20_000)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert int(out.stdout) == sum(20_000 // i for i in range(1, 20_001))


@pytest.mark.parametrize("value", ["10000", "0"])
def test_num_segments_out_of_range_fails_before_the_video_is_read(files, capsys, value):
    started = time.perf_counter()
    assert cli(["chat", str(files["model"]), "-v", "never-read.mp4", "-p", "hi", "--num-segments", value]) == 1
    assert one_line(capsys, "chat").endswith(f"--num-segments must be between 1 and 64, got {value}")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_prompt_is_one_line(files, capsys, prompt):
    assert cli(["chat", str(files["model"]), "-p", prompt]) == 1
    assert "-p/--prompt is empty" in one_line(capsys, "chat")


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--batch-size", "--limit"])
def test_eval_counts_below_one_are_one_line(files, capsys, flag):
    assert cli([*base("eval", files), flag, "0"]) == 1
    assert one_line(capsys, "eval").endswith(f"{flag} must be at least 1, got 0")


# ---- a missing model: one message in every verb ---------------------------------------------------------------


@pytest.mark.parametrize("verb", ["chat", "serve", "eval", "build-prefs", "convert", "merge-lora", "finetune", "mpo"])
def test_a_missing_model_folder_is_the_same_line_in_every_verb(files, capsys, verb):
    missing = str(files["dir"] / "no-such-model")
    adapter = files["dir"] / "adapter"
    adapter.mkdir(exist_ok=True)
    argv = {
        "convert": ["convert", missing, str(files["dir"] / "out"), "--to", "hf"],
        "merge-lora": ["merge-lora", missing, str(adapter), str(files["dir"] / "merged")],
        "finetune": ["finetune", missing, "--data", str(files["meta"]), "--out", str(files["dir"] / "ft")],
        "mpo": ["mpo", missing, "--data", str(files["meta"]), "--out", str(files["dir"] / "mpo")],
    }.get(verb) or [verb, missing, *base(verb, files)[2:]]
    assert cli(argv) == 1
    assert one_line(capsys, verb).endswith(f": error: {missing}: no such model folder")


# ---- hostile evaluation files (issue 21) ------------------------------------------------------------------------


def _bomb_png_b64() -> str:
    """A PNG header claiming 30000 x 30000 pixels, no pixel data, padded past an index reference's length."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0))
           + chunk(b"tEXt", b"Comment\0" + b"x" * 64) + chunk(b"IEND", b""))  # fmt: skip
    return base64.b64encode(png).decode()


@pytest.mark.parametrize("kind, message", [
    ("bomb", "row 1 (line 2), column 'image': not a decodable base64 image (refused as a possible decompression bomb"),
    ("utf8", "row 1 (line 2), column 'question': invalid UTF-8 (byte 0xff at character 1)"),
])  # fmt: skip
def test_eval_on_a_hostile_tsv_is_one_line(files, capsys, tmp_path, kind, message):
    bad = tmp_path / "bad.tsv"
    header = b"index\tquestion\tA\tB\tanswer\timage\n"
    if kind == "bomb":
        bad.write_bytes(header + f"0\tq\tx\ty\tA\t{_bomb_png_b64()}\n".encode())
    else:
        green = base64.b64encode(files["image"].read_bytes()).decode()
        bad.write_bytes(header + b"0\tq\xff?\tx\ty\tA\t" + green.encode() + b"\n")
    assert cli(["eval", str(files["model"]), "--data", str(bad), "--out", str(tmp_path / "out")]) == 1
    line = one_line(capsys, "eval")
    assert f"{bad}, {message}" in line


# ---- convert, eval --help -------------------------------------------------------------------------------------


def test_convert_onto_its_source_is_refused_and_the_source_kept(files, capsys, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for f in files["model"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    for dst in (str(src), str(src) + "/", str(tmp_path / "." / "model")):
        assert cli(["convert", str(src), dst, "--to", "hf"]) == 1
        assert "the output folder is the source checkpoint; write to a new folder" in one_line(capsys, "convert")
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before


def test_eval_help_shows_one_model_positional():
    help_text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    positionals = help_text.split("positional arguments:")[1].split("options:")[0]
    entries = [line for line in positionals.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert len(entries) == 1 and entries[0].split()[0] == "MODEL", positionals
    assert "model2" not in help_text


def test_eval_takes_synthetic_then_one_model(files, capsys):
    assert cli(["eval", "synthetic", "a", "b"]) == 1
    assert "unexpected argument 'b'" in one_line(capsys, "eval")
    assert cli(["eval", "a", "b", "--data", str(files["tsv"])]) == 1
    assert "unexpected argument 'b'" in one_line(capsys, "eval")


def test_one_line_without_traceback_from_a_real_process(files):
    argv = [sys.executable, "-m", "internvl", "chat", str(files["model"]), "-p", "hi", "--device", "gpu"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
