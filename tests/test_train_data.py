"""Fine-tuning data: meta JSON, lazy JSONL rows and their validation, samples (images, video, text), batches
(padding, packing) and the loss reductions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from datafiles import A, Q, write_split
from PIL import Image
from refmodels import tiny_checkpoint
from test_video import _index_of, _write_video

from internvl.checkpoint.io import load_model
from internvl.errors import DataError
from internvl.model.vlm import ModelOutput
from internvl.tokenizer import Tokenizer
from internvl.train.collate import IGNORE, Collator, Packer, Sample
from internvl.train.data import build_index, read_meta
from internvl.train.dataset import SampleOptions, SFTDataset
from internvl.train.media import training_frame_indices, training_frames
from internvl.train.objective import SFTObjective
from internvl.train.stream import PaddedPlan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("data") / "model")
    tok = Tokenizer.from_dir(folder)
    model, _ = load_model(folder, dtype="fp32", image_token_id=tok.image_context_id)
    return folder, tok, model.config


@pytest.fixture()
def split(tmp_path):
    (tmp_path / "img").mkdir()
    for name, size in (("a.png", (120, 50)), ("b.png", (60, 60)), ("c.png", (50, 200))):
        Image.new("RGB", size, "red").save(tmp_path / "img" / name)
    return tmp_path


# ---- meta JSON and lazy rows ----------------------------------------------------------------------


def test_meta_paths_are_relative_to_the_meta_file(split, tiny, monkeypatch):
    meta = write_split(split / "sub", [{"image": "../img/a.png", "conversations": [Q, A]}])
    monkeypatch.chdir("/")
    (spec,) = read_meta(meta)
    assert spec.root == str(split / "sub" / ".") and spec.annotation == str(split / "sub" / "train.jsonl")
    index = build_index([spec])
    item, _, source = index.read(0)
    assert item["image"] == "../img/a.png" and source.endswith("train.jsonl:1")


def test_rows_are_read_by_offset_and_repeat_time(split):
    rows = [{"conversations": [Q, {"from": "gpt", "value": str(i)}]} for i in range(10)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "")  # blank lines are skipped, line numbers still count them
    meta = write_split(split, lines)
    index = build_index(read_meta(meta))
    assert len(index) == 10
    assert [index.read(i)[0]["conversations"][1]["value"] for i in range(10)] == [str(i) for i in range(10)]
    assert index.source(3).endswith("train.jsonl:5")
    assert not hasattr(index, "lines")  # offsets only: the file is not kept in memory
    half = build_index(read_meta(write_split(split, lines, meta_extra={"repeat_time": 0.5})))
    assert [half.read(i)[0]["conversations"][1]["value"] for i in range(len(half))] == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    twice = build_index(read_meta(write_split(split, lines, meta_extra={"repeat_time": 2})))
    assert len(twice) == 20 and twice.read(13)[0]["conversations"][1]["value"] == "3"


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"conversations": [', "invalid JSON"),
        ({"image": "img/missing.png", "conversations": [Q, A]}, "missing image file img/missing.png"),
        ({"image": ["img/a.png", "img/b.png"], "conversations": [{"from": "human", "value": "<image>\nq"}, A]},
         "1 <image> placeholder(s) but the row has 2 images"),
        ({"image": "img/a.png", "conversations": [{"from": "human", "value": "<image><image>"}, A]},
         "2 <image> placeholders but the row has 1 image"),
        ({"conversations": [{"from": "human", "value": "<image>\nq"}, A]}, "<image> placeholder in a row without media"),
        ({"conversations": []}, "empty conversation"),
        ({"conversations": [Q]}, "no assistant turn"),
        ({"conversations": [Q, {"from": "bot", "value": "x"}]}, "'from' must be one of"),
        ({"video": "clips/none.mp4", "conversations": [Q, A]}, "missing video"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_and_line(split, row, message, monkeypatch):
    good = {"image": "img/a.png", "conversations": [Q, A]}
    meta = write_split(split, [good, good, row])
    monkeypatch.chdir(split)
    with pytest.raises(DataError) as e:
        build_index(read_meta(meta))
    assert str(e.value).startswith("train.jsonl:3: ") and message in str(e.value)


def test_skip_bad_rows_collects_every_bad_row(split, monkeypatch):
    good = {"image": "img/a.png", "conversations": [Q, A]}
    meta = write_split(split, [good, "not json", good, {"conversations": [Q]}, good])
    monkeypatch.chdir(split)
    index = build_index(read_meta(meta), skip_bad_rows=True)
    assert len(index) == 3
    assert [str(b).split(": ")[0] for b in index.bad] == ["train.jsonl:2", "train.jsonl:4"]


def test_bad_meta_files(tmp_path):
    with pytest.raises(DataError, match="no such meta file"):
        read_meta(tmp_path / "nope.json")
    (tmp_path / "m.json").write_text(json.dumps({"x": {"root": ".", "annotation": "gone.jsonl"}}))
    with pytest.raises(DataError, match=r"dataset 'x': annotation .*gone.jsonl does not exist"):
        read_meta(tmp_path / "m.json")
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "m.json").write_text(
        json.dumps({"x": {"root": ".", "annotation": "a.jsonl", "repeat_time": 1.5}})
    )
    with pytest.raises(DataError, match="repeat_time above 1 must be a whole number"):
        read_meta(tmp_path / "m.json")


@pytest.mark.parametrize("key, hint", [("lenght", "did you mean 'length'?"), ("repeat_times", "did you mean 'repeat_time'?"),
                                       ("max_dynamic_patches", "did you mean 'max_dynamic_patch'?"),
                                       ("weight", "known keys: root, annotation, data_augment")])  # fmt: skip
def test_an_unknown_meta_key_is_one_line_with_a_suggestion(tmp_path, monkeypatch, key, hint):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "m.json").write_text(json.dumps({"x": {"root": ".", "annotation": "a.jsonl", key: 3}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_meta(tmp_path / "m.json")
    message = str(e.value)
    assert message.startswith(f"m.json: dataset 'x': unknown key {key!r} (") and hint in message
    assert "\n" not in message


def test_every_meta_key_the_project_writes_is_accepted(tmp_path):
    """The full reference entry (what the synthetic writer, build-prefs and the nano recipe write) reads."""
    (tmp_path / "a.jsonl").write_text("")
    entry = {"root": ".", "annotation": "a.jsonl", "data_augment": True, "repeat_time": 2, "length": 0,
             "max_dynamic_patch": 4}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps({"x": entry}))
    (spec,) = read_meta(tmp_path / "m.json")
    assert (spec.data_augment, spec.repeat_time, spec.length, spec.max_dynamic_patch) == (True, 2.0, 0, 4)


# ---- samples ------------------------------------------------------------------------------------


def dataset(tiny, meta, **kw):
    _, tok, cfg = tiny
    opts = SampleOptions(**{"template": "internvl2_5", "max_dynamic_patch": 6, "min_num_frame": 2, "max_num_frame": 4,
                            **kw})  # fmt: skip
    return SFTDataset(build_index(read_meta(meta)), tok, cfg, opts)


def text_of(tok, sample):
    return tok.decode(sample.input_ids.tolist())


def test_single_image_gets_a_placeholder_and_its_tiles(split, tiny):
    _, tok, cfg = tiny
    ds = dataset(tiny, write_split(split, [{"image": "img/a.png", "conversations": [Q, A]}]))
    s = ds[(0, 0)]
    n_tiles = s.pixel_values.shape[0]
    assert n_tiles == 3 and s.image_flags.tolist() == [1] * 3  # 120x50 -> 2x1 grid + thumbnail
    text = text_of(tok, s)
    assert (
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * (cfg.num_image_token * 3) + "</img>\nWhat color" in text
    )
    assert (s.labels != IGNORE).sum() == len(tok.encode("red", add_special_tokens=False)) + 1


def test_multi_image_tiles_share_max_dynamic_patch(split, tiny):
    _, tok, cfg = tiny
    conv = [{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nWhich?"}, A]
    ds = dataset(tiny, write_split(split, [{"image": ["img/a.png", "img/c.png"], "conversations": conv}]))
    s = ds[(0, 0)]
    # max(1, 6 // 2) = 3 tiles each: a.png 2x1 + thumbnail, c.png 1x3 + thumbnail
    assert s.pixel_values.shape[0] == 7
    text = text_of(tok, s)
    k = cfg.num_image_token
    assert (
        f"Image-1: <img>{'<IMG_CONTEXT>' * 3 * k}</img>\nImage-2: <img>{'<IMG_CONTEXT>' * 4 * k}</img>"
        in text
    )


def test_pure_text_carries_one_dummy_tile(split, tiny):
    ds = dataset(
        tiny, write_split(split, [{"conversations": [{"from": "system", "value": "Be brief."}, Q, A]}])
    )
    s = ds[(0, 0)]
    assert s.pixel_values.shape == (1, 3, 56, 56) and s.image_flags.tolist() == [0]
    assert "<img>" not in text_of(tiny[1], s) and "system\nBe brief." in text_of(tiny[1], s)


def test_video_frames_use_the_hyphenated_frame_label(split, tiny):
    frames = split / "frames"
    frames.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(frames / f"frame_{i}.jpg")
    ds = dataset(tiny, write_split(split, [{"video": "frames", "conversations": [Q, A]}]))
    s = ds[(0, 0)]
    t = s.pixel_values.shape[0]
    assert 2 <= t <= 4 and s.image_flags.tolist() == [1] * t
    labels = "".join(
        f"Frame-{i + 1}: <img>" + "<IMG_CONTEXT>" * tiny[2].num_image_token + "</img>\n" for i in range(t)
    )
    assert "user\n" + labels + "What color" in text_of(tiny[1], s)
    assert ds[(0, 0)].pixel_values.equal(s.pixel_values)  # same key, same frames
    others = [ds[(e, 0)].pixel_values for e in range(1, 6)]  # another epoch, other frames
    assert any(o.shape != s.pixel_values.shape or not o.equal(s.pixel_values) for o in others)


def test_training_frame_indices_follow_the_reference_rand_sampling():
    rng = np.random.default_rng(0)
    edges = np.linspace(0, 100, 9).astype(int)  # [0, 12, 25, 37, 50, 62, 75, 87, 100]
    for _ in range(20):
        idx = training_frame_indices(8, 100, rng)
        assert all(edges[k] <= i < edges[k + 1] - 1 for k, i in enumerate(idx))
    assert training_frame_indices(8, 8, rng) == list(range(8))  # one-frame intervals: a sorted subset
    assert training_frame_indices(6, 3, rng) == [0, 1, 2, 2, 2, 2]  # padded with the last frame


def test_training_frames_from_a_video_file_and_a_clip(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, "mpeg4", n=30, fps=10)
    rng = np.random.default_rng(1)
    frames = training_frames(str(path), 4, 4, rng)
    idx = [_index_of(f) for f in frames]
    assert len(idx) == 4 and idx == sorted(idx) and idx[-1] < 30
    clip = [_index_of(f) for f in training_frames(str(path), 3, 3, rng, clip=[1.0, 2.0])]
    assert all(10 <= i < 20 for i in clip)


def test_too_long_rows_with_images_are_bad_not_cut(split, tiny):
    ds = dataset(
        tiny, write_split(split, [{"image": "img/a.png", "conversations": [Q, A]}]), max_seq_length=20
    )
    bad = ds[(0, 0)]
    assert "truncation would cut an image" in bad.reason and bad.source.endswith("train.jsonl:1")
    text = dataset(tiny, write_split(split, [{"conversations": [Q, A]}]), max_seq_length=20)[(0, 0)]
    assert text.num_tokens == 20


# ---- batches -------------------------------------------------------------------------------------


def sample(ids, labels, tiles=0, source=""):
    flags = torch.ones(tiles, dtype=torch.long) if tiles else torch.zeros(1, dtype=torch.long)
    pv = torch.full((max(tiles, 1), 3, 4, 4), float(len(ids)))
    return Sample(torch.tensor(ids), torch.tensor(labels), pv, flags, source)


def test_padded_batch_shifts_targets_inside_each_sample():
    a = sample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4], tiles=2)
    b = sample([5, 6], [IGNORE, 6])
    batch = Collator(pad_id=9, dummy=torch.zeros(1, 3, 4, 4))([a, b])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    assert batch.targets.tolist() == [[IGNORE, 3, 4, IGNORE], [6, IGNORE, IGNORE, IGNORE]]
    assert batch.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]] and batch.seq_ids is None
    assert batch.sup_index.tolist() == [1, 2, 4] and batch.sup_sample.tolist() == [0, 0, 1]
    assert batch.sample_tokens == [2, 1] and batch.num_tokens == 6
    assert batch.pixel_values.shape[0] == 2 and batch.image_flags.tolist() == [1, 1]  # dummy of b dropped


def test_packed_rows_restart_positions_and_keep_samples_apart():
    a, b, c = (
        sample([1, 2, 3], [IGNORE, 2, 3]),
        sample([4, 5], [4, 5]),
        sample([6, 7, 8, 9], [IGNORE] * 3 + [9]),
    )
    packer = Packer(max_tokens=6, max_tiles=8)
    rows = list(packer.pack(iter([((0, k), s) for k, s in enumerate([a, b, c])])))
    assert [[s.num_tokens for s in row] for row, _ in rows] == [[3, 2], [4]]
    assert rows[0][1] == (0, 2) and rows[1][1] is None  # resume position: the first sample not packed
    batch = Collator(pad_id=0, dummy=torch.zeros(1, 3, 4, 4), packed=True).rows([r for r, _ in rows])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.seq_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    # sample b's first label (4) is not a target of a's last token: no learning across the boundary
    assert batch.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE], [IGNORE, IGNORE, 9, IGNORE, IGNORE]]
    assert batch.sample_tokens == [2, 1, 1]
    assert batch.pixel_values.shape[0] == 1 and batch.image_flags.tolist() == [0]  # one dummy for the batch


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, **_):
        return ModelOutput(logits=self.logits)


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_loss_reductions_by_hand(reduction):
    # sample 0 has 1 supervised token, sample 1 has 4
    a = sample([1, 2], [IGNORE, 1])
    b = sample([1, 2, 3, 4, 5], [IGNORE, 1, 2, 3, 0])
    batch = Collator(pad_id=0, dummy=torch.zeros(1, 3, 4, 4))([a, b])
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    obj = SFTObjective(reduction)
    out = obj(FixedLogits(logits), batch)
    ce0 = [torch.nn.functional.cross_entropy(logits[0, 0], torch.tensor(1)).item()]
    ce1 = [
        torch.nn.functional.cross_entropy(logits[1, t], torch.tensor(y)).item()
        for t, y in enumerate([1, 2, 3, 0])
    ]
    w = {"token": (1, 1), "sample": (1, 1 / 4), "square": (1, 1 / math.sqrt(4))}[reduction]
    want = (w[0] * sum(ce0) + w[1] * sum(ce1)) / (w[0] * 1 + w[1] * 4)
    assert out.loss_sum.item() / obj.normalizer(batch) == pytest.approx(want, rel=1e-6)


def test_every_split_of_a_global_batch_sees_the_same_rows():
    def rows(micro, accum, world, step):
        got = []
        for r in range(world):
            plan = PaddedPlan(n=37, seed=3, micro=micro, accum=accum, world=world, rank=r)
            for epoch, s, chunks in plan.steps(0, plan.steps_per_epoch):
                if s == step:
                    got += [int(i) for c in chunks for i in c]
        return sorted(got)

    for step in range(5):  # G = 8: 5 steps per epoch, the last one partial
        want = rows(8, 1, 1, step)
        assert rows(4, 1, 2, step) == want and rows(2, 2, 2, step) == want and rows(1, 4, 2, step) == want
    assert sorted(i for s in range(5) for i in rows(8, 1, 1, s)) == list(range(37))


def test_data_loader_workers_do_not_change_the_batches(split, tiny):
    from internvl.train.stream import PaddedBatches

    rows = [{"image": f"img/{n}", "conversations": [Q, A]} for n in ("a.png", "b.png", "c.png")] * 2
    ds = dataset(tiny, write_split(split, rows, meta_extra={"data_augment": True}))
    plan = PaddedPlan(len(ds), seed=0, micro=2, accum=1, world=1, rank=0)
    collate = Collator(0, ds.dummy)
    runs = []
    for workers in (0, 2):
        source = PaddedBatches(ds, collate, plan, total_steps=3, skip_bad_rows=False, num_workers=workers)
        runs.append([b.pixel_values for micro, _, _ in source(None) for b in micro])
    assert all(x.equal(y) for x, y in zip(*runs)) and len(runs[0]) == 3


def test_packed_stream_resumes_from_its_position(split, tiny):
    from internvl.train.stream import PackedBatches

    rows = [{"image": f"img/{n}", "conversations": [Q, A]} for n in ("a.png", "b.png", "c.png")]
    rows += [{"conversations": [Q, {"from": "gpt", "value": "word " * k}]} for k in range(1, 6)]
    ds = dataset(tiny, write_split(split, rows))
    collate, packer = Collator(0, ds.dummy, packed=True), Packer(max_tokens=300, max_tiles=6)

    def source():
        return PackedBatches(ds, collate, packer, len(ds), seed=0, micro=2, accum=1, world=1, rank=0,
                             skip_bad_rows=False)  # fmt: skip

    first = source()(None)
    steps = [next(first) for _ in range(4)]  # 4 steps of 2 packed rows: more than one epoch of 8 rows
    assert steps[-1][1]["epoch"] >= 1
    assert all(b.seq_ids is not None and b.input_ids.shape[1] <= 300 for micro, _, _ in steps for b in micro)
    resumed = source()(steps[1][1])
    for micro, state, _ in steps[2:]:
        again, again_state, _ = next(resumed)
        assert again_state == state
        assert again[0].input_ids.equal(micro[0].input_ids) and again[0].pixel_values.equal(
            micro[0].pixel_values
        )
