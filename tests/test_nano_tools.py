"""Tools for training the built-in model from scratch: model folders of checkpoints, and the image probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datafiles import Q, write_split
from PIL import Image
from refmodels import tiny_checkpoint
from safetensors.torch import load_file

from internvl.errors import CheckpointError
from internvl.nano.probe import probe
from internvl.nano.ship import snapshot


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
    with pytest.raises(CheckpointError, match="no weights"):
        snapshot(init, init, tmp_path / "bad")


def test_command_errors_are_one_line(tmp_path, capsys):
    from internvl.cli.main import main

    assert (
        main(
            [
                "nano",
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
    nosplit = ["nano", "curriculum", "--split", str(tmp_path / "nosplit"), "--out", str(tmp_path / "cur")]
    assert main(nosplit) == 1
    err = capsys.readouterr().err.strip()
    missing = tmp_path / "nosplit" / "meta.json"
    assert len(err.splitlines()) == 1 and f"{missing}: not a synthetic split" in err


def test_dense_curriculum_scenes_are_seeded_sized_and_valid(tmp_path):
    from internvl.synth.writer import generate_dense
    from internvl.train.data import check_row

    a, b = tmp_path / "a", tmp_path / "b"
    generate_dense(str(a), 12, max_objects=1, turns=6, square=True, seed=3, sides=(0.4, 0.9))
    generate_dense(str(b), 12, max_objects=1, turns=6, square=True, seed=3, sides=(0.4, 0.9))
    assert (a / "dense.jsonl").read_bytes() == (b / "dense.jsonl").read_bytes()
    png = "images/dense_000005.png"
    assert (a / png).read_bytes() == (b / png).read_bytes()
    rows = [json.loads(line) for line in (a / "dense.jsonl").read_text().splitlines()]
    for row in rows:
        assert check_row(row, str(a)) is None
        assert row["width"] == row["height"]
        turns = row["conversations"]
        assert 2 <= len(turns) <= 12 and turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        assert len({t["value"] for t in turns[::2]}) == len(turns) // 2  # no question asked twice
        # the scene's facts, as a split's rows have them: the one object's box inside the canvas, each question
        meta = row["meta"]
        assert meta["size"] == [row["width"], row["height"]] and len(meta["objects"]) == 1
        x0, y0, x1, y1 = meta["objects"][0][2]
        assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
        assert [t["question"] for t in meta["turns"]] == [t["value"].removeprefix("<image>\n") for t in turns[::2]]
    # one shape filling 40-90% of the side: the caption names exactly one object
    captions = [t["value"] for r in rows for t in r["conversations"][1::2] if t["value"].startswith("There")]
    assert captions and all(c.startswith("There is 1 ") for c in captions)
    with Image.open(a / rows[0]["image"]) as im:
        px = np.asarray(im.convert("RGB")).astype(int)
    shape_px = (px.max(-1) - px.min(-1) > 60) | (px.max(-1) < 100)  # saturated or black: not the background
    assert shape_px.mean() >= 0.1  # a large shape, not a speck


def test_curriculum_writes_every_stage_meta(tmp_path):
    from internvl.nano.curriculum import curriculum
    from internvl.synth.writer import generate_split
    from internvl.train.data import build_index, read_meta

    generate_split(str(tmp_path / "split"), "train", n=4, tasks=["color", "count", "text", "mc", "grounding"])
    counts = curriculum(tmp_path / "split", tmp_path / "cur", scale=0.0005)
    shapes = sum(t["value"].removeprefix("<image>\n").startswith("What shape")
                 for line in (tmp_path / "cur/dense0/dense.jsonl").read_text().splitlines()
                 for t in json.loads(line)["conversations"])  # fmt: skip
    assert shapes > 0
    # stage 1b: half the scenes, all of the split; stage 2h: a quarter of dense1, all of denseS, of color and of
    # count (binding tasks), half of text, of mc and of grounding; stage 2k: stage 2h with count three times over;
    # stage 2m: stage 2k with mc four times over; stage 2o: stage 2m with 9 fresh count questions (18,000 scaled)
    # instead; stage 2r: stage 2o with 6 fresh relation questions and half of 6 fresh position ones (12,000 scaled;
    # the split has none); stage 2u: stage 2r with text four times over; stage 2zc: stage 2u with grounding twice
    # over; stage 2zd: with grounding six times over; stage 2zo: stage 2zc with the position questions of 12 fresh
    # multiple-choice ones (24,000 scaled) twice over
    position_mc = (tmp_path / "cur/mcpos/mc_position.jsonl").read_text().splitlines()
    assert position_mc and all(json.loads(line)["meta"]["category"] == "position" for line in position_mc)
    assert len(position_mc) < len((tmp_path / "cur/mcpos/mc.jsonl").read_text().splitlines()) == 12
    kept = {json.loads(line)["image"] for line in position_mc}  # the other rows' images are deleted
    assert {f"images/{p.name}" for p in (tmp_path / "cur/mcpos/images").iterdir()} == kept
    u = 2 + 15 + 4 + 9 + 4 * 4 + 4 * 4 + 6 + 3
    assert counts == {"shapes": shapes, "stage0": 10, "stage1a": 3 + 10, "stage1": 10 + 15 + 1 + 1 + 1 + 1 + 1,
                      "stage1b": 5 + 7 + 4 + 4 + 4 + 4 + 4, "stage2h": 2 + 15 + 4 + 4 + 2 + 2 + 2,
                      "stage2k": 2 + 15 + 4 + 3 * 4 + 2 + 2 + 2, "stage2m": 2 + 15 + 4 + 3 * 4 + 2 + 4 * 4 + 2,
                      "stage2o": 2 + 15 + 4 + 9 + 2 + 4 * 4 + 2, "stage2r": 2 + 15 + 4 + 9 + 2 + 4 * 4 + 6 + 3 + 2,
                      "stage2u": u + 2, "stage2zc": u + 2 * 4, "stage2zd": u + 6 * 4,
                      "stage2zo": u + 2 * 4 + 2 * len(position_mc)}  # fmt: skip
    fresh = [json.loads(line) for line in (tmp_path / "cur/count2/count.jsonl").read_text().splitlines()]
    split = {json.loads(line)["meta"]["question"] + str(json.loads(line)["meta"]["objects"])
             for line in (tmp_path / "split/count.jsonl").read_text().splitlines()}  # fmt: skip
    assert len(fresh) == 9 and all(r["task"] == "count" for r in fresh)
    assert not split & {r["meta"]["question"] + str(r["meta"]["objects"]) for r in fresh}  # other scenes
    place = read_meta(tmp_path / "cur" / "stage2r.json")
    assert [(s.name, s.annotation.split("/")[-2:]) for s in place if s.name in ("synth_relation", "synth_position")] == [
        ("synth_relation", ["place2", "relation.jsonl"]), ("synth_position", ["place2", "position.jsonl"])]
    for stage in counts:
        specs = read_meta(tmp_path / "cur" / f"{stage}.json")
        assert len(build_index(specs)) == counts[stage]
    names = [s.name for s in read_meta(tmp_path / "cur" / "stage1.json")]
    assert names == ["dense1", "denseS", "synth_color", "synth_count", "synth_text", "synth_mc", "synth_grounding"]
    rows = [json.loads(line) for line in (tmp_path / "cur/dense0/shape.jsonl").read_text().splitlines()]
    question, answer = zip(*(r["conversations"] for r in rows))
    assert all(q["value"].startswith("<image>\nWhat shape") for q in question)
    assert {a["value"] for a in answer} <= {"circle", "square", "triangle", "star", "diamond"}


def test_sincos_position_table_gives_every_patch_a_readable_place():
    import torch

    from internvl.model.vit import sincos_2d

    grid, dim = 16, 192
    table = sincos_2d(grid, dim).double()
    assert table.shape == (grid * grid, dim)
    dist = torch.cdist(table, table) + torch.eye(grid * grid) * 1e9
    assert dist.min() > 0.5  # no two patches share a position code
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    target = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    design = torch.cat([table, torch.ones(grid * grid, 1, dtype=torch.float64)], 1)
    fit = torch.linalg.lstsq(design, target, driver="gelsd").solution  # rank-deficient: 31 of 193
    assert (design @ fit - target).abs().max() < 0.05  # row and column are linear read-outs


def test_snapshot_of_a_later_stage_fills_frozen_tensors_from_the_base(model, tmp_path):
    from safetensors.torch import save_file

    base = load_file(str(model / "model.safetensors"))
    # what a run with a frozen encoder saves: the language model's tensors only
    trained = {k: v + 1 for k, v in base.items() if k.startswith("language_model.")}
    ckpt = tmp_path / "step-00000005"
    ckpt.mkdir()
    save_file(trained, str(ckpt / "model.safetensors"))
    out = load_file(str(snapshot(model, ckpt, tmp_path / "snap") / "model.safetensors"))
    assert out.keys() == base.keys()
    for k, v in out.items():
        assert torch.equal(v, trained[k] if k in trained else base[k]), k


def test_grow_inserts_layers_that_change_nothing_until_trained(model, tmp_path, capsys):
    import internvl
    from internvl.cli.main import main
    from internvl.nano.grow import grow

    out = tmp_path / "deeper"
    assert grow(model, out, "1,0") == {"layers": [2, 4], "new": [1, 3]}
    old = internvl.load(str(model), dtype="fp32", optimize=False)
    new = internvl.load(str(out), dtype="fp32", optimize=False)
    assert len(new.model.language_model.model.layers) == 4
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)).save(tmp_path / "a.png")
    ids, pv, _ = old.prepare("What color is the square?", str(tmp_path / "a.png"))
    with torch.no_grad():
        a = old.model(torch.tensor([ids]), pixel_values=pv).logits
        b = new.model(torch.tensor([ids]), pixel_values=pv).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # the copies keep their source layer's inputs and start with zero outputs
    w, g = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    p = "language_model.model.layers"
    assert torch.equal(g[f"{p}.1.self_attn.q_proj.weight"], w[f"{p}.0.self_attn.q_proj.weight"])
    assert torch.equal(g[f"{p}.3.mlp.up_proj.weight"], w[f"{p}.1.mlp.up_proj.weight"])
    assert torch.equal(g[f"{p}.2.mlp.down_proj.weight"], w[f"{p}.1.mlp.down_proj.weight"])
    for i in (1, 3):
        assert not g[f"{p}.{i}.self_attn.o_proj.weight"].any()
        assert not g[f"{p}.{i}.mlp.down_proj.weight"].any()
    per_layer = {k.removeprefix(f"{p}.0.") for k in w if k.startswith(f"{p}.0.")}
    assert set(g) == set(w) | {f"{p}.{i}.{name}" for i in (2, 3) for name in per_layer}
    assert main(["nano", "grow", str(model), "--out", str(tmp_path / "bad"), "--after", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the decoder has layers 0..1, got [2]" in err
    assert main(["nano", "grow", str(tmp_path), "--out", str(tmp_path / "bad"), "--after", "x"]) == 1
    assert "no model.safetensors" in capsys.readouterr().err
    assert main(["nano", "grow", str(model), "--out", str(model)]) == 1
    assert "another folder" in capsys.readouterr().err
