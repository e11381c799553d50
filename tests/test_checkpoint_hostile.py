"""Hand-made hostile checkpoint folders (issue 21): each fails with one line naming the file and what is wrong,
before a model is built or a tensor allocated; nothing outside the model folder is read."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from refmodels import tiny_checkpoint

from internvl.checkpoint.io import build_model, load_model, save_model
from internvl.checkpoint.layouts import read_config
from internvl.checkpoint.reader import SafetensorsFile
from internvl.errors import CheckpointError, ConfigError, InternVLError, TokenizerError
from internvl.presets import preset
from internvl.tokenizer import Tokenizer


@pytest.fixture
def folder(tmp_path) -> Path:
    torch.manual_seed(0)
    save_model(build_model(preset("tiny"), meta=False), tmp_path / "model")
    return tmp_path / "model"


def edit_config(folder: Path, section: str | None, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (cfg[section] if section else cfg).update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def write_raw(path: Path, header, data: bytes = b"", size: int | None = None) -> None:
    """A safetensors file with exactly this header; `size` extends it sparsely (no disk blocks, no memory)."""
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)
        if size is not None:
            f.truncate(8 + len(head) + size)


def one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, InternVLError)
    for w in words:
        assert w in message, message


CONFIG_CASES = [
    ("negative llm hidden_size", "llm_config", {"hidden_size": -64}, "llm_config.hidden_size", "got -64"),
    ("negative vision intermediate", "vision_config", {"intermediate_size": -1}, "vision_config.intermediate_size"),
    ("zero attention heads", "llm_config", {"num_attention_heads": 0}, "llm_config.num_attention_heads", "got 0"),
    ("zero vision heads", "vision_config", {"num_attention_heads": 0}, "vision_config.num_attention_heads"),
    ("negative layer count", "llm_config", {"num_hidden_layers": -2}, "llm_config.num_hidden_layers"),
    ("negative vision layers", "vision_config", {"num_hidden_layers": -1}, "vision_config.num_hidden_layers"),
    ("a million layers", "llm_config", {"num_hidden_layers": 1_000_000}, "from 1 to 1024", "got 1000000"),
    ("a size as text", "llm_config", {"vocab_size": "512"}, "llm_config.vocab_size", "got '512'"),
    ("zero eps", "llm_config", {"rms_norm_eps": 0}, "llm_config.rms_norm_eps"),
    ("NaN rope theta", "llm_config", {"rope_theta": float("nan")}, "llm_config.rope_theta"),
    ("zero downsample ratio", None, {"downsample_ratio": 0}, "downsample_ratio"),
    ("select_layer past the encoder", None, {"select_layer": 7}, "select_layer", "2 layers"),
    ("vision_config a list", None, {"vision_config": [1, 2]}, "must be a JSON object"),
    ("rope_scaling a number", "llm_config", {"rope_scaling": 3}, "rope_scaling"),
]  # fmt: skip


@pytest.mark.parametrize("section,changes,words", [(c[1], c[2], c[3:]) for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])  # fmt: skip
def test_bad_config_sizes_fail_in_one_line_before_building(folder, section, changes, words):
    edit_config(folder, section, **changes)
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_model(folder)
    one_line(e, "config", *words)
    assert time.monotonic() - start < 5  # a million layers once hung for minutes


def test_a_negative_dimension_in_a_header_is_refused(tmp_path):
    write_raw(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}},
              b"\0" * 16)  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(tmp_path / "x.safetensors")
    one_line(e, "x.safetensors", "'a'", "non-negative", "[-2, -2]")


def test_two_tensors_sharing_bytes_are_refused(tmp_path):
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    write_raw(tmp_path / "x.safetensors", {"a": entry, "b": entry}, b"\0" * 16)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(tmp_path / "x.safetensors")
    one_line(e, "'a' and 'b' share bytes")


@pytest.mark.parametrize("header,words", [
    (b"[" * 5000 + b"]" * 5000, ["cannot read safetensors file"]),
    (b"[1, 2]", ["not a JSON object"]),
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, ["'a'", "dtype"]),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, ["'a'", "data_offsets"]),
], ids=["deep JSON", "not an object", "dtype a list", "end before begin"])  # fmt: skip
def test_malformed_headers_are_refused_in_one_line(tmp_path, header, words):
    write_raw(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(tmp_path / "x.safetensors")
    one_line(e, *words)


def test_an_oversized_tensor_is_refused_from_its_header_before_any_read(folder, monkeypatch):
    """The header claims an 8 GiB mlp1.1.weight, backed by a sparse file: refused by its shape against the
    config, without allocating or reading it (a guard fails the test if it is read at all)."""
    header = {"mlp1.1.weight": {"dtype": "F32", "shape": [65536, 32768], "data_offsets": [0, 8 << 30]}}
    (folder / "model.safetensors").rename(folder / "rest.safetensors")
    write_raw(folder / "big.safetensors", header, size=8 << 30)
    real = SafetensorsFile.read

    def guarded(self, key):
        assert key != "mlp1.1.weight", "the oversized tensor was read"
        return real(self, key)

    monkeypatch.setattr(SafetensorsFile, "read", guarded)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    one_line(e, "big.safetensors", "'mlp1.1.weight'", "(65536, 32768)", "expects (64, 256)")
    assert time.monotonic() - start < 5


def test_a_shard_outside_the_model_folder_is_never_read(folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (folder / "model.safetensors").rename(other / "model.safetensors")
    keys = SafetensorsFile(other / "model.safetensors").keys()
    for shard in ("../other/model.safetensors", str(other / "model.safetensors")):
        index = {"metadata": {}, "weight_map": {k: shard for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError) as e:
            load_model(folder)
        one_line(e, "model.safetensors.index.json", "not a file inside the model folder")


def test_an_unwritable_output_folder_is_one_line(folder, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    model, _ = load_model(folder)
    with pytest.raises(CheckpointError) as e:
        save_model(model, tmp_path / "file" / "out")
    one_line(e, "cannot write the checkpoint")


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("hostile-tokenizer"))


def test_a_tokenizer_larger_than_the_model_is_refused(tok_folder, tmp_path):
    import shutil

    from tokenizers import Tokenizer as HF

    folder = Path(shutil.copytree(tok_folder, tmp_path / "m"))
    vocab = read_config(folder).llm.vocab_size
    tok = HF.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(2000)])
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(folder)
    one_line(e, "tokenizer.json", f"{vocab + 2000} tokens", f"vocab_size is {vocab}")


def test_a_huge_tokenizer_file_is_refused_before_loading(tok_folder, tmp_path):
    import shutil

    folder = Path(shutil.copytree(tok_folder, tmp_path / "m"))
    with open(folder / "tokenizer.json", "a") as f:
        f.write(" " * (17 << 20))  # still valid JSON, and loadable, but far beyond a 320-token vocabulary
    start = time.monotonic()
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(folder)
    one_line(e, "tokenizer.json", "above the limit of 16777216 bytes", "model of")
    assert time.monotonic() - start < 2
