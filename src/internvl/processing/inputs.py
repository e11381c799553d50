"""The inputs room: a question, its history, images, per-image tile caps, a video and a system message in;
prompt ids, pixel values and tiles per image out. The API and the server build here; evaluation and training
take the tile split between several images from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ImageError, InternVLError, PromptError
from ..tokenizer import Tokenizer
from .image import DEFAULT_MAX_PIXELS, ImageProcessor, probe_image
from .prompt import build_conversation_prompt
from .pyramid import PyramidProcessor
from .template import Template, get_template
from .video import load_video, probe_video

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..efficiency import EfficiencyConfig

# Tiles of all the images of one question together, as InternVL's evaluation gives them (`total_max_num`).
TOTAL_MAX_NUM = 64


def tiles_per_image(max_num: int, n_images: int, total_max_num: int = TOTAL_MAX_NUM) -> int:
    """The tile cap of each of n images sharing a budget: max(1, min(max_num, total_max_num // n)).

    One rule for every caller: evaluation shares 64 tiles (InternVL's VLMEvalKit wrapper, so a few images keep
    their full `max_num`); training shares `max_dynamic_patch` itself (total_max_num=max_num), which is the
    reference's max(1, max_dynamic_patch // n) for several images and the full budget for one."""
    return max(1, min(max_num, total_max_num // max(1, n_images)))


def budget_tiles(max_visual_tokens: int, num_image_token: int, n_images: int, n_frames: int = 0) -> int:
    """Tiles (thumbnail included) each of n images may have when the prompt's visual tokens are capped at
    `max_visual_tokens`: video frames (a tile each) first, the rest shared evenly by `tiles_per_image`."""
    total = max_visual_tokens // num_image_token - n_frames
    if total < max(1, n_images):
        raise PromptError(f"max_visual_tokens={max_visual_tokens} is below one tile ({num_image_token} tokens) "
                          f"for each of {n_images} image(s) and {n_frames} video frame(s)")  # fmt: skip
    return tiles_per_image(total, n_images, total)


def per_image_caps(max_num: int | Sequence[int | None] | None, n_images: int) -> list[int | None]:
    """One tile cap per image from one cap for all (or None: the processor's max_num) or a list of caps."""
    if max_num is None or isinstance(max_num, int):
        return [max_num] * n_images
    caps = list(max_num)
    if len(caps) != n_images:
        raise InternVLError(f"max_num has {len(caps)} entries but there are {n_images} images (one cap per image)")
    return caps


def as_image_list(images: Any) -> list[Any]:
    """None -> [], one image (path, PIL image, array) -> [it], a list or tuple -> a list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def tile_images(processor: ImageProcessor, images: Sequence[Any], max_num: int | None = None,
                total_max_num: int | None = None) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """Tile several images: pixel values [sum(counts), 3, S, S] and the tile count of each image.

    Without `total_max_num` (the inference default) every image gets the full `max_num`, as the model cards
    do, so one image tiles the same alone or in a group; with it they share the budget (`tiles_per_image`)."""
    if not images:
        raise ImageError("tile_images: no images given")
    cap = processor.max_num if max_num is None else max_num
    if total_max_num is not None:
        cap = tiles_per_image(cap, len(images), total_max_num)
    tensors = [processor(im, cap) for im in images]
    return torch.cat(tensors), [t.shape[0] for t in tensors]


def video_frames(video: Any, num_segments: int = 8) -> list[Any]:
    """The frames of `video`: a file sampled into `num_segments` frames, or frames given as a list (kept)."""
    if video is None:
        return []
    if isinstance(video, (list, tuple)):
        return list(video)
    return load_video(video, num_segments=num_segments)


def check_media(images: Sequence[Any] = (), video: Any = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Fail fast, from the file headers only, on image or video files that are missing, empty, of an unknown
    format or too large; the media are decoded once, later, when the inputs are built."""
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            probe_image(im, max_pixels)
    if isinstance(video, (str, os.PathLike)):
        probe_video(video, max_pixels)


@dataclass
class ModelInputs:
    """What the model is given for one request. L prompt tokens, T tiles of S x S pixels.

    input_ids     [L] token ids: the rendered prompt, each image's `<image>` expanded to
                  <img> + <IMG_CONTEXT> x (num_image_token * its tiles) + </img>
    pixel_values  [T, 3, S, S] float, T = sum(num_tiles): the images' tiles, then one tile per video frame;
                  None when there are no media
    num_tiles     tiles of each image (its grid plus the thumbnail), then 1 for each video frame
    question      the user turn as written into the prompt (with its placeholders): keep it in the history
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    num_tiles: list[int]
    question: str

    @property
    def num_media(self) -> int:
        return len(self.num_tiles)


class InputBuilder:
    """Builds `ModelInputs` with one model's tokenizer, image processor, template and image token count."""

    def __init__(self, tokenizer: Tokenizer, processor: ImageProcessor, template: str | Template,
                 num_image_token: int, system_message: str | None = None):  # fmt: skip
        self.tokenizer = tokenizer
        self.processor = processor
        self.template = get_template(template)
        self.num_image_token = num_image_token
        self.system_message = system_message  # None: the template's default
        # InternVL3.5-Flash: pixel values -> context tokens per tile (the model's router); None: num_image_token
        self.tile_tokens: Callable[[torch.Tensor], list[int]] | None = None
        self.max_visual_tokens: int | None = None  # all media of a prompt share this many tokens (issue 19)

    def use_efficiency(self, cfg: EfficiencyConfig | None) -> None:
        """The input side of the efficiency switches: pyramid tiling and the visual-token budget (None: off)."""
        p = self.processor
        kind = PyramidProcessor if cfg is not None and cfg.pyramid else ImageProcessor
        self.processor = kind(p.image_size, p.min_num, p.max_num, p.use_thumbnail, p.dynamic, p.max_pixels,
                              p.pad2square)  # fmt: skip
        self.max_visual_tokens = cfg.max_visual_tokens if cfg is not None else None

    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer: Tokenizer) -> InputBuilder:
        p = config.processor
        return cls(tokenizer, ImageProcessor.from_config(config), p.template, config.num_image_token,
                   p.system_message)  # fmt: skip

    def __call__(self, question: str, images: Sequence[Any] | Any = None, *, video: Any = None,
                 history: Sequence[tuple[str, str]] | None = None, system_message: str | None = None,
                 max_num: int | Sequence[int | None] | None = None, num_segments: int = 8,
                 dtype: torch.dtype | None = None) -> ModelInputs:  # fmt: skip
        """The inputs of `question` after `history` ((user, assistant) pairs, the user turns as `question`
        returned them). `images`: one or a list of paths, bytes, PIL images or arrays; `max_num` caps the tiles
        of every image, or of each when a list (None: the processor's). `video`: a file, sampled into
        `num_segments` frames, or a list of frames. `system_message` None: the model's. `dtype` casts the
        pixel values (default float32)."""
        images = as_image_list(images)
        frames = video_frames(video, num_segments)
        caps = per_image_caps(max_num, len(images))
        if self.max_visual_tokens is not None:
            share = budget_tiles(self.max_visual_tokens, self.num_image_token, len(images), len(frames))
            caps = [self.processor.cap_within(share, cap) for cap in caps]
        tiles, counts = [], []
        for im, cap in zip(images, caps):
            tiles.append(self.processor(im, cap))
            counts.append(tiles[-1].shape[0])
        for frame in frames:
            tiles.append(self.processor(frame, 1))
            counts.append(1)
        system = self.system_message if system_message is None else system_message
        pixel_values = torch.cat(tiles) if tiles else None
        per_tile = self.tile_tokens(pixel_values) if self.tile_tokens and pixel_values is not None else None
        prompt = build_conversation_prompt(self.template, question, history or (), system, num_images=len(images),
                                           num_frames=len(frames), num_patches_list=counts,
                                           num_image_token=self.num_image_token, tile_tokens=per_tile)  # fmt: skip
        ids = self.tokenizer.encode(prompt.text, add_special_tokens=True)
        if pixel_values is not None and dtype is not None:
            pixel_values = pixel_values.to(dtype)
        return ModelInputs(ids, pixel_values, counts, prompt.question)
