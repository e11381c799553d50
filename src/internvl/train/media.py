"""Training-time media: image tiles with the reference JPEG augmentation, and randomly sampled video frames.

Randomness comes from a per-sample `numpy.random.Generator` (seeded from the run seed, epoch and row), so a
sample is the same whichever data-loader worker builds it and whenever a run resumes.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import VideoError
from ..processing.image import ImageProcessor, dynamic_preprocess, load_image, tiles_to_tensor
from ..processing.video import read_frames, video_info

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def jpeg_degrade(image: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at `quality` (the reference `data_augment`, quality drawn from 75..100)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def to_pixels(
    tiles: Sequence[Image.Image], image_size: int, augment: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Tiles -> normalized float32 [n, 3, S, S]; with `augment` every tile gets its own JPEG quality."""
    if augment:
        tiles = [jpeg_degrade(t, rng.integers(75, 101)) for t in tiles]
    return tiles_to_tensor(tiles, image_size)


def image_pixels(path: str, processor: ImageProcessor, max_num: int, augment: bool,
                 rng: np.random.Generator) -> torch.Tensor:  # fmt: skip
    return to_pixels(processor.tiles(path, max_num), processor.image_size, augment, rng)


def dummy_tile(image_size: int) -> torch.Tensor:
    """The reference pure-text stand-in: a white 224 px image through max_num=1 tiling, [1, 3, S, S]."""
    white = Image.new("RGB", (224, 224), (255, 255, 255))
    return tiles_to_tensor(dynamic_preprocess(white, 1, 1, image_size, False), image_size)


def training_frame_indices(num_frames: int, vlen: int, rng: np.random.Generator) -> list[int]:
    """The reference `get_frame_indices(sample='rand')`: split [0, vlen) into min(num_frames, vlen) equal
    intervals and draw one frame in each (the last frame of an interval excluded, as the reference does);
    when an interval is too short, a sorted random subset instead. Padded with the last index to num_frames."""
    if vlen < 1:
        raise VideoError("the video has no frames")
    n = min(num_frames, vlen)
    edges = np.linspace(0, vlen, n + 1).astype(int)
    ranges = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(n)]
    if all(a < b for a, b in ranges):
        indices = [int(rng.integers(a, b)) for a, b in ranges]
    else:
        indices = sorted(int(i) for i in rng.permutation(vlen)[:n])
    return indices + [indices[-1]] * (num_frames - len(indices))


def _frame_number(name: str) -> int:
    m = re.search(r"(\d+)\.\w+$", name)
    return int(m.group(1)) if m else -1


def training_frames(path: str, min_num: int, max_num: int, rng: np.random.Generator,
                    clip: Sequence[float] | None = None) -> list[Image.Image]:  # fmt: skip
    """T ~ U{min_num..max_num} frames of a video file (PyAV: mp4, webm, gif, ...) or a folder of frames.

    A folder's frames are ordered by the number at the end of their names; a folder with no more than T
    frames is used whole, as in the reference `read_frames_folder`. `clip` = [start_s, end_s].
    """
    t = int(rng.integers(min_num, max_num + 1))
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS)),
                       key=lambda n: (_frame_number(n), n))  # fmt: skip
        if not names:
            raise VideoError(f"{path}: the frame folder has no images")
        if len(names) > t:
            names = [names[i] for i in training_frame_indices(t, len(names), rng)]
        return [load_image(os.path.join(path, n)) for n in names]
    vlen, fps, _ = video_info(path)
    start = 0
    if clip is not None:
        if not fps > 0:
            raise VideoError(f"{path}: the video has no frame rate, so 'clip' cannot be applied")
        start, vlen = int(clip[0] * fps), min(int((clip[1] - clip[0]) * fps), vlen - int(clip[0] * fps))
        if vlen < 1:
            raise VideoError(f"{path}: clip {list(clip)} selects no frames")
    indices = [start + i for i in training_frame_indices(t, vlen, rng)]
    return read_frames(path, indices)
