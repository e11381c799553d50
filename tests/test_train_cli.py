"""`internvl finetune`: one-line errors for bad data and bad options, skipped-row reports, YAML keys = flags,
and end-to-end runs (full, LoRA with merged weights, from scratch) whose outputs load with `internvl.load`."""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from datafiles import A, Q, write_split
from PIL import Image
from refmodels import tiny_checkpoint

import internvl
from internvl.cli.main import main as cli
from internvl.errors import TrainingError
from internvl.kernels import build
from internvl.train.args import GROUPS, TrainArgs, add_arguments, from_namespace, read_yaml
from internvl.train.metrics import plot_loss
from internvl.train.prepare import compute_dtype

FAST = ["--num-workers", "0", "--threads", "1", "--no-grad-checkpoint", "--max-seq-length", "256",
        "--no-tensorboard", "--log-every", "1", "--lr", "1e-3"]  # fmt: skip
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ft") / "model")


def finetune(*args) -> int:
    return cli(["finetune", *map(str, args), *FAST])


# ---- errors ---------------------------------------------------------------------------------------


def test_bad_data_names_file_and_line(model, tmp_path, capsys, monkeypatch):
    good = {"conversations": [Q, A]}
    meta = write_split(tmp_path, [good, good, {"image": "img/gone.png", "conversations": [Q, A]}])
    monkeypatch.chdir(tmp_path)
    assert finetune(model, "--data", meta, "--out", tmp_path / "out", "--max-steps", 1) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["internvl finetune: error: train.jsonl:3: missing image file img/gone.png"]


def test_skip_bad_rows_finishes_and_reports(model, tmp_path, capsys, monkeypatch):
    good = {"conversations": [Q, A]}
    meta = write_split(tmp_path, [good, "{oops", good, {"conversations": [Q]}, good])
    monkeypatch.chdir(tmp_path)
    assert finetune(model, "--data", meta, "--out", "out", "--max-steps", 2, "--skip-bad-rows") == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad row(s)" in out and "train.jsonl:2: invalid JSON" in out
    listed = (tmp_path / "out" / "skipped_rows.txt").read_text().splitlines()
    assert listed == [
        "train.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        "train.jsonl:4: no assistant turn: the conversation needs at least one {'from': 'gpt'} turn",
    ]
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "-1"], "--lr must be positive"),
        (["--packing"], "--packing needs --max-steps"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--min-num-frame", "9", "--max-num-frame", "4"], "--min-num-frame <= --max-num-frame"),
        (["--save-merged"], "--save-merged is for LoRA runs"),
        (
            ["--unfreeze-vit-layers", "7"],
            "unfreeze_vit_layers 7 is out of range for a 2-layer vision encoder",
        ),
    ],
)
def test_bad_options_are_one_line(model, meta, tmp_path, capsys, extra, message):
    assert cli(["finetune", str(model), "--data", str(meta), "--out", str(tmp_path / "o"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_model_and_unknown_yaml_key(tmp_path, capsys):
    assert cli(["finetune", "--data", "x.json"]) == 1
    assert "give a MODEL folder" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("model: m\ndata: d.json\nlearning_rate: 0.1\n")
    assert cli(["finetune", "--config", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "c.yaml: unknown key 'learning_rate'" in err


def test_existing_checkpoints_need_resume(model, meta, tmp_path, capsys):
    out = tmp_path / "o"
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 2, "--save-every", 1) == 0
    capsys.readouterr()
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 2) == 1
    assert "already has checkpoints" in capsys.readouterr().err


# ---- flags = YAML keys ----------------------------------------------------------------------------


def test_every_field_is_a_flag_and_a_yaml_key(tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {a.dest for a in p._actions}
    for cls in GROUPS.values():
        for f in fields(cls):
            assert f.name in flags, f.name
            assert f.metadata["help"]
    (tmp_path / "c.yaml").write_text("model: m\ndata: d.json\nlr: 0.5\nlora_r: 8\nfreeze_vision: true\n")
    args = from_namespace(
        p.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.1", "--no-freeze-vision"])
    )
    assert (args.optim.lr, args.tune.lora_r, args.tune.freeze_vision, args.model.model) == (
        0.1,
        8,
        False,
        "m",
    )
    assert TrainArgs.from_dict(args.to_dict()) == args


SHIPPED_CONFIGS = sorted([*CONFIGS.glob("*.yaml"), *(CONFIGS.parent / "train").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_parse(path):
    values = read_yaml(path)
    name = path.name
    values.setdefault("model", "m")
    values.setdefault("data", "d.json")
    TrainArgs.from_dict(values, source=name)


def test_a_config_extends_another(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.yaml").write_text("lr: 0.5\nseed: 3\nlora_r: 8\n")
    (tmp_path / "c.yaml").write_text("extends: base/b.yaml\nseed: 4\n")
    assert read_yaml(tmp_path / "c.yaml") == {"lr": 0.5, "seed": 4, "lora_r": 8}
    assert read_yaml(CONFIGS.parent / "train" / "nano-stage2i.yaml")["packing"] is True  # from stage 2b
    (tmp_path / "base" / "b.yaml").write_text("extends: ../c.yaml\n")
    with pytest.raises(TrainingError, match="a cycle"):
        read_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: gone.yaml\n")
    assert cli(["finetune", "--config", str(tmp_path / "d.yaml")]) == 1
    assert "gone.yaml: no such config file" in capsys.readouterr().err


# ---- end to end -----------------------------------------------------------------------------------


def test_full_finetune_writes_a_loadable_model_and_metrics(model, meta, tmp_path):
    out = tmp_path / "full"
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 4, "--batch-size", 2) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["loss"]) > 0 for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    # one logged step draws no curve: no plot (and no matplotlib import) for it
    (tmp_path / "one.csv").write_text("step,loss\n1,2.5\n")
    assert plot_loss(tmp_path / "one.csv", tmp_path / "one.png") is None and not (tmp_path / "one.png").exists()
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["torch_dtype"] == "float32"
    vlm = internvl.load(out / "final")
    assert isinstance(vlm.chat("What color is it?", Image.new("RGB", (56, 56)), max_new_tokens=3), str)


def test_lora_run_writes_an_adapter_and_merged_weights(model, meta, tmp_path):
    from internvl.checkpoint.adapter import merge_adapter

    out = tmp_path / "lora"
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 3, "--lora-r", 4, "--freeze-vision",
                    "--save-merged", "--save-layout", "hf") == 0  # fmt: skip
    assert sorted(p.name for p in (out / "final").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    merged = internvl.load(out / "merged")
    base = internvl.load(model, optimize=False)  # a plain, unfused model takes adapters
    applied = merge_adapter(base.model.float(), out / "final")
    ids = torch.tensor([[20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, applied(ids).logits, atol=1e-5, rtol=0)


def test_packed_bf16_run(model, meta, tmp_path):
    out = tmp_path / "packed"
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 3, "--packing", "--max-packed-tokens", 512,
                    "--dtype", "bf16", "--loss-reduction", "sample") == 0  # fmt: skip
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["samples"]) > 1 for r in rows)  # several samples per packed row
    assert json.loads((out / "final" / "config.json").read_text())["torch_dtype"] == "float32"


def test_auto_dtype_follows_the_device(model, meta, tmp_path, capsys):
    cpu = torch.device("cpu")
    assert compute_dtype("auto", cpu, ({"avx2", "fma"}, ""))[0] == torch.float32  # bf16 would be emulated
    for native in ("avx512_bf16", "amx_bf16"):
        assert compute_dtype("auto", cpu, ({"avx2", native}, "")) == (
            torch.bfloat16, f"bf16 (native on this CPU: {native.upper()})")
    assert compute_dtype("bf16", cpu, ({"avx2"}, ""))[0] == torch.bfloat16  # asked for: kept
    assert compute_dtype("fp32", cpu, ({"amx_bf16"}, ""))[0] == torch.float32
    out = tmp_path / "auto"
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 1, "--dtype", "auto") == 0
    flags = build.cpu_flags()[0]
    native = flags is None or bool(flags & {"avx512_bf16", "amx_bf16"})  # unknown flags: bf16 as asked
    assert f"compute dtype: {'bf16' if native else 'fp32'} (" in capsys.readouterr().out


def test_training_from_a_config_with_random_weights(model, meta, tmp_path):
    out = tmp_path / "scratch"
    assert cli(["finetune", "--init-from-config", str(model / "config.json"), "--tokenizer", str(model),
                "--data", str(meta), "--out", str(out), "--max-steps", "2", *FAST]) == 0  # fmt: skip
    assert internvl.load(out / "final").chat("hi", max_new_tokens=2) is not None


def test_resuming_a_finished_run_only_rewrites_the_model(model, meta, tmp_path, capsys):
    out = tmp_path / "done"
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 2, "--save-every", 5) == 0
    assert (out / "checkpoints" / "step-00000002").exists()  # the last step is always checkpointed
    capsys.readouterr()
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 2, "--save-every", 5, "--resume") == 0
    assert "done: 2 steps, nothing left to train" in capsys.readouterr().out
    assert finetune(model, "--data", meta, "--out", out, "--max-steps", 3, "--resume") == 1
    assert "max_steps was 2, now 3" in capsys.readouterr().err
