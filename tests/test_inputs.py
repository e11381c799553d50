"""The inputs room (processing/inputs.py) without a model: shapes, the tile split between n images, per-image
caps, arrays, video frames, history and system message, and the header checks the CLI runs before loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from refmodels import CORPUS, write_clip

from internvl.errors import ImageError, InternVLError, VideoError
from internvl.presets import preset
from internvl.processing import (
    IMG_CONTEXT,
    ImageProcessor,
    InputBuilder,
    check_media,
    tile_images,
    tiles_per_image,
)
from internvl.tokenizer import train_bpe_tokenizer

WIDE, TALL = (1920, 1080), (300, 1200)  # a (2,1) grid + thumbnail at 6 tiles; (1,4) + thumbnail at 12


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> InputBuilder:
    tok = train_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=320)
    return InputBuilder.from_config(preset("tiny"), tok)  # 56 px tiles, 4 image tokens per tile, 12 tiles max


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def image(size, color=(200, 40, 40)):
    return Image.new("RGB", size, color)


@pytest.mark.parametrize(("max_num", "n", "total", "tiles"), [
    (6, 1, 64, 6), (6, 10, 64, 6), (6, 11, 64, 5), (12, 6, 64, 10), (12, 16, 64, 4), (6, 65, 64, 1),
    (6, 0, 64, 6),  # no images: the cap itself
    (12, 1, 12, 12), (12, 2, 12, 6), (12, 5, 12, 2), (12, 13, 12, 1),  # training: max(1, max_num // n)
])  # fmt: skip
def test_tile_split_between_n_images(max_num, n, total, tiles):
    assert tiles_per_image(max_num, n, total) == tiles


def test_shapes_of_two_images(build):
    inp = build("What?", [image(WIDE), image(TALL)], max_num=6)
    assert inp.num_tiles == [3, 5] and inp.num_media == 2
    assert inp.pixel_values.shape == (8, 3, 56, 56) and inp.pixel_values.dtype == torch.float32
    assert inp.input_ids.count(build.tokenizer.require(IMG_CONTEXT)) == 4 * 8
    assert inp.input_ids.count(build.tokenizer.require("<img>")) == 2
    assert inp.question == "Image-1: <image>\nImage-2: <image>\nWhat?"
    # the tiles are the processor's, image by image
    expected = torch.cat([build.processor(image(WIDE), 6), build.processor(image(TALL), 6)])
    assert torch.equal(inp.pixel_values, expected)


def test_per_image_caps(build):
    assert build("?", [image(WIDE), image(TALL)], max_num=[1, None]).num_tiles == [1, 5]  # None: the model's 12
    assert build("?", image(TALL)).num_tiles == [5]  # one image, not in a list
    with pytest.raises(InternVLError, match="max_num has 1 entries but there are 2 images"):
        build("?", [image(WIDE), image(TALL)], max_num=[2])


def test_shared_budget_of_tile_images():
    q = ImageProcessor(max_num=6)
    assert tile_images(q, [image(WIDE), image(TALL)])[1] == [3, 5]
    assert tile_images(q, [image(WIDE), image(TALL)], total_max_num=6)[1] == [3, 4]


def test_paths_pil_and_arrays_give_the_same_tiles(build, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    a = build("?", pixels, max_num=4)
    assert a.num_tiles == [3]
    for same in (Image.fromarray(pixels), tmp_path / "a.png", str(tmp_path / "a.png")):
        assert torch.equal(build("?", same, max_num=4).pixel_values, a.pixel_values)
    with pytest.raises(ImageError, match=r"<array \(2, 3, 5\)>: expected"):
        build("?", np.zeros((2, 3, 5), dtype=np.uint8))


def test_video_frames_one_tile_each(build, clip):
    frames = [image((64, 48), (i * 40, 0, 0)) for i in range(3)]
    inp = build("Describe.", video=frames)
    assert inp.num_tiles == [1, 1, 1] and inp.pixel_values.shape == (3, 3, 56, 56)
    assert inp.question == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nDescribe."
    from_file = build("Describe.", video=clip, num_segments=4)
    assert from_file.num_tiles == [1] * 4 and from_file.pixel_values.shape[0] == 4
    both = build("Which?", image(WIDE), video=frames, max_num=6)
    assert both.num_tiles == [3, 1, 1, 1]  # the images' tiles first, then the frames
    assert both.question.startswith("<image>\nFrame1: <image>\n")


def test_history_keeps_the_media_on_the_first_turn(build):
    first = build("What color?", image(WIDE), max_num=6)
    assert first.question == "<image>\nWhat color?"
    second = build("And the shape?", image(WIDE), history=[(first.question, "red")], max_num=6)
    assert second.question == "And the shape?"
    text = build.tokenizer.decode(second.input_ids)
    assert text.count("<img>") == 1 and text.index("</img>") < text.index("red") < text.index("And the shape?")
    assert second.input_ids.count(build.tokenizer.require(IMG_CONTEXT)) == 4 * 3


def test_no_media_system_message_and_dtype(build):
    plain = build("Hi")
    assert plain.pixel_values is None and plain.num_tiles == [] and plain.question == "Hi"
    default = build.tokenizer.decode(plain.input_ids)
    assert "<|im_start|>system\n" + build.template.system_message in default
    assert "<|im_start|>system" not in build.tokenizer.decode(build("Hi", system_message="").input_ids)
    assert "be brief" in build.tokenizer.decode(build("Hi", system_message="be brief").input_ids)
    assert build("?", image(WIDE), dtype=torch.bfloat16).pixel_values.dtype == torch.bfloat16


def test_check_media_reads_headers_only(tmp_path, clip):
    image(WIDE).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    (tmp_path / "bad.mp4").write_bytes(b"hello")
    check_media([tmp_path / "ok.png", image(WIDE)], clip)  # PIL images and good files pass
    with pytest.raises(ImageError, match="missing.png: no such file"):
        check_media([tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="bad.png: not a recognised image format"):
        check_media([str(tmp_path / "bad.png")])
    with pytest.raises(ImageError, match="above the limit of 100"):
        check_media([tmp_path / "ok.png"], max_pixels=100)
    with pytest.raises(VideoError, match="bad.mp4: cannot open video"):
        check_media(video=tmp_path / "bad.mp4")
