"""Image loading and dynamic tiling: reference test vectors, parity with transformers, bad inputs."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from internvl.errors import ImageError
from internvl.presets import preset
from internvl.processing import (
    ImageProcessor,
    candidate_grids,
    choose_grid,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    load_image,
    tile_images,
)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ---- tiling: the reference vectors (spec §4) ------------------------------------------------------

VECTORS = [
    # (width, height, max_num, grid, tiles including the thumbnail)
    (448, 448, 12, (1, 1), 1),
    (800, 600, 12, (4, 3), 13),
    (640, 480, 12, (4, 3), 13),
    (1000, 500, 12, (2, 1), 3),
    (2000, 1000, 12, (4, 2), 9),
    (1920, 1080, 12, (4, 2), 9),
    (300, 1200, 12, (1, 4), 5),
    (4000, 100, 12, (12, 1), 13),
    (672, 448, 12, (3, 2), 7),
    (1920, 1080, 6, (2, 1), 3),
    (800, 600, 6, (3, 2), 7),
]


@pytest.mark.parametrize("w,h,max_num,grid,n_tiles", VECTORS)
def test_reference_tiling_vectors(w, h, max_num, grid, n_tiles):
    assert choose_grid(w, h, 1, max_num) == grid
    tiles = dynamic_preprocess(Image.new("RGB", (w, h)), max_num=max_num)
    assert len(tiles) == n_tiles
    assert all(t.size == (448, 448) for t in tiles)


def test_tiles_are_row_major_crops_and_thumbnail_is_last():
    # 896x448 -> grid (2, 1): left tile red, right tile blue, then the squashed whole image
    a = np.zeros((448, 896, 3), np.uint8)
    a[:, :448] = (255, 0, 0)
    a[:, 448:] = (0, 0, 255)
    left, right, thumb = dynamic_preprocess(Image.fromarray(a), max_num=12)
    assert np.asarray(left)[224, 224].tolist() == [255, 0, 0]
    assert np.asarray(right)[224, 224].tolist() == [0, 0, 255]
    t = np.asarray(thumb)
    assert t[224, 10].tolist() == [255, 0, 0] and t[224, 437].tolist() == [0, 0, 255]
    assert len(dynamic_preprocess(Image.fromarray(a), use_thumbnail=False)) == 2


def test_tie_switches_to_larger_grid_only_for_large_images():
    grids = candidate_grids(1, 12)
    # ratio 1 ties (1,1), (2,2), (3,3): the larger grid wins only while area > half of its pixel capacity
    assert find_closest_aspect_ratio(1.0, grids, 448, 448, 448) == (1, 1)
    assert find_closest_aspect_ratio(1.0, grids, 700, 700, 448) == (2, 2)  # 490000 > 0.5*448^2*4
    assert find_closest_aspect_ratio(1.0, grids, 1000, 1000, 448) == (3, 3)
    assert grids[:3] == [(1, 1), (1, 2), (2, 1)] and len(grids) == 35


def test_matches_transformers_grid_on_random_sizes():
    got = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    proc = got.GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": 448, "width": 448})
    rng = np.random.default_rng(1234)
    for _ in range(50):
        w, h = (int(x) for x in np.exp(rng.uniform(np.log(16), np.log(5000), size=2)))
        max_num = int(rng.choice([1, 4, 6, 12, 24]))
        ours = choose_grid(w, h, 1, max_num)
        theirs = got.get_optimal_tiled_canvas((h, w), (448, 448), 1, max_num)
        assert ours == tuple(theirs), (w, h, max_num)
        cols, rows = ours
        n_ours = cols * rows + (cols * rows > 1)
        if w * h < 1_000_000:  # tile the smaller ones for real; the count formula is checked above
            assert len(dynamic_preprocess(Image.new("RGB", (w, h)), max_num=max_num)) == n_ours
        n_theirs = proc.get_number_of_image_patches(h, w, {"max_patches": max_num})
        assert n_ours == n_theirs, (w, h, max_num)


@pytest.mark.parametrize(
    "w,h,dynamic", [(800, 600, True), (301, 1250, True), (448, 448, True), (640, 200, False)]
)
def test_pixel_values_match_transformers(w, h, dynamic):
    # The PIL backend resizes with PIL bicubic like the reference. The default (torchvision) backend of
    # GotOcr2ImageProcessor resizes tensors instead and is not expected to be bit-identical.
    got = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    proc = got.GotOcr2ImageProcessorPil(
        crop_to_patches=dynamic, min_patches=1, max_patches=12, size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
    )  # fmt: skip
    im = _noise(w, h, seed=w)
    theirs = proc(im, return_tensors="pt")["pixel_values"]
    ours = ImageProcessor(dynamic=dynamic)(im)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-6  # measured: 0.0 (bit-identical)


def test_processor_normalizes_with_imagenet_stats():
    x = ImageProcessor()(Image.new("RGB", (448, 448), (255, 0, 128)))
    assert x.shape == (1, 3, 448, 448)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


def test_processor_from_config_and_budgets():
    cfg = preset("tiny").replace(max_dynamic_patch=4, use_thumbnail=False)
    p = ImageProcessor.from_config(cfg)
    assert (p.image_size, p.min_num, p.max_num, p.use_thumbnail, p.dynamic) == (56, 1, 4, False, True)
    assert p(Image.new("RGB", (400, 100))).shape == (4, 3, 56, 56)  # (4,1) grid, no thumbnail
    assert p(Image.new("RGB", (400, 100)), max_num=2).shape[0] == 2
    assert (
        ImageProcessor.from_config(cfg.replace(dynamic_image_size=False))(Image.new("RGB", (400, 100))).shape[
            0
        ]
        == 1
    )

    q = ImageProcessor(max_num=6)
    wide, tall = Image.new("RGB", (1920, 1080)), Image.new("RGB", (300, 1200))
    pv, counts = tile_images(q, [wide, tall])
    assert counts == [3, 5] and pv.shape[0] == 8  # each image gets the full budget, as the model cards
    pv, counts = tile_images(q, [wide, tall], total_max_num=6)
    assert counts == [3, 4]  # max(1, 6 // 2) = 3 tiles each: (2,1)+thumb and (1,3)+thumb
    with pytest.raises(ImageError, match="no images"):
        tile_images(q, [])


# ---- loading and mode conversion -----------------------------------------------------------------


def test_load_image_accepts_path_bytes_file_and_pil(tmp_path):
    im = _noise(30, 20)
    path = tmp_path / "a.png"
    im.save(path)
    for src in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), im):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (30, 20)
        assert np.array_equal(np.asarray(out), np.asarray(im))


def test_exif_orientation_is_applied():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left (red) half ends on top
    out = load_image(_png(Image.fromarray(a), exif=exif))
    assert out.size == (20, 40)
    assert np.asarray(out)[0, 0].tolist() == [255, 0, 0] and np.asarray(out)[-1, 0].tolist() == [0, 0, 255]


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white, not black
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    px = np.asarray(load_image(_png(rgba)))[0].tolist()
    assert px[0] == [255, 255, 255] and px[1] == [255, 0, 0] and all(120 <= v <= 135 for v in px[2])

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    assert np.asarray(load_image(_png(pal, transparency=0)))[0].tolist() == [[255, 255, 255], [0, 255, 0]]
    la = Image.new("LA", (1, 1), (0, 0))
    assert np.asarray(load_image(la))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_grey_and_bilevel_are_converted():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format="TIFF")
    assert np.asarray(load_image(buf.getvalue()))[0].tolist() == [[255, 255, 255], [255, 0, 0]]
    assert np.asarray(load_image(Image.new("L", (1, 1), 77)))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_image(Image.new("1", (1, 1), 1)))[0, 0].tolist() == [255, 255, 255]


def test_high_bit_depth_is_scaled_not_clipped():
    a16 = np.array([[0, 128 * 257, 65535, 1000]], np.uint16)
    im16 = Image.open(io.BytesIO(_png(Image.fromarray(a16))))
    assert im16.mode == "I;16"
    # PIL's convert("L") would clip 1000 and 32896 to 255; proper scaling divides by 257
    assert np.asarray(load_image(im16))[0, :, 0].tolist() == [0, 128, 255, 4]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    i32 = Image.fromarray(np.array([[-10, 0, 245]], np.int32))  # outside 16-bit range: stretched min..max
    assert np.asarray(load_image(i32))[0, :, 0].tolist() == [0, 10, 255]


# ---- bad inputs -------------------------------------------------------------------------------------


def test_decompression_cap(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (2000, 1000)).save(path)
    with pytest.raises(
        ImageError, match=r"big\.png: image is 2000x1000 = 2000000 pixels, above the limit of 1000000"
    ):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=None).size == (2000, 1000)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9_999)
    # PIL's own guard: its warning (between 1x and 2x MAX_IMAGE_PIXELS) and its error both become ImageError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_500_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        with pytest.raises(ImageError, match=r"big\.png: refused as a possible decompression bomb"):
            load_image(path, max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)
    with pytest.raises(ImageError, match=r"big\.png: refused as a possible decompression bomb"):
        load_image(path, max_pixels=None)


def test_missing_empty_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match=r"junk\.png: not a recognised image format"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        _noise(64, 64).save(buf, format=fmt)
        data = buf.getvalue()
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}: cannot decode image .*truncated"):
            load_image(cut)
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"")
    with pytest.raises(ImageError, match="expected a path, bytes"):
        load_image(123)  # type: ignore[arg-type]
