"""`internvl finetune --compile`: the regions it compiles train to the same weights as the eager model (fp32,
packed rows with several samples, the vision encoder trained too), and the saved model keeps its layout."""

from __future__ import annotations

import pytest
import torch
from refmodels import tiny_checkpoint
from safetensors.torch import load_file

from internvl.train.args import TrainArgs
from internvl.train.compiled import compile_available, compile_regions
from internvl.train.run import train

pytestmark = pytest.mark.skipif(compile_available() is not None, reason=str(compile_available()))
OPTIONS = {"max_steps": 3, "batch_size": 1, "lr": 1e-3, "num_workers": 0, "max_seq_length": 256,
           "packing": True, "max_packed_tokens": 1024, "grad_checkpoint": False, "tensorboard": False,
           "threads": 1, "seed": 3, "log_every": 1, "save_every": 0}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("compile") / "model")


def test_compiled_regions_match_the_eager_model(model):
    import internvl

    eager = internvl.load(str(model)).model.float()
    compiled = internvl.load(str(model)).model.float()
    n = compile_regions(compiled)
    layers = len(eager.vision_model.encoder.layers) + 3 * len(eager.language_model.model.layers)
    assert n == layers
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    pixels = torch.randn(3, 3, eager.config.vision.image_size, eager.config.vision.image_size)
    for tiles in (3, 2):  # another tile count reuses the dynamic graph
        with torch.no_grad():
            torch.testing.assert_close(compiled.vision_model(pixels[:tiles]), eager.vision_model(pixels[:tiles]),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    embeds = torch.randn(1, 37, eager.config.llm.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled.language_model(embeds), eager.language_model(embeds), rtol=1e-3, atol=1e-4
        )  # fmt: skip (fused kernels sum in another order)


def test_compiled_training_ends_with_the_eager_weights(model, meta, tmp_path):
    n = torch.get_num_threads()
    runs = {}
    try:
        for name, compiled in (("eager", False), ("compiled", True)):
            options = {**OPTIONS, "model": str(model), "data": str(meta), "out": str(tmp_path / name),
                       "compile": compiled}  # fmt: skip
            runs[name] = train(TrainArgs.from_dict(options), log=lambda _m: None)
    finally:
        torch.set_num_threads(n)
    losses = [[row["loss"] for row in runs[k].history] for k in ("eager", "compiled")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    eager, compiled = (load_file(runs[k].final / "model.safetensors") for k in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    moved = 0
    for key, w in eager.items():
        torch.testing.assert_close(compiled[key], w, rtol=1e-3, atol=1e-4, msg=key)
        start = load_file(model / "model.safetensors")[key]
        moved += not torch.equal(start, w)
    assert moved > len(eager) // 2  # the vision encoder, projector and decoder all trained


def test_compiled_vision_pretraining_follows_the_eager_run(model, tmp_path, monkeypatch):
    """`internvl nano vit --compile`: each vision layer compiled, the same losses step by step (bf16 autocast,
    so to bf16's precision) and a model folder with the same tensors."""
    import csv
    import json

    import internvl.train.compiled as compiled_module
    from internvl.nano.vit import pretrain

    compiled_counts = []
    monkeypatch.setattr(
        compiled_module, "compile_regions", lambda m: compiled_counts.append(compile_regions(m))
    )

    opts = {"steps": 3, "images": 4, "batch": 4, "lr": 1e-3, "log_every": 1, "save_every": 0, "threads": 1,
            "data": tmp_path / "pool.npz"}  # fmt: skip
    n = torch.get_num_threads()
    try:
        runs = {
            k: pretrain(model, tmp_path / k, compile=k == "compiled", **opts) for k in ("eager", "compiled")
        }
    finally:
        torch.set_num_threads(n)
    vision_layers = json.loads((model / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    assert compiled_counts == [vision_layers]  # the compiled run alone, every vision layer and nothing else
    losses = {}
    for k in runs:
        with open(tmp_path / k / "metrics.csv") as f:
            losses[k] = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses["eager"]) == 3 and losses["eager"] == pytest.approx(losses["compiled"], rel=2e-2)
    eager, compiled = (load_file(str(tmp_path / k / "model.safetensors")) for k in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=5e-2, atol=5e-3)
