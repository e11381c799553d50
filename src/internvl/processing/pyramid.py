"""Mini-Monkey's complementary image pyramid (arXiv 2408.02034, "MSAC", renamed "CIP"): an adaptive layer
whose grid never shares all its cut lines with the detailed layer's, the detailed layer (InternVL dynamic
tiling) and the thumbnail, in that order in the image's one <img> span. A tiling mode of the image processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from PIL import Image

from .image import (
    ImageProcessor,
    candidate_grids,
    choose_grid,
    find_closest_aspect_ratio,
    grid_tiles,
    load_image,
)

# Mini-Monkey's demo: the detailed layer tiles 4-12, the adaptive layer 3-7 (scaled here with max_num).
DETAILED_MIN = 4
ADAPTIVE_MIN = 3


def adaptive_max(max_num: int) -> int:
    """The adaptive layer's tile cap for a detailed cap: 7 for 12 as in Mini-Monkey, ceil(7/12) of it."""
    return (7 * max_num + 11) // 12


def avoids(grid: tuple[int, int], detailed: tuple[int, int]) -> bool:
    """Whether a (cols, rows) grid has a cut line the detailed grid lacks: its cuts k/i are all among the
    detailed grid's m/a exactly when i divides a, so it avoids them when i does not divide a or j not b."""
    return detailed[0] % grid[0] != 0 or detailed[1] % grid[1] != 0


def cut_lines(grid: tuple[int, int]) -> tuple[set[Fraction], set[Fraction]]:
    """The inner vertical and horizontal cut lines of a (cols, rows) grid, as fractions of the image's sides."""
    cols, rows = grid
    return {Fraction(k, cols) for k in range(1, cols)}, {Fraction(k, rows) for k in range(1, rows)}


@dataclass(frozen=True)
class Pyramid:
    """The grids of one image's pyramid: adaptive (None when no grid within its cap avoids the detailed one),
    detailed, and whether a thumbnail follows."""

    adaptive: tuple[int, int] | None
    detailed: tuple[int, int]
    thumbnail: bool

    @property
    def counts(self) -> tuple[int, int, int]:
        """Tiles of the adaptive layer, the detailed layer and the thumbnail, in prompt order."""
        a = self.adaptive[0] * self.adaptive[1] if self.adaptive else 0
        return a, self.detailed[0] * self.detailed[1], int(self.thumbnail)

    @property
    def tiles(self) -> int:
        return sum(self.counts)


def choose_pyramid(width: int, height: int, max_num: int = 12, image_size: int = 448, min_num: int = 1,
                   use_thumbnail: bool = True) -> Pyramid:  # fmt: skip
    """The pyramid of an image of this size: the detailed grid as dynamic tiling with max_num tiles (at least
    4, or max_num when smaller), then the grid of the adaptive layer (3 to ceil(7/12 max_num) tiles) closest
    to the image's aspect ratio among those that avoid the detailed grid's cut lines (Mini-Monkey's
    `dynamic_preprocess2`)."""
    detailed = choose_grid(width, height, max(min_num, min(DETAILED_MIN, max_num)), max_num, image_size)
    a_max = adaptive_max(max_num)
    grids = [g for g in candidate_grids(min(ADAPTIVE_MIN, a_max), a_max) if avoids(g, detailed)]
    adaptive = find_closest_aspect_ratio(width / height, grids, width, height, image_size) if grids else None
    n = detailed[0] * detailed[1] + (adaptive[0] * adaptive[1] if adaptive else 0)
    return Pyramid(adaptive, detailed, use_thumbnail and n > 1)


def max_pyramid_tiles(max_num: int, use_thumbnail: bool = True) -> int:
    """The most tiles a pyramid with this detailed cap can have (every image size)."""
    a_max = adaptive_max(max_num)
    n = max_num + (a_max if a_max > 1 else 0)  # a 1-tile adaptive grid never avoids a detailed grid
    return n + int(use_thumbnail and n > 1)


def pyramid_tiles(image: Image.Image, max_num: int = 12, image_size: int = 448, min_num: int = 1,
                  use_thumbnail: bool = True) -> list[Image.Image]:  # fmt: skip
    """The adaptive layer's tiles, the detailed layer's tiles, then the thumbnail (Mini-Monkey's order)."""
    p = choose_pyramid(image.size[0], image.size[1], max_num, image_size, min_num, use_thumbnail)
    tiles = grid_tiles(image, p.adaptive, image_size) if p.adaptive else []
    tiles += grid_tiles(image, p.detailed, image_size)
    if p.thumbnail:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


class PyramidProcessor(ImageProcessor):
    """The image processor in pyramid mode: the same settings, each image tiled as a complementary pyramid
    (a single-tile cap, as for video frames, still gives the one tile of plain tiling)."""

    def tiles(self, image, max_num: int | None = None) -> list[Image.Image]:
        if not self.dynamic:
            return super().tiles(image, max_num)
        image = load_image(image, self.max_pixels)
        cap = self.max_num if max_num is None else max_num
        return pyramid_tiles(image, cap, self.image_size, self.min_num, self.use_thumbnail)

    def max_tiles(self, max_num: int) -> int:
        return max_pyramid_tiles(max_num, self.use_thumbnail) if self.dynamic else 1
