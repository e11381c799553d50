"""OpenAI `messages` -> the model's conversation: system message, (user, assistant) history, question, images.

Images keep their order over the whole conversation. A user turn that writes `<image>` (or lmdeploy's
`<IMAGE_TOKEN>`) places its images there; otherwise they go first in that turn, as the model card does
(`<image>\\n` for a single image, `Image-1: <image>\\n...` numbered over the conversation for several).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..processing import IMAGE_PLACEHOLDER
from .schemas import APIError, ImagePart, Message

LMDEPLOY_PLACEHOLDER = "<IMAGE_TOKEN>"


@dataclass
class ImageRef:
    url: str
    max_tiles: int | None  # None: the model's max_dynamic_patch
    param: str  # where it came from, for error messages: messages[i].content[j]


@dataclass
class Conversation:
    system: str | None  # None: the model's default system message
    history: list[tuple[str, str]]
    question: str
    images: list[ImageRef] = field(default_factory=list)


@dataclass
class _Turn:
    role: str
    texts: list[str]
    images: list[ImageRef]
    index: int  # of its first message


def parse_messages(messages: list[Message]) -> Conversation:
    system: list[str] = []
    turns: list[_Turn] = []
    for i, m in enumerate(messages):
        texts, images = _content(m, i)
        if m.role in ("system", "developer"):
            if images:
                raise APIError(
                    400, f"messages[{i}]: a {m.role} message cannot contain images", param=f"messages[{i}]"
                )
            system.append("\n".join(texts))
            continue
        if m.role == "assistant" and images:
            raise APIError(
                400, f"messages[{i}]: an assistant message cannot contain images", param=f"messages[{i}]"
            )
        if turns and turns[-1].role == m.role:  # consecutive messages of one role read as one turn
            turns[-1].texts += texts
            turns[-1].images += images
        else:
            turns.append(_Turn(m.role, texts, images, i))
    if not turns or turns[-1].role != "user":
        raise APIError(
            400, "the last message must be a user message (the question to answer)", param="messages"
        )
    if turns[0].role == "assistant":  # an opening assistant greeting answers an empty user turn
        turns.insert(0, _Turn("user", [], [], turns[0].index))
    total = sum(len(t.images) for t in turns)
    users, seen = [], 0
    for t in turns[::2]:
        users.append(_place_images(t, seen, total))
        seen += len(t.images)
    history = [(u, "\n".join(a.texts)) for u, a in zip(users[:-1], turns[1::2])]
    return Conversation("\n".join(system) if system else None, history, users[-1],
                        [im for t in turns for im in t.images])  # fmt: skip


def _content(m: Message, i: int) -> tuple[list[str], list[ImageRef]]:
    if m.content is None:
        if m.role == "user":
            raise APIError(
                400, f"messages[{i}]: a user message needs content", param=f"messages[{i}].content"
            )
        return [], []
    if isinstance(m.content, str):
        return [m.content], []
    texts, images = [], []
    for j, part in enumerate(m.content):
        if isinstance(part, ImagePart):
            images.append(
                ImageRef(part.image_url.url, part.image_url.max_tiles(), f"messages[{i}].content[{j}]")
            )
        else:
            texts.append(part.text)
    return texts, images


def _place_images(turn: _Turn, first: int, total: int) -> str:
    text = "\n".join(turn.texts).replace(LMDEPLOY_PLACEHOLDER, IMAGE_PLACEHOLDER)
    written = text.count(IMAGE_PLACEHOLDER)
    n = len(turn.images)
    if written and written != n:
        raise APIError(400, f"messages[{turn.index}]: the text has {written} {IMAGE_PLACEHOLDER} placeholder(s) "
                            f"but the message has {n} image(s)", param=f"messages[{turn.index}].content")  # fmt: skip
    if written or not n:
        return text
    if total == 1:
        return IMAGE_PLACEHOLDER + "\n" + text
    return "".join(f"Image-{first + k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(n)) + text


def build_inputs(llm, conv: Conversation, images: list) -> tuple[list[int], torch.Tensor | None]:
    """Prompt ids and pixel values from the model's inputs room (processing/inputs.py), each decoded image
    tiled with its own cap."""
    inputs = llm.inputs(conv.question, images, history=conv.history, system_message=conv.system,
                        max_num=[ref.max_tiles for ref in conv.images], dtype=llm.model.dtype)  # fmt: skip
    return inputs.input_ids, inputs.pixel_values
