"""Rows -> samples: media loaded and tiled, placeholders expanded, the conversation tokenized with labels.

Mirrors the reference `LazySupervisedDataset`: one image (`<image>\\n` added to the first user turn when
missing, up to max_dynamic_patch tiles), several images (max(1, max_dynamic_patch // n) tiles each), a video
(T in [min_num_frame, max_num_frame] frames, one tile each, `<video>\\n` -> `Frame-1: <image>\\n...`) or pure
text (one dummy tile with image flag 0). Failures come back as `BadRow`s, so the caller decides whether to
skip them or stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import DataError, InternVLError
from ..processing.image import ImageProcessor
from ..processing.inputs import tiles_per_image
from ..processing.prompt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, image_tokens
from ..tokenizer import IMG_CONTEXT, Tokenizer
from .binding import scene_queries
from .collate import Sample
from .data import BadRow, RowIndex, media_path
from .media import dummy_tile, image_pixels, to_pixels, training_frames
from .tokenize import tokenize_conversation


@dataclass(frozen=True)
class SampleOptions:
    template: str
    system_message: str | None = None
    max_seq_length: int = 8192
    max_dynamic_patch: int = 12
    min_num_frame: int = 8
    max_num_frame: int = 32
    seed: int = 0
    binding: bool = False  # find the scene mentions of the binding loss (train/binding.py)

    @classmethod
    def for_model(cls, cfg: ModelConfig, data=None, seed: int = 0) -> SampleOptions:
        """The model's template, system message and tiling, with the length and frame limits of `data`
        (the `DataArgs` of a run; None: the defaults)."""
        limits = (
            (data.max_seq_length, data.min_num_frame, data.max_num_frame)
            if data is not None
            else (8192, 8, 32)
        )
        return cls(
            cfg.processor.template, cfg.processor.system_message, limits[0], cfg.processor.max_dynamic_patch,
            limits[1], limits[2], seed, getattr(data, "binding_loss", 0) > 0,
        )


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end of sequence, else 0."""
    return next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)


class SFTDataset:
    """Map-style dataset over a `RowIndex`; the key is (epoch, row) so per-sample randomness is reproducible."""

    def __init__(self, index: RowIndex, tokenizer: Tokenizer, config: ModelConfig, options: SampleOptions):
        self.index = index
        self.tokenizer = tokenizer
        self.options = options
        self.num_image_token = config.num_image_token
        # the reference's training transform ignores pad2square (only its evaluation transform pads)
        self.processor = ImageProcessor.from_config(config, max_num=options.max_dynamic_patch, pad2square=False)
        self.image_size = config.image_size
        self.dummy = dummy_tile(config.image_size)
        self.context_id = tokenizer.require(IMG_CONTEXT)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int] | int) -> Sample | BadRow:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        source = self.index.source(i)
        try:
            item, spec, source = self.index.read(i)
            rng = np.random.default_rng((self.options.seed, epoch, i))
            return self.build(item, spec.root, spec.data_augment, spec.max_dynamic_patch, rng, source)
        except (InternVLError, OSError, ValueError, IndexError, KeyError) as e:
            return BadRow(source, str(e))

    def build(self, item: dict, root: str, augment: bool, max_dynamic_patch: int | None,
              rng: np.random.Generator, source: str = "") -> Sample:  # fmt: skip
        """The sample of a (validated) row."""
        o = self.options
        turns = [(t["from"], t["value"]) for t in item["conversations"]]
        image, video = item.get("image"), item.get("video")
        max_num = max_dynamic_patch or o.max_dynamic_patch
        if image:
            paths = [image] if isinstance(image, str) else list(image)
            if isinstance(image, str):
                turns = _ensure_placeholder(turns, IMAGE_PLACEHOLDER)
            # the images of a row share max_dynamic_patch tiles (the reference: max(1, max_num // n))
            per_image = tiles_per_image(max_num, len(paths), total_max_num=max_num)
            tiles = [
                image_pixels(media_path(root, p), self.processor, per_image, augment, rng) for p in paths
            ]
            pixel_values, counts = torch.cat(tiles), [t.shape[0] for t in tiles]
        elif video:
            frames = training_frames(media_path(root, video), o.min_num_frame, o.max_num_frame, rng,
                                     item.get("clip"))  # fmt: skip
            turns = _frames_for_video(_ensure_placeholder(turns, VIDEO_PLACEHOLDER), len(frames))
            pixel_values, counts = to_pixels(frames, self.image_size, augment, rng), [1] * len(frames)
        else:
            pixel_values, counts = self.dummy, []
        turns = _expand_images(turns, counts, self.num_image_token)
        ids, labels = tokenize_conversation(turns, self.tokenizer, o.template, o.system_message)
        if len(ids) > o.max_seq_length:
            if counts and ids[o.max_seq_length :].count(self.context_id):
                raise DataError(f"{len(ids)} tokens with the image tokens, above max_seq_length "
                               f"{o.max_seq_length}: truncation would cut an image")  # fmt: skip
            ids, labels = ids[: o.max_seq_length], labels[: o.max_seq_length]
        flags = (
            torch.ones(pixel_values.shape[0], dtype=torch.long)
            if counts
            else torch.zeros(1, dtype=torch.long)
        )
        binding, places = [], []
        if o.binding and image and len(counts) == 1:
            p = self.processor
            binding = scene_queries(item, turns, ids, self.tokenizer, o.template, self.context_id, p.min_num,
                                    per_image, p.image_size, self.num_image_token, p.use_thumbnail, places)  # fmt: skip
        return Sample(torch.tensor(ids), torch.tensor(labels), pixel_values, flags, source, binding, places)


def _ensure_placeholder(turns: list[tuple[str, str]], placeholder: str) -> list[tuple[str, str]]:
    """Prepend `placeholder\\n` to the first user turn when no user turn has one (reference behaviour)."""
    if any(role == "human" and placeholder in text for role, text in turns):
        return turns
    k = next(k for k, (role, _) in enumerate(turns) if role == "human")
    return turns[:k] + [("human", placeholder + "\n" + turns[k][1])] + turns[k + 1 :]


def _frames_for_video(turns: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """`<video>\\n` -> `Frame-1: <image>\\nFrame-2: <image>\\n...` (the hyphen is the SFT spelling)."""
    lines = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(n))
    out = []
    for role, text in turns:
        if role == "human" and VIDEO_PLACEHOLDER in text:
            if VIDEO_PLACEHOLDER + "\n" in text:
                text = text.replace(VIDEO_PLACEHOLDER + "\n", lines + "\n", 1)
            else:
                text = text.replace(VIDEO_PLACEHOLDER, lines, 1)
        out.append((role, text))
    return out


def _expand_images(
    turns: list[tuple[str, str]], counts: list[int], num_image_token: int
) -> list[tuple[str, str]]:
    """The k-th `<image>` of the user turns -> `<img>` + `<IMG_CONTEXT>` x (num_image_token * tiles_k) + `</img>`."""
    out, k = [], 0
    for role, text in turns:
        if role == "human" and IMAGE_PLACEHOLDER in text:
            parts = text.split(IMAGE_PLACEHOLDER)
            pieces = [parts[0]]
            for rest in parts[1:]:
                pieces.append(image_tokens(counts[k], num_image_token))
                pieces.append(rest)
                k += 1
            text = "".join(pieces)
        out.append((role, text))
    return out
