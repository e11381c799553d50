"""Dense pretraining of the nano vision encoder: patch targets drawn from the generator, and the run through
the training loop (resume included)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from refmodels import tiny_checkpoint
from safetensors.torch import load_file

from internvl.errors import TrainingError
from internvl.nano.patches import CHARS, KINDS, Region, _text_regions, patch_targets, sample_image
from internvl.nano.vit import pretrain
from internvl.synth.builders import BUILDERS
from internvl.synth.scene import COLOR_NAMES, COLORS, Obj, Scene


def test_patch_targets_of_one_known_square():
    scene = Scene(448, 448, (255, 255, 255), None, False, 1)
    scene.objects.append(Obj("square", "red", (220, 30, 30), 0.0, (112, 56, 224, 168)))  # patches 4-7, 2-5
    from PIL import Image, ImageDraw

    labels = Image.new("L", (448, 448), 0)
    ImageDraw.Draw(labels).rectangle((112, 56, 223, 167), fill=1)
    t = patch_targets(np.asarray(labels), [Region(KINDS.index("square"), 0, -1, (112, 56, 224, 168))])
    kind = t["kind"].reshape(16, 16)
    inside = np.zeros((16, 16), bool)
    inside[2:6, 4:8] = True  # rows 2-5, columns 4-7 at 14 px on the 224 view
    assert (kind[inside] == KINDS.index("square")).all() and (kind[~inside] == 0).all()
    color = t["color"].reshape(16, 16)
    assert (color[inside] == 0).all() and (color[~inside] == -1).all()
    # patch (row 2, col 4) has its center half a patch from the left and top sides, 3.5 from the others
    assert t["box"].reshape(16, 16, 4)[2, 4].tolist() == pytest.approx([0.5, 0.5, 3.5, 3.5])


def test_ocr_characters_are_labelled_in_reading_order():
    rng = random.Random(5)
    scene, turn = BUILDERS["ocr"](rng, False)
    regions = _text_regions(scene)
    assert "".join(CHARS[r.char] for r in regions) == turn.answer
    xs = [r.box[0] for r in regions]
    assert xs == sorted(xs) and all(r.box[2] > r.box[0] and r.box[3] > r.box[1] for r in regions)
    x1, _, x2, _ = scene.text.box
    assert all(x1 <= r.box[0] and r.box[2] <= x2 + 1 for r in regions)


def test_sampled_images_label_what_they_draw():
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        image, labels, regions = sample_image(rng)
        assert labels.shape == (image.height, image.width)
        assert labels.max() <= len(regions)
        pixels = np.asarray(image)
        for k, r in enumerate(regions, 1):
            if KINDS[r.kind] in ("text",):
                continue
            where = labels == k
            if where.sum() > 30:  # shapes and bars are filled with their color, jittered by <= 20 per channel
                median = np.median(pixels[where], axis=0)
                assert np.abs(median - COLORS[COLOR_NAMES[r.color]]).max() <= 25
        t = patch_targets(labels, regions)
        seen.update(int(k) for k in np.unique(t["kind"]))
    assert seen == set(range(len(KINDS)))


def test_pretrain_learns_and_writes_a_model_folder(tmp_path):
    init = tiny_checkpoint(tmp_path / "init")
    stats = pretrain(init, tmp_path / "out", steps=30, images=8, batch=8, lr=3e-3, log_every=1000)
    first = pretrain(init, tmp_path / "out0", steps=1, images=8, batch=8, lr=3e-3, log_every=1000)
    assert stats["held_out"]["kind"] < first["held_out"]["kind"]
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text()) == json.loads((init / "config.json").read_text())
    a, b = load_file(str(out / "model.safetensors")), load_file(str(init / "model.safetensors"))
    assert a.keys() == b.keys()
    assert (out / "tokenizer.json").exists()
    assert json.loads((out / "vit_pretrain.json").read_text())["steps"] == 30


def test_a_stopped_pretraining_resumes_to_the_same_weights(tmp_path):
    """It runs through the training loop: stopped at step 3 (a checkpoint), refused without resume, then
    resumed to the end, it ends with the weights and held-out figures of an uninterrupted run."""
    init = tiny_checkpoint(tmp_path / "init")
    opts = {"steps": 6, "images": 8, "batch": 4, "lr": 3e-3, "save_every": 2, "log_every": 1000,
            "data": tmp_path / "pool.npz"}  # fmt: skip
    whole = pretrain(init, tmp_path / "whole", **opts)
    part = pretrain(init, tmp_path / "part", stop_after=3, **opts)
    assert part["paused"] and part["steps"] == 3 and not (tmp_path / "part" / "vit_pretrain.json").exists()
    assert (tmp_path / "part" / "model.safetensors").exists()  # a stopped run leaves a usable encoder
    with pytest.raises(TrainingError, match="pass --resume"):
        pretrain(init, tmp_path / "part", **opts)
    with pytest.raises(TrainingError, match="batch was 4, now 2"):
        pretrain(init, tmp_path / "part", resume=True, **{**opts, "batch": 2})
    resumed = pretrain(init, tmp_path / "part", resume=True, **opts)
    assert resumed == whole
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_probe_only_trains_the_read_out_and_writes_nothing(tmp_path):
    init = tiny_checkpoint(tmp_path / "init")
    cache = tmp_path / "cache" / "pool.npz"
    stats = pretrain(init, tmp_path / "out", steps=2, images=4, batch=4, data=cache, train_encoder=False)
    assert cache.exists() and stats["images"] == 4
    assert (
        not (tmp_path / "out" / "model.safetensors").exists()
        and not (tmp_path / "out" / "vit_pretrain.json").exists()
    )


def test_command_line_runs_the_pretraining(tmp_path, capsys):
    from internvl.nano.cli import main

    init = tiny_checkpoint(tmp_path / "init")
    argv = ["vit", "--init", str(init), "--out", str(tmp_path / "vit"), "--data", str(tmp_path / "pool.npz")]
    assert main(argv + ["--steps", "1", "--images", "4", "--batch", "4"]) == 0
    out = capsys.readouterr().out  # the step log, then the summary
    assert json.loads(out[out.index("{") :])["steps"] == 1
    assert (tmp_path / "vit" / "vit_pretrain.json").exists() and (tmp_path / "pool.npz").exists()
    assert main(["vit", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'missing' / 'config.json'}: no such file" in err and len(err.strip().splitlines()) == 1
    )
    # bad values are refused before any image is generated
    assert main(argv + ["--steps", "0"]) == 1
    assert "steps must be at least 1, got 0" in capsys.readouterr().err
    assert main(["vit", "--init", str(init), "--out", str(tmp_path / "y"), "--batch", "0"]) == 1
    assert "batch must be at least 1, got 0" in capsys.readouterr().err
    assert main(["vit", "--init", str(init), "--out", str(tmp_path / "y"), "--held-out", "0"]) == 1
    assert "held_out must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_tiled_views_label_tiles_at_native_scale():
    """A 448x224 canvas tiles into two 224 tiles at scale 1 and a thumbnail: the square drawn at x 252-336 is in
    the second tile at patches 2-7 (x 28-112 there), with box distances in that tile's patch units."""
    from PIL import Image, ImageDraw

    from internvl.nano.patches import tiled_views

    image = Image.new("RGB", (448, 224), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((252, 56, 335, 139), fill=(220, 30, 30))
    labels = Image.new("L", (448, 224), 0)
    ImageDraw.Draw(labels).rectangle((252, 56, 335, 139), fill=1)
    region = Region(KINDS.index("square"), 0, -1, (252, 56, 336, 140))
    views = tiled_views(image, np.asarray(labels), [region], max_num=4)
    assert len(views) == 3  # two tiles and the thumbnail
    (left, t0), (right, t1), (thumb, t2) = views
    assert (t0["kind"] == 0).all()
    kind = t1["kind"].reshape(16, 16)
    inside = np.zeros((16, 16), bool)
    inside[4:10, 2:8] = True
    assert (kind[inside] == KINDS.index("square")).all() and (kind[~inside] == 0).all()
    assert right[4 * 14 + 7, 2 * 14 + 7].tolist() == [220, 30, 30] and (left == 255).all()
    assert t1["box"].reshape(16, 16, 4)[4, 2].tolist() == pytest.approx([0.5, 0.5, 5.5, 5.5])
    assert thumb.shape == (224, 224, 3)
    # the thumbnail squeezes the canvas to half its width: the square spans 3 patch columns there
    assert t2["box"].reshape(16, 16, 4)[4, 9].tolist() == pytest.approx([0.5 - 0.0, 0.5, 2.5, 5.5], abs=0.01)


def test_pretraining_can_continue_a_trained_model_on_tiles(tmp_path):
    """--keep-weights starts from INIT's weights: the language model comes back unchanged, the encoder moves."""
    init = tiny_checkpoint(tmp_path / "init")
    pretrain(init, tmp_path / "out", steps=2, images=3, batch=4, lr=3e-3, log_every=1000, max_num=4,
             keep_weights=True)  # fmt: skip
    a, b = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(init / "model.safetensors"))
    llm = [k for k in a if k.startswith("language_model.")]
    vit = [k for k in a if k.startswith("vision_model.") and "weight" in k]
    assert llm and all(torch.equal(a[k], b[k]) for k in llm)
    assert any(not torch.equal(a[k], b[k]) for k in vit)


def test_balanced_kind_loss_is_the_cross_entropy_over_object_patches(tmp_path):
    """--balance-kind adds the kind cross-entropy over object patches alone (background, the most patches,
    no longer dominates kind), reports it held out, and a run cannot resume with it switched."""
    from internvl.nano.patches import make_set
    from internvl.nano.vit import PatchBatch, PatchHead, patch_losses

    pool = make_set(4, 3, 56, 14)
    batch = PatchBatch.of(pool, slice(None))
    assert 0 < batch.objects < batch.num_tokens
    torch.manual_seed(0)
    head = PatchHead(3 * 14 * 14)

    def readout(pixels):  # raw patches as tokens: enough to check which patches the losses cover
        return head(
            pixels.unfold(2, 14, 14).unfold(3, 14, 14).permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(2)
        )

    plain, _ = patch_losses(readout, batch)
    balanced, _ = patch_losses(readout, batch, balance_kind=True)
    obj = batch.kind > 0
    expected = torch.nn.functional.cross_entropy(readout(batch.pixel_values)["kind"][obj], batch.kind[obj])
    assert "kind_objects" not in plain and torch.allclose(balanced["kind_objects"], expected)
    assert torch.allclose(balanced["kind"], plain["kind"]) and not torch.allclose(expected, plain["kind"])

    init = tiny_checkpoint(tmp_path / "init")
    opts = {"steps": 4, "images": 4, "batch": 4, "lr": 3e-3, "save_every": 2, "log_every": 1000}
    part = pretrain(init, tmp_path / "out", stop_after=2, balance_kind=True, **opts)
    assert part["paused"]
    with pytest.raises(TrainingError, match="balance_kind was True, now False"):
        pretrain(init, tmp_path / "out", resume=True, **opts)
    done = pretrain(init, tmp_path / "out", resume=True, balance_kind=True, **opts)
    assert "kind_objects" in done["held_out"]


def test_embedding_targets_follow_the_pixel_shuffle():
    """Each image embedding is asked for the targets of the 2x2 patches the projector merged into it: token (i, j)
    of an 8x8 grid holds patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) of the 16x16 grid, in that order
    (the reference's view/permute order), and its place is i * 8 + j."""
    from internvl.model.projector import pixel_shuffle
    from internvl.nano.vit import EmbedHead, PatchBatch, embed_losses

    order = pixel_shuffle(torch.arange(256.0).reshape(1, 16, 16, 1)).reshape(64, 4).long()
    i, j = 2, 5
    assert order[i * 8 + j].tolist() == [(2 * i) * 16 + 2 * j, (2 * i) * 16 + 2 * j + 1,
                                         (2 * i + 1) * 16 + 2 * j, (2 * i + 1) * 16 + 2 * j + 1]  # fmt: skip
    # targets that a head can only meet where the gather is right: perfect logits for them give zero loss
    rng = torch.Generator().manual_seed(0)
    kind = torch.randint(0, len(KINDS), (2, 256), generator=rng)
    color = torch.where(kind > 0, torch.randint(0, len(COLOR_NAMES), (2, 256), generator=rng), -1)
    char = torch.where(kind == 1, torch.randint(0, len(CHARS), (2, 256), generator=rng), -1)
    b = PatchBatch(torch.zeros(2, 3, 4, 4), kind, color, char, torch.zeros(2, 256, 4), int((kind > 0).sum()),
                   int((color >= 0).sum()), int((char >= 0).sum()))  # fmt: skip

    def perfect(target: torch.Tensor, n: int) -> torch.Tensor:  # [2, 256] -> logits [2, 64, 4, n]
        grid = target.reshape(2, 8, 2, 8, 2).permute(0, 1, 3, 2, 4).reshape(2, 64, 4)  # the stated order
        return torch.nn.functional.one_hot(grid.clamp_min(0), n).float() * 50

    pred = {"kind": perfect(kind, len(KINDS)), "color": perfect(color, len(COLOR_NAMES)),
            "char": perfect(char, len(CHARS)), "place": torch.eye(64).expand(2, -1, -1) * 50}  # fmt: skip
    parts, acc = embed_losses(pred, b, order, balance_kind=True)
    assert all(float(v) < 1e-6 for v in parts.values()), parts
    assert all(float(s) == n for s, n in acc.values())
    pred["place"] = pred["place"].roll(1, dims=-1)  # every token told its neighbour's place
    assert float(embed_losses(pred, b, order, balance_kind=False)[1]["embed_place_acc"][0]) == 0
    head = EmbedHead(32, 64, 4)
    shapes = {k: tuple(v.shape) for k, v in head(torch.zeros(2, 64, 32)).items()}
    assert shapes == {"kind": (2, 64, 4, len(KINDS)), "color": (2, 64, 4, len(COLOR_NAMES)),
                      "char": (2, 64, 4, len(CHARS)), "place": (2, 64, 64)}  # fmt: skip


def test_pretraining_through_the_projector_trains_it_and_holds_the_embeddings(tmp_path):
    """--through-projector trains the encoder and the projector (the language model comes back unchanged), reads
    the targets back from the image embeddings (held-out figures of their own), starts with a zero hold term,
    needs --keep-weights, and a run cannot resume with it switched."""
    from internvl.checkpoint.io import build_model, load_weights
    from internvl.checkpoint.layouts import read_config
    from internvl.nano.patches import make_set
    from internvl.nano.vit import PatchBatch, PatchReadout, patch_losses
    from internvl.tokenizer import Tokenizer

    init = tiny_checkpoint(tmp_path / "init")
    config = read_config(init / "config.json")
    model = build_model(config, Tokenizer.from_dir(init).image_context_id, meta=False)
    load_weights(model, init, dtype=torch.float32)
    grid = config.image_size // config.vision.patch_size
    readout = PatchReadout(
        model.vision_model, config.vision.hidden_size, model.mlp1, config.projector, grid, 2.0
    )
    pool = make_set(2, 5, config.image_size, config.vision.patch_size, max_num=4)
    parts, acc = patch_losses(readout, PatchBatch.of(pool, slice(None)))
    assert float(parts["hold"].detach()) == 0 and {"embed_place", "embed_kind", "embed_color"} <= set(parts)
    assert "embed_place_acc" in acc

    opts = {"steps": 4, "images": 3, "batch": 4, "lr": 3e-3, "save_every": 2, "log_every": 1000, "max_num": 4}
    with pytest.raises(TrainingError, match="--through-projector needs --keep-weights"):
        pretrain(init, tmp_path / "bad", through_projector=True, **opts)
    part = pretrain(init, tmp_path / "out", stop_after=2, keep_weights=True, through_projector=True, **opts)
    assert part["paused"]
    with pytest.raises(TrainingError, match="through_projector was True, now False"):
        pretrain(init, tmp_path / "out", resume=True, keep_weights=True, **opts)
    done = pretrain(init, tmp_path / "out", resume=True, keep_weights=True, through_projector=True, **opts)
    assert 0 <= done["held_out"]["embed_place_acc"] <= 1 and done["held_out"]["hold"] > 0
    a, b = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(init / "model.safetensors"))
    llm = [k for k in a if k.startswith("language_model.")]
    assert llm and all(torch.equal(a[k], b[k]) for k in llm)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("mlp1."))
