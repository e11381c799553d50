"""V2PE (Variable Visual Position Encoding, arXiv 2412.09616): image tokens advance the RoPE position by a
fraction, `rope_pos_id_stride / num_image_token` each, so long multimodal prompts use fewer positions.

The rule is the official `get_rope_pos_id` (OpenGVLab/V2PE, `v2pe_fix`): text tokens (`<img>` and `</img>`
included) take the previous position + 1; the N image tokens after an `<img>` at position p take
p + d, p + 2d, ..., p + N d (float32, d = stride / num_image_token); the next text token then takes
ceil(p + N d) + 1. With stride = num_image_token (256 for a 448 tile) d is 1 and the positions are the
ordinary integer ones. A stride counts per tile: an image of n tiles spans n * stride positions.
Decoding continues from the last prompt position: the k-th generated token takes last + k (the official
`prepare_inputs_for_generation`); the cache keeps that shift per row (`KVCache.offsets`). RoPE is then
plain (no rope_scaling), as the official V2PE rotary.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from ..config import ModelConfig
from .rope import Rotary


def image_step(config: ModelConfig) -> float | None:
    """The position step of one image token, or None where V2PE is off (`rope_pos_id_version` "default").
    `v2pe_rnd` (a training setting: a random stride per image) decodes with the configured stride."""
    if config.rope_pos_id_version == "default":
        return None
    return config.rope_pos_id_stride / config.num_image_token


RND_STRIDES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # v2pe_rnd: each image's stride drawn from these in training


def v2pe_positions(input_ids: torch.Tensor, image_token_id: int | None, step: float | Callable[[], float],
                   start: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Float32 positions [B, T] of `input_ids` [B, T]; row b's first token follows position start[b] - 1
    (default 0: the prompt starts at position 0). Every run of `image_token_id` tokens is one image; a
    callable `step` is called once per image."""
    b, t = input_ids.shape
    starts = [0] * b if start is None else [int(s) for s in start.tolist()]
    out = torch.empty(b, t, dtype=torch.float64)
    ids = input_ids.cpu()
    for row in range(b):
        is_img = (
            (ids[row] == image_token_id) if image_token_id is not None else torch.zeros(t, dtype=torch.bool)
        )
        cuts = [0, *((is_img[1:] != is_img[:-1]).nonzero().flatten() + 1).tolist(), t]
        prev = starts[row] - 1  # the position of the token before the first one
        for a, z in pairwise(cuts):
            n = z - a
            if n == 0:
                continue
            k = torch.arange(1, n + 1, dtype=torch.float64)
            if is_img[a]:
                s = step() if callable(step) else step
                out[row, a:z] = prev + k * s
                prev = prev + math.ceil(n * s)
            else:
                out[row, a:z] = prev + k
                prev += n
    return out.to(torch.float32)


def plain_rope(language_model: nn.Module) -> None:
    """V2PE's RoPE is plain (the official code replaces the decoder's rope_scaling by its own unscaled `V2PE`
    rotary): drop the checkpoint's scaling (InternLM2's dynamic NTK) from `language_model` once."""
    rotary = language_model.rotary
    if rotary.kind != "default" or rotary.factor != 1.0:
        language_model.rotary = Rotary(dataclasses.replace(language_model.config, rope_scaling=None))


def prompt_positions(config: ModelConfig, input_ids: torch.Tensor, image_token_id: int | None, cache=None,
                     valid_lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """V2PE positions of a prompt (or of a prompt's rest after cached tokens), on the ids' device. With a
    cache, each row starts after its stored tokens' positions, and the row's offset (next position minus
    stored length) is updated for the tokens that follow, as the model appends these `valid_lengths`."""
    step = image_step(config)
    b, t = input_ids.shape
    lengths = cache.lengths if cache is not None else torch.zeros(b, dtype=torch.long)
    old = getattr(cache, "offsets", None)
    old = torch.zeros(b, dtype=torch.long) if old is None else old
    pos = v2pe_positions(input_ids, image_token_id, step, lengths + old)
    if cache is not None:
        n = valid_lengths.cpu().long() if valid_lengths is not None else torch.full((b,), t, dtype=torch.long)
        last = pos[torch.arange(b), (n - 1).clamp(min=0)].double().ceil().long()
        cache.offsets = torch.where(n > 0, last + 1 - (lengths + n), old)
    return pos.to(input_ids.device)


def sample_positions(config: ModelConfig, input_ids: torch.Tensor, image_token_id: int | None,
                     positions: torch.Tensor, training: bool) -> torch.Tensor:  # fmt: skip
    """V2PE positions for rows whose integer `positions` restart at 0 at every sample (the trainer's packed
    rows; one sample from 0 otherwise): each sample renumbered by the rule. In training, `v2pe_rnd` draws
    each image's stride from RND_STRIDES, as the official training does."""
    step: float | Callable[[], float] = image_step(config)
    if training and config.rope_pos_id_version == "v2pe_rnd":
        step = lambda: random.choice(RND_STRIDES) / config.num_image_token
    pos = positions.cpu().long()
    out = torch.empty(pos.shape, dtype=torch.float32)
    for row in range(pos.shape[0]):
        starts = [i for i in (pos[row] == 0).nonzero().flatten().tolist() if i > 0]
        for a, z in pairwise([0, *starts, pos.shape[1]]):
            out[row, a:z] = v2pe_positions(
                input_ids[row : row + 1, a:z], image_token_id, step, pos[row, a : a + 1]
            )[0]
    return out.to(positions.device)
