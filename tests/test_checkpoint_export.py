"""A training checkpoint as a complete model folder (checkpoint/export.py): a frozen-encoder run's checkpoint, made
complete over its start model, equals the run's own OUT/final; `convert` and `nano ship` take checkpoints;
a wrong base is one line that names the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from refmodels import tiny_checkpoint
from safetensors.torch import load_file, save_file

import internvl
from internvl.checkpoint.export import export_checkpoint, is_training_checkpoint
from internvl.errors import CheckpointError
from internvl.train.args import TrainArgs
from internvl.train.checkpoint import find_latest
from internvl.train.run import train

OPTIONS = {"max_steps": 2, "save_every": 2, "batch_size": 2, "lr": 1e-3, "num_workers": 0, "max_seq_length": 256,
           "grad_checkpoint": False, "tensorboard": False, "threads": 1, "seed": 3, "freeze_vision": True,
           "max_dynamic_patch": 2, "log_every": 1}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def run(model, meta, tmp_path_factory):
    """A frozen-encoder run of 2 steps: its last checkpoint and its OUT/final."""
    out = tmp_path_factory.mktemp("export_run") / "out"
    n = torch.get_num_threads()
    try:
        result = train(TrainArgs.from_dict({**OPTIONS, "model": str(model), "data": str(meta), "out": str(out)}),
                       log=lambda _m: None)  # fmt: skip
    finally:
        torch.set_num_threads(n)
    return find_latest(out), result.final


def test_a_frozen_encoder_checkpoint_becomes_the_final_model(model, run, tmp_path):
    ckpt, final = run
    partial = load_file(str(ckpt / "model.safetensors"))
    assert is_training_checkpoint(ckpt) and not is_training_checkpoint(final)
    assert partial and not any(k.startswith("vision_model.") for k in partial)  # what the run saves
    out = export_checkpoint(ckpt, tmp_path / "exported", log=lambda _m: None)  # the base the run recorded
    got, want, start = (load_file(str(p / "model.safetensors")) for p in (out, final, model))
    assert got.keys() == want.keys() == start.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert all(torch.equal(got[k], start[k]) for k in got if k.startswith("vision_model."))
    assert any(not torch.equal(got[k], start[k]) for k in partial)
    assert json.loads((out / "config.json").read_text()) == json.loads((final / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    loaded = internvl.load(str(out))
    assert loaded.config.processor.max_dynamic_patch == 2  # the run's tiling, as in OUT/final
    assert loaded.chat("Say one word.", max_new_tokens=3) is not None


def test_convert_takes_a_training_checkpoint(run, model, tmp_path, capsys):
    from internvl.cli.main import main

    ckpt, final = run
    assert main(["convert", str(ckpt), str(tmp_path / "c"), "--to", "original", "--base", str(model)]) == 0
    assert "exported the training checkpoint" in capsys.readouterr().out
    got, want = load_file(str(tmp_path / "c" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["convert", str(final), str(tmp_path / "d"), "--to", "hf", "--base", str(model)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--base is for a training checkpoint" in err


def test_nano_ship_takes_a_checkpoint(run, tmp_path, monkeypatch):
    from internvl.nano import ship as ship_module

    monkeypatch.setattr(ship_module, "check", lambda folder, work, split, n: {"color": 0})  # the eval is not under test
    ckpt, final = run
    dest = ship_module.ship(ckpt, "stage9", dest=tmp_path / "nano")
    info = json.loads((dest / "training.json").read_text())
    assert info["step"] == 2 and info["source"] == str(ckpt) and info["base"].endswith("model")
    assert (dest / "model.safetensors").exists() and internvl.load(str(dest)).config.llm.vocab_size > 100
    got, want = load_file(str(dest / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="--base is for a training checkpoint"):
        ship_module.ship(final, "stage9", dest=tmp_path / "again", base=final)


def partial_checkpoint(folder, tensors, args=None):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    if args is not None:
        (folder / "state.json").write_text(json.dumps({"step": 5, "args": args}))
    return folder


def test_trained_tensors_over_a_given_base(model, tmp_path):
    base = load_file(str(model / "model.safetensors"))
    trained = {k: v + 1 for k, v in base.items() if k.startswith("language_model.")}
    ckpt = partial_checkpoint(tmp_path / "step-00000005", trained)
    out = load_file(str(export_checkpoint(ckpt, tmp_path / "m", base=model) / "model.safetensors"))
    assert out.keys() == base.keys()
    for k, v in out.items():
        assert torch.equal(v, trained[k] if k in trained else base[k]), k
    internvl.load(str(tmp_path / "m"))


def test_a_wrong_base_is_one_line_naming_the_tensor(model, tmp_path):
    base = load_file(str(model / "model.safetensors"))
    name = next(k for k in base if k.startswith("language_model.") and base[k].dim() == 2)
    wide = torch.zeros(base[name].shape[0], base[name].shape[1] + 1)
    ckpt = partial_checkpoint(tmp_path / "shape", {name: wide})
    with pytest.raises(CheckpointError) as e:
        export_checkpoint(ckpt, tmp_path / "o1", base=model)
    assert f"{name!r} has shape {tuple(wide.shape)}, but the base {model} has {tuple(base[name].shape)}" in str(e.value)
    ckpt = partial_checkpoint(tmp_path / "extra", {"language_model.model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="'language_model.model.extra.weight' is not in the base model"):
        export_checkpoint(ckpt, tmp_path / "o2", base=model)
    lora = partial_checkpoint(tmp_path / "lora", {"language_model.lm_head.lora_A.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="a LoRA run: merge OUT/final with internvl merge-lora"):
        export_checkpoint(lora, tmp_path / "o3", base=model)
    gone = partial_checkpoint(tmp_path / "gone", {name: base[name]}, args={"model": str(tmp_path / "moved")})
    with pytest.raises(CheckpointError, match=r"start model .*moved is not there .*; pass --base START_MODEL_DIR"):
        export_checkpoint(gone, tmp_path / "o4")
    unrecorded = partial_checkpoint(tmp_path / "bare", {name: base[name]})
    with pytest.raises(CheckpointError, match="no start model recorded"):
        export_checkpoint(unrecorded, tmp_path / "o5")
    with pytest.raises(CheckpointError, match="not a model folder"):
        export_checkpoint(unrecorded, tmp_path / "o6", base=tmp_path / "moved")
    no_weights = tmp_path / "cfg"  # config and tokenizer only: the checkpoint must hold every tensor
    no_weights.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match=r"tensor\(s\) in neither .* nor the base"):
        export_checkpoint(unrecorded, tmp_path / "o7", base=no_weights)
