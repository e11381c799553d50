"""User questions with image/video placeholders, and their expansion to <img><IMG_CONTEXT>*N</img> spans.

Mirrors the reference `chat()`: `<image>` placeholders are added when the question has none, the whole prompt
is rendered with the template, then the k-th `<image>` becomes image k's tokens (256 per tile at 448 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ..errors import PromptError
from .template import Template, render_prompt

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"


def image_prefix(num_images: int) -> str:
    """`<image>\\n` for one image; `Image-1: <image>\\nImage-2: <image>\\n...` for several (model card style)."""
    if num_images <= 0:
        return ""
    if num_images == 1:
        return IMAGE_PLACEHOLDER + "\n"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images))


def frame_prefix(num_frames: int) -> str:
    """`Frame1: <image>\\nFrame2: <image>\\n...`: the inference label has no hyphen (SFT data uses `Frame-1`)."""
    return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))


def build_question(question: str, num_images: int = 0, num_frames: int = 0) -> str:
    """Add placeholders for the attached media unless the question already places them.

    A `<video>` in the question is replaced by the frame lines (as transformers does); otherwise frame lines
    are prepended when the question has no `<image>`. Images are prepended when the question has no `<image>`,
    before any frame lines. Explicit placeholders are kept as written; their count is checked on expansion.
    """
    if num_images < 0 or num_frames < 0:
        raise PromptError(f"negative media count: {num_images} images, {num_frames} frames")
    has_images = IMAGE_PLACEHOLDER in question
    q = question
    if num_frames:
        frames = frame_prefix(num_frames)
        if VIDEO_PLACEHOLDER + "\n" in q:
            q = q.replace(VIDEO_PLACEHOLDER + "\n", frames, 1)
        elif VIDEO_PLACEHOLDER in q:
            q = q.replace(VIDEO_PLACEHOLDER, frames[:-1], 1)
        elif not has_images:
            q = frames + q
    elif VIDEO_PLACEHOLDER in q:
        raise PromptError("the question contains <video> but no video frames were given")
    if num_images and not has_images:
        q = image_prefix(num_images) + q
    return q


def image_tokens(
    num_tiles: int,
    num_image_token: int,
    img_start: str = IMG_START,
    img_end: str = IMG_END,
    img_context: str = IMG_CONTEXT,
) -> str:
    """The span one image becomes: start, num_image_token context tokens per tile, end."""
    return img_start + img_context * (num_image_token * num_tiles) + img_end


def expand_image_placeholders(
    prompt: str,
    num_patches_list: Sequence[int],
    num_image_token: int,
    img_start: str = IMG_START,
    img_end: str = IMG_END,
    img_context: str = IMG_CONTEXT,
    tile_tokens: Sequence[int] | None = None,
) -> str:
    """Replace the k-th `<image>` by `img_start + img_context * (num_image_token * tiles_k) + img_end`.

    `tile_tokens` (InternVL3.5-Flash, model/vir.py): the context tokens of every tile of every image, in order,
    replacing num_image_token per tile (image k then has the sum of its tiles' counts)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    found = len(parts) - 1
    if found != len(num_patches_list):
        raise PromptError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {len(num_patches_list)} image(s) "
            f"(num_patches_list={list(num_patches_list)}) were given"
        )
    for k, n in enumerate(num_patches_list):
        if n < 1:
            raise PromptError(f"image {k} has {n} tiles; every image needs at least one")
    if tile_tokens is not None and len(tile_tokens) != sum(num_patches_list):
        raise PromptError(f"{len(tile_tokens)} per-tile token counts for {sum(num_patches_list)} tiles")
    out, first = [parts[0]], 0
    for n, rest in zip(num_patches_list, parts[1:]):
        if tile_tokens is None:
            out.append(image_tokens(n, num_image_token, img_start, img_end, img_context))
        else:
            out.append(image_tokens(1, sum(tile_tokens[first : first + n]), img_start, img_end, img_context))
        first += n
        out.append(rest)
    return "".join(out)


class ChatPrompt(NamedTuple):
    text: str  # the rendered prompt, placeholders expanded when tile counts were given
    question: str  # the user turn as written into the prompt: store this in the history, like the reference


def build_conversation_prompt(
    template: str | Template,
    question: str,
    history: Sequence[tuple[str, str]] = (),
    system_message: str | None = None,
    *,
    num_images: int = 0,
    num_frames: int = 0,
    num_patches_list: Sequence[int] | None = None,
    num_image_token: int = 256,
    omit_empty_system: bool = True,
    tile_tokens: Sequence[int] | None = None,
) -> ChatPrompt:
    """A multi-turn prompt: history (user, assistant) pairs, then `question` and an open assistant turn.

    The media (all images, then all frames, of the whole conversation) belong to the first turn that has
    placeholders: if a history turn already has `<image>`, the new question is used as is (the reference keeps
    the prefixed question in its history); otherwise the placeholders go on this question.
    `num_patches_list` (tiles per image, one entry per placeholder) expands them; None leaves `<image>` in.
    `tile_tokens`: per-tile token counts (Flash), see `expand_image_placeholders`.
    """
    placed = any(IMAGE_PLACEHOLDER in user for user, _ in history)
    q = question if placed else build_question(question, num_images, num_frames)
    messages: list[tuple[str, str | None]] = []
    for user, assistant in history:
        messages += [("user", user), ("assistant", assistant)]
    messages += [("user", q), ("assistant", None)]
    text = render_prompt(template, messages, system_message, omit_empty_system=omit_empty_system)
    if num_patches_list is not None:
        text = expand_image_placeholders(text, num_patches_list, num_image_token, tile_tokens=tile_tokens)
    return ChatPrompt(text, q)
