"""Motion clips: 4-8 frames in which one object moves >= 30% of the canvas and the others stay still.

Clips are stored as PNG frames (a multi-image conversation); `write_mp4` also encodes one for demos.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image

from .questions import Turn
from .render import draw_object, render_scene
from .scene import (
    COLOR_NAMES,
    COLORS,
    MARGIN,
    MAX_ANGLE,
    Obj,
    Scene,
    extent,
    fill,
    jitter,
    new_scene,
    shape_pool,
)

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MIN_TRAVEL = 0.30  # fraction of the canvas along the direction of motion


@dataclass
class Clip:
    scene: Scene  # the static objects
    mover: Obj  # the moving object, with its first-frame box
    boxes: list[tuple[int, int, int, int]]  # the mover's box in every frame
    direction: str


def sample_clip(
    rng: random.Random, shape: str, color: str, hexagon: bool, n_frames: int | None = None
) -> Clip | None:
    """A clip where the `color` `shape` moves in a random direction; None when the layout failed."""
    n_frames = n_frames or rng.randint(4, 8)
    direction = rng.choice(tuple(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    n_static = rng.randint(0, 4)
    scene = new_scene(rng, n_static + 2)
    angle = rng.uniform(-MAX_ANGLE[shape], MAX_ANGLE[shape])
    lo, hi = scene.side_range(shape, angle)
    ew, eh = extent(shape, angle)
    side = rng.randint(lo, hi)
    w, h = round(side * ew / max(ew, eh)), round(side * eh / max(ew, eh))
    dim, size = (scene.width, w) if dx else (scene.height, h)
    room = dim - 2 * MARGIN - size  # the farthest the box can travel inside the canvas
    travel = round(rng.uniform(MIN_TRAVEL, min(0.6, room / dim)) * dim)
    if travel < MIN_TRAVEL * dim or travel > room:
        return None
    # The swept box (start to end) is reserved so that the mover never touches a static object.
    sw, sh = w + abs(dx) * travel, h + abs(dy) * travel
    swept = scene.free_box(rng, sw, sh)
    if swept is None:
        return None
    scene.reserved.append(swept)
    x0 = swept[0] + (travel if dx < 0 else 0)
    y0 = swept[1] + (travel if dy < 0 else 0)
    boxes = []
    for i in range(n_frames):
        step = round(travel * i / (n_frames - 1))
        x, y = x0 + dx * step, y0 + dy * step
        boxes.append((x, y, x + w, y + h))
    mover = Obj(shape, color, jitter(rng, COLORS[color]), angle, boxes[0])
    if not fill(scene, rng, n_static, shape_pool(hexagon), COLOR_NAMES, avoid=((color, shape),)):
        return None
    return Clip(scene, mover, boxes, direction)


def ask_direction(clip: Clip) -> Turn:
    frames = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(clip.boxes)))
    m = clip.mover
    return Turn(
        "video",
        f"{frames}In which direction is the {m.color} {m.shape} moving?",
        clip.direction,
        {"target": [m.color, m.shape], "frames": len(clip.boxes), "boxes": [list(b) for b in clip.boxes]},
    )


def render_clip(clip: Clip) -> list[Image.Image]:
    base = render_scene(clip.scene)  # static part drawn once, the mover pasted per frame
    frames = []
    for box in clip.boxes:
        img = base.copy()
        draw_object(img, replace(clip.mover, box=box), clip.scene.aa)
        frames.append(img)
    return frames


def write_mp4(frames: list[Image.Image], path: str, fps: int = 4) -> None:
    """Encode frames as an H.264 (or MPEG-4 part 2) .mp4 with PyAV, for demos and the video reader."""
    import av

    w, h = frames[0].size
    w, h = w - w % 2, h - h % 2  # yuv420p needs even sizes
    with av.open(path, mode="w") as out:
        try:
            stream = out.add_stream("libx264", rate=fps)
        except ValueError:  # UnknownCodecError: PyAV built without x264, use the always-present mpeg4
            stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in frames:
            frame = av.VideoFrame.from_image(img.crop((0, 0, w, h)))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
