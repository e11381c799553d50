"""Mini-Monkey's complementary image pyramid (processing/pyramid.py) and the visual-token budget of the inputs
room: the adaptive grid never shares all cut lines with the detailed one, the grids are those of Mini-Monkey's
`dynamic_preprocess2` (written out below from its demo), the tiles come in its order, and a budget is kept."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from refmodels import CORPUS

from internvl.efficiency import EfficiencyConfig
from internvl.errors import PromptError
from internvl.presets import preset
from internvl.processing import IMG_CONTEXT, ImageProcessor, InputBuilder
from internvl.processing.image import dynamic_preprocess, tiles_to_tensor
from internvl.processing.pyramid import PyramidProcessor, choose_pyramid, cut_lines, pyramid_tiles
from internvl.tokenizer import train_bpe_tokenizer

WIDTHS, HEIGHTS = (17, 64, 100, 301, 448, 640, 999, 1280, 1920, 4000), (9, 56, 200, 480, 777, 1080, 3000)
SIZES = [(w, h) for w in WIDTHS for h in HEIGHTS]
SIZES += [(random.Random(k).randint(1, 5000), random.Random(k + 999).randint(1, 5000)) for k in range(300)]


def reference_grid(width, height, min_num, max_num, image_size, prior=None):
    """Mini-Monkey's demo.py, dynamic_preprocess(2)'s choice of grid: every (i, j) with min <= i*j <= max, in the
    order its set and sort give, then (with a prior grid) only those where i does not divide prior cols or j
    prior rows; the closest aspect ratio, a later grid winning a tie while the image exceeds half its area."""
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}  # fmt: skip
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    if prior is not None:
        ratios = [r for r in ratios if prior[0] % r[0] or prior[1] % r[1]]
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(width / height - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    return best


def test_adaptive_grid_avoids_the_detailed_cut_lines():
    for size in SIZES:
        p = choose_pyramid(*size)  # Mini-Monkey's setting: detailed 4-12 tiles, adaptive 3-7
        assert p.adaptive is not None and 4 <= p.counts[1] <= 12 and 3 <= p.counts[0] <= 7 and p.thumbnail
        a_cols, a_rows = cut_lines(p.adaptive)
        d_cols, d_rows = cut_lines(p.detailed)
        assert not (a_cols <= d_cols and a_rows <= d_rows), (size, p)  # a cut line of its own
        assert p.detailed == reference_grid(*size, 4, 12, 448), size
        assert p.adaptive == reference_grid(*size, 3, 7, 448, prior=p.detailed), size


@pytest.mark.parametrize("max_num", [1, 2, 3, 5, 6, 8, 24])
def test_any_cap_avoids_or_has_no_adaptive_layer(max_num):
    proc = PyramidProcessor(max_num=max_num)
    for size in SIZES[::7]:
        p = choose_pyramid(*size, max_num=max_num)
        assert p.detailed[0] * p.detailed[1] <= max_num and p.tiles <= proc.max_tiles(max_num)
        if p.adaptive is not None:
            (ac, ar), (dc, dr) = cut_lines(p.adaptive), cut_lines(p.detailed)
            assert not (ac <= dc and ar <= dr)
    if max_num == 1:  # one tile, as plain tiling gives it: no adaptive layer and no thumbnail
        assert choose_pyramid(640, 480, max_num=1).counts == (0, 1, 0)


def test_tiles_in_mini_monkeys_order():
    im = Image.effect_mandelbrot((700, 300), (-2, -1, 1, 1), 60).convert("RGB")
    p = choose_pyramid(700, 300, image_size=56)
    tiles = pyramid_tiles(im, image_size=56)
    assert len(tiles) == p.tiles
    a, d, _ = p.counts
    # the adaptive layer: the image on the adaptive grid, cropped row-major
    cols, rows = p.adaptive
    big = im.resize((56 * cols, 56 * rows), Image.Resampling.BICUBIC)
    for k in range(a):
        x, y = (k % cols) * 56, (k // cols) * 56
        assert tiles[k].tobytes() == big.crop((x, y, x + 56, y + 56)).tobytes()
    # then the detailed layer and the thumbnail: plain dynamic tiling with at least 4 tiles
    plain = dynamic_preprocess(im, 4, 12, 56)
    assert len(plain) == d + 1
    assert [t.tobytes() for t in tiles[a:]] == [t.tobytes() for t in plain]


def test_the_processor_in_pyramid_mode():
    im = Image.effect_mandelbrot((300, 500), (-2, -1, 1, 1), 40).convert("RGB")
    pyr, plain = PyramidProcessor(image_size=56), ImageProcessor(image_size=56)
    assert torch.equal(pyr(im), tiles_to_tensor(pyramid_tiles(im, image_size=56), 56))
    assert torch.equal(pyr(im, 1), plain(im, 1))  # a one-tile cap (video frames): the same single tile
    assert torch.equal(
        PyramidProcessor(image_size=56, dynamic=False)(im), ImageProcessor(image_size=56, dynamic=False)(im)
    )


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> InputBuilder:
    tok = train_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=320)
    return InputBuilder.from_config(preset("tiny"), tok)  # 56 px tiles, 4 image tokens per tile, 12 tiles max


def image_tokens(build, inputs) -> int:
    return inputs.input_ids.count(build.tokenizer.require(IMG_CONTEXT))


@pytest.mark.parametrize("pyramid", [False, True])
def test_the_budget_caps_every_prompt(build, pyramid):
    sizes = [(1920, 1080), (300, 1200), (640, 640), (50, 40)]
    for budget in (4, 8, 12, 20, 28, 40, 52, 80, 200):
        build.use_efficiency(EfficiencyConfig(pyramid=pyramid, max_visual_tokens=budget))
        for n in (1, 2, 3):
            if budget // 4 < n:
                with pytest.raises(PromptError, match=f"max_visual_tokens={budget} is below one tile"):
                    build("q", [Image.new("RGB", s) for s in sizes[:n]])
                continue
            inputs = build("q", [Image.new("RGB", s) for s in sizes[:n]])
            assert image_tokens(build, inputs) <= budget and len(inputs.num_tiles) == n
            assert inputs.pixel_values.shape[0] == sum(inputs.num_tiles)
    build.use_efficiency(EfficiencyConfig(max_visual_tokens=20))  # 5 tiles: a 4-tile grid and the thumbnail
    assert build("q", Image.new("RGB", (1920, 480))).num_tiles == [5]
    build.use_efficiency(None)


def test_a_large_budget_and_no_config_change_nothing(build):
    ims = [
        Image.effect_mandelbrot((900, 500), (-2, -1, 1, 1), 40).convert("RGB"),
        Image.new("RGB", (200, 700)),
    ]
    build.use_efficiency(None)
    plain = build("q", ims, max_num=6)
    build.use_efficiency(EfficiencyConfig(max_visual_tokens=10_000))
    again = build("q", ims, max_num=6)
    build.use_efficiency(None)
    assert again.input_ids == plain.input_ids and torch.equal(again.pixel_values, plain.pixel_values)
    assert type(build.processor) is ImageProcessor and build.max_visual_tokens is None


def test_the_pyramid_is_one_span_per_image(build):
    build.use_efficiency(EfficiencyConfig(pyramid=True))
    inputs = build("q", Image.new("RGB", (1200, 400)))
    build.use_efficiency(None)
    assert inputs.num_tiles == [choose_pyramid(1200, 400, image_size=56).tiles]
    assert inputs.input_ids.count(build.tokenizer.require("<img>")) == 1
    assert image_tokens(build, inputs) == 4 * inputs.num_tiles[0]


def test_video_frames_take_their_tiles_from_the_budget(build):
    frames = [Image.new("RGB", (64, 48), (i * 20, 0, 0)) for i in range(3)]
    build.use_efficiency(EfficiencyConfig(max_visual_tokens=4 * 6))  # 3 frames, 3 tiles left for the image
    inputs = build("q", Image.new("RGB", (1920, 1080)), video=frames)
    assert inputs.num_tiles == [3, 1, 1, 1] and image_tokens(build, inputs) <= 24
    build.use_efficiency(EfficiencyConfig(max_visual_tokens=4 * 3))
    with pytest.raises(PromptError, match="for each of 1 image"):
        build("q", Image.new("RGB", (1920, 1080)), video=frames)
    build.use_efficiency(None)
