"""Scenes of the Synthetic Visual World: canvas, palette, shape geometry and non-overlapping placement.

Everything here is sampled from one `random.Random`, so a scene is a pure function of its seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

SHAPES = ("circle", "square", "triangle", "star", "diamond")
HEXAGON = "hexagon"  # reserved for the fine-tuning demonstration set (contract §4)
# Dict order is the contract's color order, which caption groups are sorted by.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "black": (25, 25, 25),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = ((255, 255, 255), (225, 225, 225), (245, 240, 220), (220, 235, 250))
TEXT_COLORS = ((25, 25, 25), (25, 35, 120), (130, 25, 25))  # black, dark blue, dark red

MIN_CANVAS, MAX_CANVAS = 224, 640
MARGIN = 4  # px between any two boxes and between a box and the canvas edge
JITTER = 20  # max per-channel color jitter
MIN_SIDE_PX, MIN_SIDE_FRAC, MAX_SIDE_FRAC = 14, 0.08, 0.30
NOISE_PROB, MAX_NOISE = 0.15, 8  # noise is rare because noisy PNGs cost 3x to write
# Small rotations so that no model can rely on axis-aligned edges; large enough rotations would
# turn a square into a diamond, so each shape keeps its identity.
MAX_ANGLE = {"circle": 0.0, "square": 12.0, "triangle": 10.0, "star": 12.0, "diamond": 8.0, "hexagon": 10.0}

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


def shape_pool(hexagon: bool = False) -> tuple[str, ...]:
    return SHAPES + (HEXAGON,) if hexagon else SHAPES


def shape_rank(shape: str) -> int:
    """Caption sort order: the contract's shape order, with the reserved hexagon last."""
    return shape_pool(True).index(shape)


def unit_points(shape: str, angle: float) -> list[tuple[float, float]]:
    """Polygon of a shape around the origin with radius about 1, rotated by `angle` degrees."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "diamond":
        pts = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    elif shape == "star":
        # inner radius 0.5 rather than the regular 0.38: fatter arms stay visible at 14 px
        pts = [
            (
                (1.0 if k % 2 == 0 else 0.5) * math.sin(k * math.pi / 5),
                -(1.0 if k % 2 == 0 else 0.5) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
    elif shape == "hexagon":
        pts = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    elif shape == "circle":
        pts = [(math.cos(k * math.pi / 16), math.sin(k * math.pi / 16)) for k in range(32)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def fit_points(shape: str, angle: float, box: Box, scale: int = 1) -> list[tuple[float, float]]:
    """The shape's polygon stretched onto `box` (in a canvas `scale` times larger), touching all sides."""
    pts = unit_points(shape, angle)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, ew, eh = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    x1, y1, x2, y2 = (v * scale for v in box)
    sx, sy = (x2 - x1 - 1) / ew, (y2 - y1 - 1) / eh
    return [(x1 + (x - x0) * sx, y1 + (y - y0) * sy) for x, y in pts]


def extent(shape: str, angle: float) -> tuple[float, float]:
    pts = unit_points(shape, angle)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return max(xs) - min(xs), max(ys) - min(ys)


def jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = JITTER) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def separated(a: Box, b: Box, margin: int = MARGIN) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


@dataclass
class Obj:
    shape: str
    color: str
    rgb: tuple[int, int, int]
    angle: float
    box: Box

    def to_json(self) -> list:
        return [self.color, self.shape, list(self.box)]


@dataclass
class Text:
    text: str
    rgb: tuple[int, int, int]
    cap: int  # cap height in px: the "font height" of the contract for A-Z0-9 strings
    box: Box  # reserved area; the glyphs are fitted inside it whatever font is chosen
    font_u: float  # uniform draw that picks the font, so the layout never depends on installed fonts


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    noise: tuple[int, int, int, int] | None  # (tile, dx, dy, amplitude) of the background noise
    aa: bool  # anti-aliased shapes, so no model depends on one rasterizer
    planned: int  # expected number of objects; bounds object sizes so that all of them fit
    objects: list[Obj] = field(default_factory=list)
    text: Text | None = None
    reserved: list[Box] = field(default_factory=list)
    sides: tuple[float, float] | None = None  # (min, max) side fractions: the curriculum (generate_dense)

    def boxes(self) -> list[Box]:
        return [o.box for o in self.objects] + self.reserved

    def side_range(self, shape: str, angle: float) -> tuple[int, int]:
        """Longer-side range so that both sides stay in [max(8% of min side, 14 px), 30%]."""
        m = min(self.width, self.height)
        ew, eh = extent(shape, angle)
        lo = math.ceil(max(MIN_SIDE_FRAC * m, MIN_SIDE_PX) * max(ew, eh) / min(ew, eh)) + 1
        if self.sides is not None:
            return max(lo, int(self.sides[0] * m)), max(lo, int(self.sides[1] * m))
        crowd = math.sqrt(self.width * self.height / (5.0 * max(1, self.planned)))
        return lo, max(lo, int(min(MAX_SIDE_FRAC * m, crowd)))

    def free_box(
        self, rng: random.Random, w: int, h: int, region=None, accept=None, tries: int = 40
    ) -> Box | None:
        """A random `w`x`h` box clear of every other box; `region` bounds its center (x0, x1, y0, y1)."""
        W, H = self.width, self.height
        cx0, cx1, cy0, cy1 = region or (0, W, 0, H)
        x_lo, x_hi = max(MARGIN, math.ceil(cx0 - w / 2)), min(W - MARGIN - w, math.floor(cx1 - w / 2))
        y_lo, y_hi = max(MARGIN, math.ceil(cy0 - h / 2)), min(H - MARGIN - h, math.floor(cy1 - h / 2))
        if x_lo > x_hi or y_lo > y_hi:
            return None
        taken = self.boxes()
        for _ in range(tries):
            x, y = rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi)
            box = (x, y, x + w, y + h)
            if all(separated(box, t) for t in taken) and (accept is None or accept(box)):
                return box
        return None

    def add(self, rng: random.Random, shape: str, color: str, region=None, accept=None) -> Obj | None:
        """Place one object of the given shape and color; None when no free spot was found."""
        angle = rng.uniform(-MAX_ANGLE[shape], MAX_ANGLE[shape])
        lo, hi = self.side_range(shape, angle)
        ew, eh = extent(shape, angle)
        side = rng.randint(lo, hi)
        for _ in range(4):  # shrink towards the minimum size before giving up
            w, h = round(side * ew / max(ew, eh)), round(side * eh / max(ew, eh))
            box = self.free_box(rng, w, h, region, accept)
            if box is not None:
                obj = Obj(shape, color, jitter(rng, COLORS[color]), angle, box)
                self.objects.append(obj)
                return obj
            side = max(lo, int(side * 0.8))
        return None

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            (shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects
        )


def random_size(rng: random.Random) -> tuple[int, int]:
    return rng.randint(MIN_CANVAS, MAX_CANVAS), rng.randint(MIN_CANVAS, MAX_CANVAS)


def new_scene(rng: random.Random, planned: int, size: tuple[int, int] | None = None) -> Scene:
    """An empty canvas: random size and light background, noise on some of them, then objects."""
    w, h = size or random_size(rng)
    noise = None
    if rng.random() < NOISE_PROB:
        noise = (
            rng.randrange(1 << 16),
            rng.randrange(1 << 16),
            rng.randrange(1 << 16),
            rng.randint(2, MAX_NOISE),
        )
    return Scene(w, h, rng.choice(BACKGROUNDS), noise, rng.random() < 0.5, planned)


def other_combo(rng: random.Random, shapes, colors=COLOR_NAMES, avoid=()) -> tuple[str, str]:
    """A random (color, shape) pair not in `avoid`, drawn from the given shapes and colors."""
    while True:
        combo = (rng.choice(colors), rng.choice(shapes))
        if combo not in avoid:
            return combo


def fill(scene: Scene, rng: random.Random, k: int, shapes, colors=COLOR_NAMES, avoid=()) -> bool:
    """Add `k` distractors drawn from `shapes` x `colors` minus the `avoid` combos; False if crowded."""
    for _ in range(k):
        color, shape = other_combo(rng, shapes, colors, avoid)
        if scene.add(rng, shape, color) is None:
            return False
    return True
