"""Drawing of scenes: background with optional noise, filled shapes (aliased or anti-aliased), text.

Rendering is a pure function of a `Scene`; every random choice was made when the scene was sampled.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scene import Obj, Scene, Text, fit_points

SUPERSAMPLE = 4
FONT_SHRINK = 0.85  # the most a string may shrink to fit its reserved width (text layouts plan for it)
NOISE_TILE = 61  # a prime period: the noise never lines up with 14/16 px patches, and PNG still finds repeats
FONT_DIR = Path(__file__).resolve().parents[1] / "assets" / "fonts"
# The faces text is drawn with, shipped with the package (DejaVu 2.37 cut to ASCII, Liberation 1.07 as released;
# runs/subset_fonts.py), in the order of the system list the built-in model was trained with: a font draw picks
# the same face on every machine, whatever fonts it has installed.
FONT_FACES = tuple(
    [f"DejaVuSans{s}.ttf" for s in ("-Bold", "-BoldOblique", "-Oblique", "")]
    + [f"DejaVuSansCondensed{s}.ttf" for s in ("-Bold", "-BoldOblique", "-Oblique", "")]
    + ["DejaVuSansMono-Bold.ttf", "DejaVuSansMono.ttf"]
    + [f"DejaVuSerif{s}.ttf" for s in ("-Bold", "-BoldItalic", "-Italic", "")]
    + [f"DejaVuSerifCondensed{s}.ttf" for s in ("-Bold", "-BoldItalic", "-Italic", "")]
    + [f"LiberationMono-{s}.ttf" for s in ("Bold", "BoldItalic", "Italic", "Regular")]
    + ["LiberationSans-Bold.ttf", "LiberationSans-BoldItalic.ttf"]
)


@functools.lru_cache(maxsize=1)
def font_files() -> tuple[str | None, ...]:
    """Pillow's bundled font (None) plus the packaged faces of FONT_FACES, in that order."""
    missing = [name for name in FONT_FACES if not (FONT_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the package's fonts are missing from {FONT_DIR}: {', '.join(missing)}")
    return (None,) + tuple(str(FONT_DIR / name) for name in FONT_FACES)


@functools.lru_cache(maxsize=4096)
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=64)
def _cap_ratio(path: str | None) -> float:
    _, y0, _, y1 = _font(path, 100).getbbox("H")
    return (y1 - y0) / 100


def cap_px(font: ImageFont.FreeTypeFont) -> int:
    """Rendered cap height: the contract's font height for strings of A-Z and 0-9."""
    _, y0, _, y1 = font.getbbox("H")
    return y1 - y0


def _ink_width(path: str | None, size: int, text: str) -> int:
    x0, _, x1, _ = _font(path, size).getbbox(text)
    return x1 - x0 + 2  # +2: anti-aliased and italic edges reach one pixel past the box


def _size_for_cap(path: str | None, cap: int) -> int:
    size = int(cap / _cap_ratio(path)) + 1
    while size > 6 and cap_px(_font(path, size)) > cap:
        size -= 1
    return size


def pick_font(font_u: float, cap: int, width: int | None = None, text: str = "") -> ImageFont.FreeTypeFont:
    """The font chosen by `font_u` with cap height <= `cap`, shrunk if `text` must fit in `width` px."""
    files = font_files()
    path = files[min(len(files) - 1, int(font_u * len(files)))]
    size = _size_for_cap(path, cap)
    if width is not None and _ink_width(path, size, text) > width:
        if _ink_width(path, size, text) * FONT_SHRINK > width:
            # very wide strings (WWMM in a bold serif) switch to the bundled face, narrower than most
            path = None
            size = _size_for_cap(path, cap)
        while size > 6 and _ink_width(path, size, text) > width:
            size -= 1
    return _font(path, size)


@functools.lru_cache(maxsize=1)
def _noise_tiles() -> np.ndarray:
    # A fixed pool, generated once from a fixed seed: noisy backgrounds stay deterministic and cheap.
    return np.random.default_rng(20240613).uniform(-1.0, 1.0, size=(8, NOISE_TILE, NOISE_TILE, 3))


def background(scene: Scene) -> Image.Image:
    w, h = scene.width, scene.height
    if scene.noise is None:
        return Image.new("RGB", (w, h), scene.background)
    tile_i, dx, dy, amp = scene.noise
    tile = np.roll(_noise_tiles()[tile_i % 8], (dy % NOISE_TILE, dx % NOISE_TILE), axis=(0, 1))
    # the arithmetic runs on one small tile; the full canvas is only a uint8 copy of it
    tile = np.rint(np.asarray(scene.background, dtype=np.float64) + tile * amp).clip(0, 255).astype(np.uint8)
    arr = np.tile(tile, (h // NOISE_TILE + 1, w // NOISE_TILE + 1, 1))[:h, :w]
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def draw_object(img: Image.Image, obj: Obj, aa: bool) -> None:
    """Fill one shape exactly inside its box; `aa` draws a 4x mask and box-filters it down."""
    x1, y1, x2, y2 = obj.box
    if not aa:
        draw = ImageDraw.Draw(img)
        if obj.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=obj.rgb)
        else:
            draw.polygon(fit_points(obj.shape, obj.angle, obj.box), fill=obj.rgb)
        return
    s = SUPERSAMPLE
    w, h = x2 - x1, y2 - y1
    mask = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(mask)
    local = (0, 0, w, h)
    if obj.shape == "circle":
        draw.ellipse((0, 0, w * s - 1, h * s - 1), fill=255)
    else:
        draw.polygon(fit_points(obj.shape, obj.angle, local, s), fill=255)
    img.paste(obj.rgb, (x1, y1, x2, y2), mask.reduce(s))


def draw_text(img: Image.Image, text: Text) -> None:
    """Draw the string centered in its reserved box, cap height `text.cap` unless it must shrink."""
    x1, y1, x2, _ = text.box
    font = pick_font(text.font_u, text.cap, x2 - x1 - 4, text.text)
    draw = ImageDraw.Draw(img)
    left, _, right, _ = font.getbbox(text.text, anchor="ls")
    cap_top = font.getbbox("H", anchor="ls")[1]
    # baseline so that the cap height sits in the upper part of the box, leaving room for Q/J tails
    base = y1 + 3 - cap_top
    x = x1 + (x2 - x1 - (right - left)) / 2 - left
    draw.text((x, base), text.text, font=font, fill=text.rgb, anchor="ls")


def render_scene(scene: Scene, skip: Obj | None = None) -> Image.Image:
    """The scene as an RGB image; `skip` leaves one object out (video frames draw it themselves)."""
    img = background(scene)
    for obj in scene.objects:
        if obj is not skip:
            draw_object(img, obj, scene.aa)
    if scene.text is not None:
        draw_text(img, scene.text)
    return img
