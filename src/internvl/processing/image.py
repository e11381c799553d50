"""Image loading and InternVL dynamic tiling: file -> RGB image -> aspect-ratio grid of tiles -> pixel_values.

The tiling matches the reference `dynamic_preprocess` (InternVL 1.5 "dynamic high resolution") exactly.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ImageError

if TYPE_CHECKING:
    from ..config import ModelConfig

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A decompression-bomb guard: 64 MP is larger than any real photo and keeps a decoded RGB frame under 200 MB.
DEFAULT_MAX_PIXELS = 64_000_000


# ---- loading ------------------------------------------------------------------------------------


def _source_name(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    if isinstance(src, np.ndarray):
        return f"<array {tuple(src.shape)}>"
    return str(getattr(src, "name", "<file object>"))


def load_image(src: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `src` (path, bytes, binary file object, PIL image or array) as a fully decoded RGB image.

    EXIF orientation is applied, transparency is composited on white (as transformers' `convert_rgb`), and
    16-bit / float images are scaled to 8 bits. Every failure is an `ImageError` naming the source.
    """
    name = _source_name(src)
    if isinstance(src, np.ndarray):
        src = _from_array(src)
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels, name)
        return to_rgb(src, name)
    if isinstance(src, (str, os.PathLike)):
        _check_file(src, name)
        try:
            with open(src, "rb") as f:
                return _decode(f, name, max_pixels)
        except OSError as e:  # opening failed (permissions...); decoding errors are already ImageError
            raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from None
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(f"{name}: empty image data")
        return _decode(io.BytesIO(bytes(src)), name, max_pixels)
    if hasattr(src, "read"):
        return _decode(src, name, max_pixels)  # type: ignore[arg-type]
    raise ImageError(
        f"{name}: expected a path, bytes, a binary file object, a PIL image or an array, got {type(src).__name__}"
    )


def _check_file(path: str | os.PathLike[str], name: str) -> None:
    if not os.path.exists(path):
        raise ImageError(f"{name}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{name}: is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")


def _from_array(a: np.ndarray) -> Image.Image:
    """An [H, W] grey or [H, W, 3|4] RGB(A) array (uint8, or float / 16-bit as PIL reads them) as a PIL image."""
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"{_source_name(a)}: expected an [H, W], [H, W, 3] or [H, W, 4] image array")
    try:
        return Image.fromarray(np.ascontiguousarray(a))
    except (TypeError, ValueError) as e:
        raise ImageError(f"{_source_name(a)}: not an image array of dtype {a.dtype} ({e})") from None


def probe_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it: the same one-line `ImageError`s
    as `load_image` for a missing, empty or unrecognised file, or one above `max_pixels`."""
    name = _source_name(path)
    _check_file(path, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                size = opened.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (corrupt or not an image)") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from None
    _check_pixels(size, max_pixels, name)
    return size


def open_image(fp: IO[bytes], name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as stored (its own mode, orientation and format: no EXIF rotation, no RGB
    conversion), refusing decompression bombs before decoding. Every failure is an `ImageError` naming `name`."""
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; make the warning an error we can report.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(fp)  # reads the header only
            _check_pixels(opened.size, max_pixels, name)
            opened.load()  # decode everything now, so truncated or corrupt data fails here and not later
            return opened
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(
            f"{name}: refused as a possible decompression bomb ({e}); PIL.Image.MAX_IMAGE_PIXELS is "
            f"{Image.MAX_IMAGE_PIXELS}"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (corrupt or not an image)") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise OSError, SyntaxError, ValueError... on bad data
        raise ImageError(
            f"{name}: cannot decode image ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from None


def _decode(fp: IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    opened = open_image(fp, name, max_pixels)
    try:
        im = ImageOps.exif_transpose(opened)  # a new image, independent of the file
    except Exception as e:  # noqa: BLE001 - a corrupt EXIF block
        raise ImageError(
            f"{name}: cannot decode image ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from None
    return to_rgb(im, name)


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} (max_pixels)"
        )


def to_rgb(im: Image.Image, name: str = "<PIL image>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white rather than their hidden colour."""
    mode = im.mode
    if mode == "RGB":
        return im
    # RGB with a tRNS colour key stays as is (returned above), as in transformers' convert_rgb.
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im), mode)).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert image mode {mode!r} to RGB ({e})") from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth grey image to 0..255; PIL's own convert('L') clips everything above 255 to white."""
    a = a.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = a / 257.0  # 65535 -> 255 exactly
    elif mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        scaled = a * 255.0  # float images in [0, 1]
    elif mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:
        scaled = a / 257.0  # 32-bit container holding 16-bit samples (PNG/TIFF 16-bit via older decoders)
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ---- tiling ---------------------------------------------------------------------------------------


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, sorted by tile count.

    Built through a `set` as the reference does: the sort is stable, so grids of equal area keep the set's
    iteration order, which decides ties (transformers iterates in (cols, rows) order instead). The reference
    scans every (n, i, j) up to max_num, cubic in it (minutes at 100,000); a set's order depends only on the
    order in which its distinct members were first added, which there is (max(min_num, i, j), i, j), so adding
    the valid grids in that order gives the same set at the cost of listing them.
    """
    valid = [(i, j) for i in range(1, max_num + 1) for j in range(max(1, -(-min_num // i)), max_num // i + 1)]
    grids = set(sorted(valid, key=lambda g: (max(min_num, g[0], g[1]), g[0], g[1])))  # noqa: C414 (order)
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, grids: Sequence[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The grid whose cols/rows is closest to `aspect_ratio`; on an exact tie a later (larger) grid wins only
    while the image has more than half the pixels that grid would hold."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def choose_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """(cols, rows) that `dynamic_preprocess` would use for an image of this size."""
    return find_closest_aspect_ratio(
        width / height, candidate_grids(min_num, max_num), width, height, image_size
    )


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Resize the whole image onto the chosen grid (PIL bicubic), crop it row-major into image_size tiles, and
    append a resized copy of the original as a thumbnail when there is more than one tile."""
    grid = choose_grid(image.size[0], image.size[1], min_num, max_num, image_size)
    tiles = grid_tiles(image, grid, image_size)
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def grid_tiles(image: Image.Image, grid: tuple[int, int], image_size: int) -> list[Image.Image]:
    """The image resized onto a (cols, rows) grid (PIL bicubic), cropped row-major into image_size tiles."""
    cols, rows = grid
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    return tiles


def expand2square(image: Image.Image) -> Image.Image:
    """Reference `expand2square`: pad the shorter side evenly with the ImageNet mean color (for `pad2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in IMAGENET_MEAN))
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


def tiles_to_tensor(tiles: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """Reference `build_transform`: bicubic resize to image_size (a no-op copy for tiles), ToTensor, ImageNet
    Normalize, computed in float32 in the same order so results are bit-identical."""
    arrays = []
    for t in tiles:
        t = t if t.mode == "RGB" else to_rgb(t)
        if t.size != (image_size, image_size):
            t = t.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(t, dtype=np.uint8))
    return normalize(np.stack(arrays))


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S]: ToTensor then ImageNet Normalize (reference order)."""
    # uint8 channels-first copy, then in-place float ops: same arithmetic, a third of the time of out-of-place
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std)


class ImageProcessor:
    """Image (or file) -> float32 pixel_values [n_tiles, 3, S, S] with the model's tiling settings."""

    def __init__(
        self,
        image_size: int = 448,
        min_num: int = 1,
        max_num: int = 12,
        use_thumbnail: bool = True,
        dynamic: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        pad2square: bool = False,
    ) -> None:
        if image_size <= 0 or min_num < 1 or max_num < 1:
            raise ValueError(
                f"image_size, min_num and max_num must be positive, got {image_size}, {min_num}, {max_num}"
            )
        self.image_size = image_size
        self.min_num = min_num
        self.max_num = max_num
        self.use_thumbnail = use_thumbnail
        self.dynamic = dynamic
        self.max_pixels = max_pixels
        self.pad2square = pad2square

    @classmethod
    def from_config(cls, config: ModelConfig, **overrides: object) -> ImageProcessor:
        kwargs: dict[str, object] = {
            "image_size": config.image_size,
            "min_num": config.processor.min_dynamic_patch,
            "max_num": config.processor.max_dynamic_patch,
            "use_thumbnail": config.processor.use_thumbnail,
            "dynamic": config.processor.dynamic_image_size,
            "pad2square": config.processor.pad2square,
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    def tiles(self, image: ImageSource, max_num: int | None = None) -> list[Image.Image]:
        image = load_image(image, self.max_pixels)
        if not self.dynamic:
            # one tile: the whole image squashed to S by the transform, or first padded to a square as the
            # reference's transform does with pad2square (dynamic tiles are square already: a no-op there)
            return [expand2square(to_rgb(image)) if self.pad2square else image]
        return dynamic_preprocess(
            image,
            self.min_num,
            self.max_num if max_num is None else max_num,
            self.image_size,
            self.use_thumbnail,
        )

    def __call__(self, image: ImageSource, max_num: int | None = None) -> torch.Tensor:
        return tiles_to_tensor(self.tiles(image, max_num), self.image_size)

    def max_tiles(self, max_num: int) -> int:
        """The most tiles one image gives with this cap, whatever its size (the grid, then the thumbnail)."""
        return max_num + int(self.use_thumbnail and max_num > 1) if self.dynamic else 1

    def cap_within(self, tiles: int, max_num: int | None = None) -> int:
        """The largest cap up to `max_num` (None: the processor's) whose images never exceed `tiles` tiles;
        1 when even two tiles do not fit (one tile, no thumbnail)."""
        cap = self.max_num if max_num is None else max_num
        return next((c for c in range(cap, 0, -1) if self.max_tiles(c) <= tiles), 1)
