"""The efficiency switches through `load(..., efficiency=...)`, `chat`, `eval` and `serve` on a tiny checkpoint:
off is the plain model bit for bit, the switches reach both the tiler and the decoder, bad specs are one line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from refmodels import tiny_checkpoint

from internvl import api
from internvl.api import load
from internvl.cli.main import main as cli
from internvl.errors import ConfigError
from internvl.processing import IMG_CONTEXT
from internvl.processing.pyramid import PyramidProcessor, choose_pyramid
from internvl.synth import generate_split


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("eff")
    Image.effect_mandelbrot((300, 120), (-2, -1, 1, 1), 40).convert("RGB").save(d / "m.png")
    return tiny_checkpoint(d / "model"), d / "m.png"


@pytest.fixture(scope="module")
def plain(ckpt):
    return load(ckpt[0])


def answer(m, image, **kw):
    return m.chat("What is it?", image, max_new_tokens=6, **kw)


def test_off_is_the_plain_model(ckpt, plain):
    model, image = ckpt
    ids, pv, _ = plain.prepare("What is it?", image)
    for spec in ("off", "fastv=1:1,yopo_ffn_keep=1"):  # every switch at its neutral setting
        m = load(model, efficiency=spec)
        assert m.model.language_model.efficiency is None and type(m.processor) is type(plain.processor)
        ids2, pv2, _ = m.prepare("What is it?", image)
        assert ids2 == ids and torch.equal(pv2, pv)
        assert m.generate_ids(ids, pv, max_new_tokens=6) == plain.generate_ids(ids, pv, max_new_tokens=6)


def test_switches_reach_the_tiler_and_the_decoder(ckpt, plain):
    model, image = ckpt
    m = load(model, efficiency="fastv=1:0.5,pyramid,max_visual_tokens=64")
    assert m.efficiency.fastv_keep == 0.5 and m.model.language_model.efficiency is not None
    assert isinstance(m.processor, PyramidProcessor) and m.inputs.processor is m.processor
    ids, pv, _ = m.prepare("What is it?", image)
    n = ids.count(m.tokenizer.token_to_id(IMG_CONTEXT))
    assert n <= 64 and pv.shape[0] == n // 4 and pv.shape[0] <= choose_pyramid(300, 120, image_size=56).tiles
    first = m.generate_ids(ids, pv, max_new_tokens=6)
    assert len(first) == 6 and m.generate_ids(ids, pv, max_new_tokens=6) == first  # the prefix cache reused
    m.use_efficiency(None)  # and back to the plain model
    assert m.model.language_model.efficiency is None and answer(m, image) == answer(plain, image)


def test_bad_specs_fail_before_loading(ckpt, tmp_path):
    model, _ = ckpt
    with pytest.raises(ConfigError, match="unknown switch 'fastv_k'"):
        load(tmp_path / "nowhere", efficiency="fastv_k=2")  # the spec is read before the path
    with pytest.raises(ConfigError, match="efficiency.fastv_layer: expected a layer from 0 to 1, got 5"):
        load(model, efficiency="fastv=5:0.5")
    with pytest.raises(ConfigError, match="efficiency.schedule: no such file"):
        load(model, efficiency=f"schedule={tmp_path / 'none.json'}")


def test_chat_and_eval_take_the_flag(ckpt, tmp_path, capsys):
    model, image = ckpt
    spec = "fastv=1:0.5,yopo_window=1,pyramid"
    assert cli(["chat", str(model), "-i", str(image), "-p", "red", "--max-new-tokens", "4", "--efficiency", spec]) == 0
    assert capsys.readouterr().out.strip()
    assert cli(["chat", str(model), "-p", "red", "--efficiency", "fastv=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected fastv=LAYER:KEEP" in err[0]
    generate_split(str(tmp_path / "split"), "test", n=2, tasks=["color"])
    assert cli(["eval", "synthetic", str(model), "--data-dir", str(tmp_path / "split"), "--tasks", "color",
                "--max-new-tokens", "4", "--out", str(tmp_path / "out"), "--efficiency", spec]) == 0  # fmt: skip
    assert "| color | 2 |" in capsys.readouterr().out
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["efficiency"] == spec  # a --resume with other switches is refused


def test_serve_passes_the_flag_to_load(ckpt, monkeypatch):
    model, _ = ckpt
    seen = {}

    def fake_load(path, **kw):
        seen.update(kw)
        return load(path, **kw)

    monkeypatch.setattr(api, "load", fake_load)
    monkeypatch.setattr("internvl.serve.server.run", lambda app, host, port, log_level: None)
    assert cli(["serve", str(model), "--device", "cpu", "--efficiency", "max_visual_tokens=32"]) == 0
    assert seen["efficiency"] == "max_visual_tokens=32"
