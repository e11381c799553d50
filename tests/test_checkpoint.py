"""Pixel shuffle ordering, save/load round trips, dtype loading and checkpoint error messages."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from refmodels import IMAGE_TOKEN_ID, hf_reference, save_reference
from safetensors.torch import load_file, save_file

from internvl.checkpoint.io import build_model, load_model, save_model
from internvl.checkpoint.layouts import read_config
from internvl.checkpoint.original import to_original_dict
from internvl.cli.main import main as cli
from internvl.errors import CheckpointError, ConfigError
from internvl.model.projector import pixel_shuffle
from internvl.presets import preset


def test_pixel_shuffle_v2_ordering():
    a = b = 4
    c = 3
    x = torch.arange(a * b * c, dtype=torch.float32).reshape(1, a, b, c)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (1, 2, 2, 4 * c)
    for i in range(2):
        for j in range(2):
            expected = torch.cat([x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1], x[0, 2 * i + 1, 2 * j],
                                  x[0, 2 * i + 1, 2 * j + 1]])  # fmt: skip
            assert torch.equal(out[0, i, j], expected), (i, j)


def test_pixel_shuffle_v1_is_the_transposed_grid():
    x = torch.randn(2, 8, 8, 5)
    v1, v2 = pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2")
    assert torch.equal(v1, v2.transpose(1, 2))
    assert not torch.equal(v1, v2)


def _random_model(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg, IMAGE_TOKEN_ID, meta=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", ["qwen2", "llama", "internlm2"])
@pytest.mark.parametrize("layout", ["original", "hf"])
def test_save_then_load_is_bitwise_identical(tmp_path, family, layout):
    cfg = preset("tiny")
    cfg.llm = replace(cfg.llm, family=family, qkv_bias=family == "qwen2")
    model = _random_model(cfg)
    save_model(model, tmp_path, layout=layout)
    loaded, report = load_model(tmp_path, image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == layout and not report.unexpected
    _assert_state_equal(model.state_dict(), loaded.state_dict())
    if layout == "original" and family == "internlm2":
        keys = load_file(str(tmp_path / "model.safetensors")).keys()
        assert "language_model.model.layers.0.attention.wqkv.weight" in keys


@pytest.mark.parametrize("family", ["qwen2", "internlm2"])
def test_original_hf_original_round_trip_is_bitwise_identical(tmp_path, family):
    cfg = preset("tiny")
    cfg.llm = replace(cfg.llm, family=family, qkv_bias=family == "qwen2")
    cfg.processor.template = "internlm2-chat"
    model = _random_model(cfg)
    save_model(model, tmp_path / "a", layout="original", dtype="bf16")
    assert cli(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "hf",
                "--image-token-id", str(IMAGE_TOKEN_ID)]) == 0
    assert cli(["convert", str(tmp_path / "b"), str(tmp_path / "c"), "--to", "original"]) == 0
    first = load_file(str(tmp_path / "a" / "model.safetensors"))
    last = load_file(str(tmp_path / "c" / "model.safetensors"))
    _assert_state_equal(first, last)
    assert read_config(tmp_path / "c") == read_config(tmp_path / "a")


def test_sharded_checkpoint_and_dtype_choice(tmp_path):
    model = _random_model(preset("tiny"))
    files = save_model(model, tmp_path, max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    for dtype, expected in [("bf16", torch.bfloat16), ("fp16", torch.float16), (None, torch.float32)]:
        loaded, _ = load_model(tmp_path, dtype=dtype, image_token_id=IMAGE_TOKEN_ID)
        assert all(p.dtype == expected for p in loaded.parameters())
        assert not any(p.is_meta for p in loaded.parameters())


def test_hf_reference_files_load_without_remote_code(tmp_path):
    ref = hf_reference("qwen2", "300m")
    save_reference(ref, tmp_path)
    model, report = load_model(tmp_path, dtype="bf16", image_token_id=IMAGE_TOKEN_ID)
    assert report.layout == "hf" and model.dtype == torch.bfloat16


# ---- bad input -----------------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    save_model(_random_model(preset("tiny")), tmp_path)
    return tmp_path


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path / "nowhere")
    preset_cfg = to_original_dict(preset("tiny"))
    (tmp_path / "config.json").write_text(json.dumps(preset_cfg))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_missing_shard_named(saved):
    index = {"metadata": {}, "weight_map": {"mlp1.0.weight": "model-00002-of-00002.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*does not exist"):
        load_model(saved)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(saved)


def test_unknown_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["MambaForCausalLM"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown language model architecture 'MambaForCausalLM'"):
        load_model(saved)


def test_wrong_shape_names_tensor_and_shapes(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    tensors["mlp1.1.weight"] = torch.zeros(64, 100)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"'mlp1\.1\.weight' has shape \(64, 100\).*expects \(64, 256\)"):
        load_model(saved)


def test_missing_key_is_named(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["language_model.model.norm.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing.*language_model\.model\.norm\.weight"):
        load_model(saved)


def test_cli_prints_one_line_on_bad_checkpoint(saved, tmp_path, capsys):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    assert cli(["convert", str(saved), str(tmp_path / "out"), "--to", "hf"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "Traceback" not in err[0]


def test_pad2square_is_read_and_pads_a_single_tile_with_the_mean_color(tmp_path):
    from PIL import Image

    from internvl.processing.image import IMAGENET_MEAN, ImageProcessor, tiles_to_tensor

    d = to_original_dict(preset("tiny"))
    (tmp_path / "config.json").write_text(json.dumps({**d, "pad2square": True, "dynamic_image_size": False}))
    cfg = read_config(tmp_path)
    assert cfg.processor.pad2square and not cfg.processor.dynamic_image_size
    wide = Image.new("RGB", (56, 28), (255, 0, 0))
    pixels = ImageProcessor.from_config(cfg)(wide)
    mean = tuple(int(x * 255) for x in IMAGENET_MEAN)
    expected = Image.new("RGB", (56, 56), mean)
    expected.paste(wide, (0, 14))  # the reference expand2square: centred, padded above and below
    assert torch.equal(pixels, tiles_to_tensor([expected], 56))
    assert not torch.equal(pixels, ImageProcessor.from_config(cfg.replace(pad2square=False))(wide))
