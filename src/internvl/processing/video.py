"""Video frame sampling and decoding (PyAV): the reference `get_index` / `load_video` of the InternVL model cards.

Each sampled frame is later tiled by the caller with max_num=1 (one 448 tile per frame).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import av
from PIL import Image

from ..errors import VideoError
from .image import DEFAULT_MAX_PIXELS

# The reference's "no bound" is a window of +-1e5 seconds, clamped to the video by the min/max below.
_NO_BOUND = (-100000, 100000)


def sample_frame_indices(
    num_frames: int,
    fps: float,
    num_segments: int = 8,
    bound: Sequence[float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """Middle frame of each of `num_segments` equal segments of [start, end] (seconds), as the reference:
    idx_k = int(s + seg/2 + round(seg*k)) with s, e the clamped frame bounds and seg = (e - s)/num_segments.

    Python's round() is round-half-to-even like the reference's np.round / round, so indices agree exactly.
    """
    if num_frames < 1:
        raise VideoError(f"cannot sample frames from a video with {num_frames} frames")
    if num_segments < 1:
        raise VideoError(f"num_segments must be at least 1, got {num_segments}")
    if not fps > 0:
        raise VideoError(f"fps must be positive, got {fps}")
    start, end = (bound[0], bound[1]) if bound else _NO_BOUND
    max_frame = num_frames - 1
    s = max(first_idx, round(start * fps))
    e = min(round(end * fps), max_frame)
    if s > e:
        raise VideoError(
            f"bound {tuple(bound) if bound else None} selects no frames: frames {s}..{e} of a "
            f"{num_frames}-frame video at {fps:g} fps"
        )
    seg = float(e - s) / num_segments
    return [int(s + seg / 2 + round(seg * k)) for k in range(num_segments)]


def _open(path: str | os.PathLike[str]) -> Any:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise VideoError(f"{name}: no such file")
    if os.path.getsize(name) == 0:
        raise VideoError(f"{name}: empty file (0 bytes)")
    try:
        return av.open(name)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{name}: cannot open video ({e})") from None


def _probe(name: str) -> tuple[int, float, tuple[int, int]]:
    """(frame count recorded by the container, 0 if none; average fps, 0 if none; (width, height))."""
    with _open(name) as container:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return (
            stream.frames,
            float(rate) if rate else 0.0,
            (stream.codec_context.width, stream.codec_context.height),
        )


def _scan(name: str, wanted: set[int] | None) -> tuple[dict[int, Image.Image], int]:
    """One decoding pass over a freshly opened container (no seeking, which some streams cannot do).

    Frames are numbered in presentation order, as decord does; those in `wanted` are converted to RGB and the
    pass stops after the last of them. With wanted=None every frame is decoded, only to count them.
    Returns the converted frames and the number of frames decoded.
    """
    last = max(wanted) if wanted else None
    found: dict[int, Image.Image] = {}
    n = 0
    with _open(name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-threaded decoding; output order is unchanged
        try:
            for frame in container.decode(stream):
                if wanted is not None and n in wanted:
                    found[n] = frame.to_image()  # RGB24
                n += 1
                if last is not None and n > last:
                    break
        except (av.FFmpegError, ValueError) as e:
            raise VideoError(f"{name}: cannot decode video at frame {n} ({e})") from None
    return found, n


def read_frames(path: str | os.PathLike[str], indices: list[int]) -> list[Image.Image]:
    """The frames at `indices` (presentation order, repeats allowed) as RGB images, in one decoding pass."""
    name = os.fspath(path)
    found, decoded = _scan(name, set(indices))
    if len(found) < len(set(indices)):
        raise VideoError(f"{name}: only {decoded} frames could be decoded, frame {max(indices)} was wanted")
    return [found[i] for i in indices]


def video_info(path: str | os.PathLike[str]) -> tuple[int, float, tuple[int, int]]:
    """(frame count, average fps, (width, height)) of the first video stream; counts by decoding when the
    container does not record the number of frames (WebM, MKV, some streams)."""
    name = os.fspath(path)
    n, fps, size = _probe(name)
    return n or _scan(name, None)[1], fps, size


def probe_video(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                ) -> tuple[int, float, tuple[int, int]]:  # fmt: skip
    """(recorded frame count or 0, fps or 0, (width, height)) from the container's header, decoding nothing;
    a missing, empty or unreadable file, one without a video stream, or frames above `max_pixels` raise
    `VideoError`."""
    name = os.fspath(path)
    n, fps, (w, h) = _probe(name)
    if max_pixels is not None and w * h > max_pixels:
        raise VideoError(
            f"{name}: frames are {w}x{h} = {w * h} pixels, above the limit of {max_pixels} (max_pixels)"
        )
    return n, fps, (w, h)


def load_video(
    path: str | os.PathLike[str],
    num_segments: int = 8,
    bound: Sequence[float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Image.Image]:
    """`num_segments` RGB frames sampled as the reference `load_video` (decord) does, decoded with PyAV.

    `bound` is (start_s, end_s). A missing, empty, unreadable or frameless video raises `VideoError`.
    """
    name = os.fspath(path)
    n, fps, _ = probe_video(name, max_pixels)
    if fps <= 0:
        if bound:
            raise VideoError(f"{name}: the video has no frame rate, so a time bound cannot be applied")
        fps = 1.0  # without a bound the fps only scales the +-1e5 s window, which any rate still covers
    n = n or _scan(name, None)[1]
    if n == 0:
        raise VideoError(f"{name}: the video has no frames")
    indices = sample_frame_indices(n, fps, num_segments, bound)
    found, decoded = _scan(name, set(indices))
    if len(found) < len(set(indices)):
        # The container over-reported its frame count (e.g. a truncated file): resample over the real frames.
        if decoded == 0:
            raise VideoError(f"{name}: no frame could be decoded")
        indices = sample_frame_indices(decoded, fps, num_segments, bound)
        found, _ = _scan(name, set(indices))
    return [found[i] for i in indices]
