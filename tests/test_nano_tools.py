"""Tools for training the built-in model from scratch: model folders of checkpoints, and the image probe."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from refmodels import tiny_checkpoint
from safetensors.torch import load_file
from test_train_data import Q, write_split

from internvl.train.nano import probe, snapshot


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("nano_tools") / "model")


def split(root, colors):
    (root / "img").mkdir(parents=True)
    rows = []
    for i, color in enumerate(colors):
        Image.new("RGB", (64, 64), color).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "conversations": [Q, {"from": "gpt", "value": color}]})
    return write_split(root, rows + [{"conversations": [Q, {"from": "gpt", "value": "none"}]}])


def test_probe_sees_whether_images_differ(model, tmp_path):
    same = probe(model, split(tmp_path / "same", ["red"] * 6), n=5, batch=2)
    assert same["own_images"] == pytest.approx(same["swapped_images"], abs=1e-6) and abs(same["gap"]) < 1e-6
    other = probe(
        model, split(tmp_path / "other", ["red", "green", "blue", "black", "white", "yellow"]), n=5, batch=2
    )
    assert abs(other["gap"]) > 1e-4  # a random model's logits still depend on its image
    assert other["image_token_norm"] > 0 and other["text_embedding_norm"] > 0


def test_snapshot_takes_weights_from_the_checkpoint(model, tmp_path):
    init, ckpt = tmp_path / "init", tmp_path / "checkpoints" / "step-00000010"
    init.mkdir()
    ckpt.mkdir(parents=True)
    for f in model.iterdir():
        if f.name != "model.safetensors":
            (init / f.name).write_bytes(f.read_bytes())
    (ckpt / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    out = snapshot(init, ckpt, tmp_path / "snap", max_dynamic_patch=1)
    assert json.loads((out / "config.json").read_text())["max_dynamic_patch"] == 1
    a, b = load_file(str(out / "model.safetensors")), load_file(str(model / "model.safetensors"))
    assert a.keys() == b.keys()
    with pytest.raises(FileNotFoundError, match="no weights"):
        snapshot(init, init, tmp_path / "bad")


def test_command_errors_are_one_line(tmp_path, capsys):
    from internvl.train.nano import main

    assert (
        main(
            [
                "snapshot",
                "--init",
                str(tmp_path),
                "--checkpoint",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no weights" in err and "Traceback" not in err
