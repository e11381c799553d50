"""LoRA: PEFT-format adapters (loadable by peft itself), the PEFT-free merge equal to PEFT's (rank / alpha patterns,
rsLoRA), chatting with an adapter folder when peft cannot be imported, the merge-lora verb, and the freezing knobs."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from refmodels import tiny_checkpoint

from internvl.checkpoint.adapter import load_adapter_model, merge_adapter
from internvl.checkpoint.io import load_model
from internvl.cli.main import main as cli
from internvl.errors import CheckpointError, TrainingError
from internvl.tokenizer import Tokenizer
from internvl.train.dist import full_state_dict
from internvl.train.freeze import TuneSpec, configure_trainable
from internvl.train.lora import full_modules, lora_config, save_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("lora") / "model")
    return folder, Tokenizer.from_dir(folder).image_context_id


def fresh(base, dtype="fp32"):
    model, _ = load_model(base[0], dtype="fp32", image_token_id=base[1])
    return model.double() if dtype == "fp64" else model


def inputs(image_id):
    """Text ids around two images (2 tiles and 1 tile, 4 tokens per tile) and their pixel values."""
    g = torch.Generator().manual_seed(3)
    text = lambda: torch.randint(12, 300, (5,), generator=g).tolist()  # ids above the special tokens
    ids = text() + [3] + [image_id] * 8 + [4] + text() + [3] + [image_id] * 4 + [4] + text()
    return torch.tensor([ids]), torch.randn(3, 3, 56, 56, generator=g)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A model with LoRA on both towers whose LoRA and projector weights moved away from the base."""
    torch.manual_seed(0)
    model = fresh(base)
    configure_trainable(model, TuneSpec(lora_r=4, vision_lora_r=2, freeze_vision=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    folder = tmp_path_factory.mktemp("adapter")
    config = lora_config(4, 2, modules_to_save=full_modules(model), base_model=str(base[0]))
    save_adapter(folder, full_state_dict(model, trainable_only=True), config)
    return model, folder


def logits(model, base):
    ids, pv = inputs(base[1])
    with torch.no_grad():
        return model(ids, pixel_values=pv.to(model.dtype)).logits


def test_adapter_is_peft_format_and_loads_with_peft(base, trained):
    from peft import PeftModel

    model, folder = trained
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "LORA"
        and cfg["r"] == 4
        and cfg["lora_alpha"] == 8
        and cfg["lora_dropout"] == 0.05
    )
    assert cfg["modules_to_save"] == ["mlp1"] and cfg["base_model_name_or_path"] == str(base[0])
    peft_model = PeftModel.from_pretrained(fresh(base), str(folder)).eval()
    names = {n for n, _ in peft_model.named_modules()}
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A" in names
    assert "base_model.model.vision_model.encoder.layers.1.attn.qkv.lora_B" in names
    want = logits(model, base)
    assert (want - logits(fresh(base), base)).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(logits(peft_model, base), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, atol", [("fp64", 1e-5), ("fp32", 1e-4)])
def test_merged_model_equals_the_adapter_model(base, trained, dtype, atol):
    # fp64 shows the merge is exact (well within 1e-5); fp32 adds only rounding (logits here reach ~10)
    from peft import PeftModel

    model, folder = trained
    unmerged = PeftModel.from_pretrained(fresh(base, dtype), str(folder)).eval()  # LoRA layers in place
    merged = merge_adapter(fresh(base, dtype), folder).eval()
    assert type(merged).__name__ == "InternVLChatModel"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, base), logits(unmerged, base), atol=atol, rtol=0)
    torch.testing.assert_close(logits(unmerged, base).float(), logits(model, base), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_peft_merge_and_unload(base, trained, tmp_path, rslora):
    """The PEFT-free merge gives PEFT's merged weights, tensor by tensor: LoRA on both towers with a rank_pattern
    and an alpha_pattern (vision r=2, alpha 4; language r=4, alpha 8), the projector as modules_to_save, and
    alpha / sqrt(r) under use_rslora."""
    from peft import PeftModel

    _, folder = trained
    if rslora:
        folder = shutil.copytree(folder, tmp_path / "rslora")
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] and cfg["use_rslora"] is rslora
    want = PeftModel.from_pretrained(fresh(base, "fp64"), str(folder)).merge_and_unload().state_dict()
    got = merge_adapter(fresh(base, "fp64"), folder).state_dict()
    plain = fresh(base, "fp64").state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-12, rtol=0, msg=k)
    assert not torch.equal(got["mlp1.1.weight"], plain["mlp1.1.weight"])  # modules_to_save copied
    assert not torch.equal(got["vision_model.encoder.layers.1.attn.qkv.weight"],
                           plain["vision_model.encoder.layers.1.attn.qkv.weight"])  # fmt: skip


TRAIN_EXTRA = ("peft", "matplotlib", "tensorboard")  # pyproject.toml's `train` extra


def _in_extra(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in TRAIN_EXTRA)


@pytest.fixture
def no_peft(monkeypatch):
    """`import peft` (and matplotlib, tensorboard, their submodules) fails, as in an install without the training
    extra."""

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if _in_extra(name):
                raise ImportError(f"{name} is blocked: the training extra is not installed")

    for name in [n for n in sys.modules if _in_extra(n)]:
        monkeypatch.delitem(sys.modules, name)
    for top in TRAIN_EXTRA:
        monkeypatch.setitem(sys.modules, top, None)
    monkeypatch.setattr(sys, "meta_path", [Blocker(), *sys.meta_path])
    with pytest.raises(ImportError):
        import peft  # noqa: F401


def test_chat_with_an_adapter_folder_without_peft(base, trained, no_peft):
    from internvl.api import load

    model, folder = trained
    chat = load(folder)
    torch.testing.assert_close(logits(chat.model, base), logits(model, base), atol=1e-4, rtol=0)
    assert isinstance(chat.chat("hello", max_new_tokens=3), str)
    assert not [n for n, m in sys.modules.items() if _in_extra(n) and m is not None]


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_merge_lora_verb_writes_a_normal_checkpoint(base, trained, tmp_path, layout):
    model, folder = trained
    out = tmp_path / "merged"
    assert cli(["merge-lora", str(base[0]), str(folder), str(out), "--layout", layout]) == 0
    merged, report = load_model(out, dtype="fp32", image_token_id=base[1])
    assert report.layout == layout and (out / "tokenizer.json").exists()
    torch.testing.assert_close(logits(merged, base), logits(model, base), atol=1e-4, rtol=0)


def test_an_adapter_folder_loads_with_its_recorded_base(base, trained, tmp_path):
    model, folder = trained
    merged, tokenizer, base_dir = load_adapter_model(folder)
    assert base_dir == base[0] and tokenizer.image_context_id == base[1]
    torch.testing.assert_close(logits(merged, base), logits(model, base), atol=1e-4, rtol=0)
    moved = tmp_path / "adapter"
    moved.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone"}))
    with pytest.raises(CheckpointError, match="base model '/gone' is not a folder"):
        load_adapter_model(moved)


def test_adapter_for_another_model_is_rejected(base, trained, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.language_model.model.layers.7.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="matches no module"):
        merge_adapter(fresh(base), bad)
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        merge_adapter(fresh(base), tmp_path)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freezing_knobs(base):
    model = fresh(base)
    configure_trainable(model, TuneSpec(freeze_vision=True, unfreeze_vit_layers=-1, freeze_llm=True,
                                        unfreeze_lm_head=True))  # fmt: skip
    names = trainable(model)
    assert {n.split(".")[3] for n in names if n.startswith("vision_model.encoder.layers.")} == {"1"}
    assert not any(n.startswith("vision_model.embeddings") for n in names)
    assert {n for n in names if n.startswith("language_model.")} == {"language_model.lm_head.weight"}
    assert any(n.startswith("mlp1.") for n in names)

    model = fresh(base)
    configure_trainable(model, TuneSpec(unfreeze_vit_layers=1, freeze_vision=True, freeze_mlp=True))
    names = trainable(model)
    assert not any(n.startswith("mlp1.") for n in names)
    assert any(n.startswith("vision_model.encoder.layers.1.") for n in names)
    assert not any(n.startswith("vision_model.encoder.layers.0.") for n in names)

    model = fresh(base)
    configure_trainable(model, TuneSpec(lora_r=8))  # the LLM base is frozen, the rest trains in full
    names = trainable(model)
    llm = {n for n in names if n.startswith("language_model.")}
    assert llm and all(".lora_" in n for n in llm)
    assert any(n.startswith("vision_model.") for n in names) and any(n.startswith("mlp1.") for n in names)
    assert full_modules(model) == ["vision_model", "mlp1"]

    with pytest.raises(TrainingError, match="cannot be combined"):
        configure_trainable(fresh(base), TuneSpec(vision_lora_r=2, unfreeze_vit_layers=-1))
    with pytest.raises(TrainingError, match="nothing to train"):
        configure_trainable(fresh(base), TuneSpec(freeze_vision=True, freeze_mlp=True, freeze_llm=True))


def test_internvl_load_takes_an_adapter_folder(base, trained):
    from internvl.api import load

    model, folder = trained
    chat = load(folder)
    assert chat.tokenizer.image_context_id == base[1]
    torch.testing.assert_close(logits(chat.model, base), logits(model, base), atol=1e-4, rtol=0)
    assert isinstance(chat.chat("hello", max_new_tokens=3), str)
