"""Per-patch targets for pretraining the nano vision encoder, drawn from what the generator knows it drew:
the kind of thing under each 14-px patch (background, text, bar, one of the five shapes), its color, the
character of a text patch and the distances to the four sides of its object's box."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..processing.image import choose_grid, dynamic_preprocess
from ..synth.builders import BUILDERS
from ..synth.chart import Chart, bar_boxes, layout, render_chart
from ..synth.render import pick_font, render_scene
from ..synth.scene import COLOR_NAMES, COLORS, SHAPES, Scene, fit_points

KINDS = ("background", "text", "bar") + SHAPES
CHARS = string.ascii_uppercase + string.digits
# builders whose images are single scenes or charts; multi_image gives several scenes, one is kept
SOURCES = ("color", "shape", "count", "position", "relation", "ocr", "grounding", "caption", "reasoning",
           "multi_image", "chart_value", "chart_max")  # fmt: skip
MIN_COVER = 0.1  # a patch is labelled with the region covering the most of it, if that is >= 10% of it


@dataclass
class Region:
    kind: int
    color: int  # index into COLOR_NAMES, -1 where it does not apply
    char: int  # index into CHARS, -1 where it does not apply
    box: tuple[float, float, float, float]


def nearest_color(rgb: tuple[int, int, int]) -> int:
    def dist(name: str) -> int:
        return sum((a - b) ** 2 for a, b in zip(rgb, COLORS[name]))

    return min(range(len(COLOR_NAMES)), key=lambda i: dist(COLOR_NAMES[i]))


def _text_regions(scene: Scene) -> list[Region]:
    """One region per character, laid out exactly as `render.draw_text` draws the string."""
    t = scene.text
    x1, y1, x2, _ = t.box
    font = pick_font(t.font_u, t.cap, x2 - x1 - 4, t.text)
    left, _, right, _ = font.getbbox(t.text, anchor="ls")
    cap_top = font.getbbox("H", anchor="ls")[1]
    base = y1 + 3 - cap_top
    x = x1 + (x2 - x1 - (right - left)) / 2 - left
    out = []
    for i, c in enumerate(t.text):
        a, b = x + font.getlength(t.text[:i]), x + font.getlength(t.text[: i + 1])
        out.append(Region(KINDS.index("text"), -1, CHARS.index(c), (a, base + cap_top, b, base)))
    return out


def _chart_regions(chart: Chart) -> list[Region]:
    *_, bottom, _, label = layout(chart)
    font = pick_font(chart.font_u, label)
    out = []
    for box, rgb, letter in zip(bar_boxes(chart), chart.colors, chart.letters):
        out.append(Region(KINDS.index("bar"), nearest_color(rgb), -1, box))
        cx, by = (box[0] + box[2]) / 2, bottom + 6 + label
        x0, y0, x1, y1 = font.getbbox(letter, anchor="ms")
        out.append(Region(KINDS.index("text"), -1, CHARS.index(letter), (cx + x0, by + y0, cx + x1, by + y1)))
    return out


def sample_image(
    rng: random.Random, sources: tuple[str, ...] = SOURCES
) -> tuple[Image.Image, np.ndarray, list[Region]]:
    """A training image drawn like the split's, its region map (0 background, k region k-1) and regions; `sources`:
    the task builders it draws from, uniformly."""
    while True:
        made = BUILDERS[rng.choice(sources)](rng, False)[0]
        if isinstance(made, list):
            made = rng.choice(made)
        if isinstance(made, (Scene, Chart)):
            break
    labels = Image.new("L", (made.width, made.height), 0)
    draw = ImageDraw.Draw(labels)
    if isinstance(made, Chart):
        image, regions = render_chart(made), _chart_regions(made)
        for k, r in enumerate(regions):
            draw.rectangle((r.box[0], r.box[1], r.box[2] - 1, r.box[3] - 1), fill=k + 1)
        return image, np.asarray(labels), regions
    image, regions = render_scene(made), []
    for o in made.objects:
        regions.append(Region(KINDS.index(o.shape), COLOR_NAMES.index(o.color), -1, o.box))
        x1, y1, x2, y2 = o.box
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=len(regions))
        else:
            draw.polygon(fit_points(o.shape, o.angle, o.box), fill=len(regions))
    if made.text is not None:
        for r in _text_regions(made):
            regions.append(r)
            draw.rectangle((r.box[0], r.box[1], r.box[2] - 1, r.box[3] - 1), fill=len(regions))
    return image, np.asarray(labels), regions


def patch_targets(labels: np.ndarray, regions: list[Region], image_size: int = 224, patch: int = 14) -> dict:
    """Per-patch targets on the `image_size` view (the whole image resized, as one tile is)."""
    h, w = labels.shape
    small = np.asarray(Image.fromarray(labels).resize((image_size, image_size), Image.Resampling.NEAREST))
    return view_targets(small, regions, (image_size / w, image_size / h), (0, 0), patch)


def view_targets(view: np.ndarray, regions: list[Region], scale: tuple[float, float], origin: tuple[float, float],
                 patch: int = 14) -> dict:  # fmt: skip
    """Per-patch targets of one square view of the label map (a tile or the thumbnail): `view` is the label map
    as the view shows it, `scale` maps canvas pixels to view pixels and `origin` is the view's corner in the
    scaled canvas, so box distances are in the view's patch units (negative or past the view for an object
    the view cuts)."""
    size = view.shape[0]
    g = size // patch
    blocks = view.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    counts = np.stack([(blocks == k).sum(1) for k in range(len(regions) + 1)], 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    best[counts.max(1) < MIN_COVER * patch * patch] = 0
    kind = np.zeros(g * g, np.int64)
    color = np.full(g * g, -1, np.int64)
    char = np.full(g * g, -1, np.int64)
    box = np.zeros((g * g, 4), np.float32)
    (sx, sy), (ox, oy) = scale, origin
    centers = np.arange(g) + 0.5
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    for p in np.nonzero(best)[0]:
        r = regions[best[p] - 1]
        kind[p], color[p], char[p] = r.kind, r.color, r.char
        x1, y1, x2, y2 = ((r.box[0] * sx - ox) / patch, (r.box[1] * sy - oy) / patch,
                          (r.box[2] * sx - ox) / patch, (r.box[3] * sy - oy) / patch)  # fmt: skip
        box[p] = (cx[p] - x1, cy[p] - y1, x2 - cx[p], y2 - cy[p])
    return {"kind": kind, "color": color, "char": char, "box": box}


def tiled_views(image: Image.Image, labels: np.ndarray, regions: list[Region], max_num: int, image_size: int = 224,
                patch: int = 14) -> list[tuple[np.ndarray, dict]]:  # fmt: skip
    """The views the model sees with dynamic tiling (`dynamic_preprocess` with up to `max_num` tiles and the
    thumbnail), each as (uint8 [S, S, 3], its patch targets): at native scale for the tiles, which is where
    14-px letters and shapes stay readable."""
    tiles = dynamic_preprocess(image, 1, max_num, image_size, True)
    cols, rows = choose_grid(image.width, image.height, 1, max_num, image_size)
    h, w = labels.shape
    grid = np.asarray(Image.fromarray(labels).resize((cols * image_size, rows * image_size),
                                                     Image.Resampling.NEAREST))  # fmt: skip
    out = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        view = grid[y : y + image_size, x : x + image_size]
        t = view_targets(view, regions, (cols * image_size / w, rows * image_size / h), (x, y), patch)
        out.append((np.asarray(tiles[k], np.uint8), t))
    if len(tiles) > cols * rows:  # the thumbnail
        out.append((np.asarray(tiles[-1], np.uint8), patch_targets(labels, regions, image_size, patch)))
    return out


def make_set(n: int, seed: int, image_size: int = 224, patch: int = 14, progress: bool = False,
             max_num: int = 1) -> dict:  # fmt: skip
    """The views of `n` images (uint8 [V, S, S, 3]) with their patch targets: each image resized as one tile
    is (`max_num` 1), or all its tiles at native scale and its thumbnail (`max_num` > 1, see `tiled_views`)."""
    from tqdm import tqdm

    rng = random.Random(seed)
    images, cols = [], {"kind": [], "color": [], "char": [], "box": []}
    for _ in tqdm(range(n), desc="vision pretraining images", unit="img", disable=not progress):
        image, labels, regions = sample_image(rng)
        if max_num > 1:
            views = tiled_views(image, labels, regions, max_num, image_size, patch)
        else:
            tile = dynamic_preprocess(image, 1, 1, image_size, True)[0]
            views = [(np.asarray(tile, np.uint8), patch_targets(labels, regions, image_size, patch))]
        for array, targets in views:
            images.append(array)
            for k, v in targets.items():
                cols[k].append(v)
    return {"images": np.stack(images), **{k: np.stack(v) for k, v in cols.items()}}
