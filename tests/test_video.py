"""Video frame sampling (reference get_index) and PyAV decoding of small videos made in a temp dir."""

from __future__ import annotations

import av
import numpy as np
import pytest

from internvl.errors import VideoError
from internvl.processing import load_video, sample_frame_indices, video_info

STEP = 8  # frame i is a flat grey of level i*STEP, so a decoded frame tells which index it was


def reference_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """The model card's get_index, verbatim in behaviour (numpy rounding), to compare against."""
    start, end = (bound[0], bound[1]) if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


# Hand-computed with round-half-to-even, e.g. 40 frames: seg = 39/8 = 4.875, round(19.5) = 20 -> 0 + 2.4375 + 20.
CASES = [
    # (num_frames, fps, num_segments, bound, first_idx, expected)
    (40, 10, 8, None, 0, [2, 7, 12, 17, 22, 26, 31, 36]),
    (40, 10, 4, (1.0, 2.0), 0, [11, 13, 16, 19]),  # round(2.5) = 2, not 3
    (3, 30, 8, None, 0, [0, 0, 0, 1, 1, 1, 2, 2]),  # fewer frames than segments repeats frames
    (1, 25, 4, None, 0, [0, 0, 0, 0]),
    (40, 10, 4, None, 5, [9, 17, 26, 35]),
    (40, 10, 2, (3.0, 100.0), 0, [32, 36]),  # the end bound is clamped to the last frame
    (100, 29.97, 8, (0.5, 1.5), 0, [16, 20, 24, 27, 31, 35, 38, 42]),
    (30, 10, 8, None, 0, [1, 5, 8, 12, 15, 19, 23, 26]),
]


@pytest.mark.parametrize("n,fps,segs,bound,first,expected", CASES)
def test_sample_frame_indices_hand_computed(n, fps, segs, bound, first, expected):
    assert sample_frame_indices(n, fps, segs, bound, first) == expected
    assert reference_get_index(bound, fps, n - 1, first, segs) == expected


def test_sample_frame_indices_match_reference_formula_on_a_grid():
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 5000))
        fps = float(rng.choice([1.0, 8.0, 23.976, 25.0, 29.97, 30.0, 60.0]))
        segs = int(rng.integers(1, 65))
        bound = None
        if rng.random() < 0.5:
            a = float(rng.uniform(0, n / fps))
            bound = (a, a + float(rng.uniform(0.5, 60)))
        assert sample_frame_indices(n, fps, segs, bound) == reference_get_index(bound, fps, n - 1, 0, segs)


def test_sample_frame_indices_bad_arguments():
    with pytest.raises(
        VideoError, match=r"bound \(5\.0, 6\.0\) selects no frames: frames 50\.\.39 of a 40-frame"
    ):
        sample_frame_indices(40, 10, 4, (5.0, 6.0))
    with pytest.raises(VideoError, match="with 0 frames"):
        sample_frame_indices(0, 10)
    with pytest.raises(VideoError, match="num_segments must be at least 1"):
        sample_frame_indices(10, 10, 0)
    with pytest.raises(VideoError, match="fps must be positive"):
        sample_frame_indices(10, 0.0)


# ---- decoding -------------------------------------------------------------------------------------------


def _write_video(path, codec: str, n: int = 30, fps: int = 10, size=(64, 48), **options) -> None:
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"g": "1"}  # every frame a keyframe, so a truncated file still decodes up to the cut
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(
                np.full((size[1], size[0], 3), i * STEP, np.uint8), format="rgb24"
            )
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def _index_of(frame) -> int:
    return round(float(np.asarray(frame).mean()) / STEP)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    _write_video(path, "libx264" if "libx264" in av.codecs_available else "mpeg4")
    return path


def test_decode_mp4_samples_the_reference_frames(mp4):
    assert video_info(mp4) == (30, 10.0, (64, 48))
    frames = load_video(mp4, num_segments=8)
    assert len(frames) == 8
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert [_index_of(f) for f in frames] == [1, 5, 8, 12, 15, 19, 23, 26]
    assert [_index_of(f) for f in load_video(mp4, num_segments=4, bound=(1.0, 2.0))] == [11, 13, 16, 19]


def test_decode_counts_frames_when_the_container_does_not(tmp_path):
    codec = "libvpx-vp9" if "libvpx-vp9" in av.codecs_available else "libvpx"
    if codec not in av.codecs_available:
        pytest.skip("no VP8/VP9 encoder in this PyAV build")
    path = tmp_path / "clip.webm"
    _write_video(path, codec)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # WebM records no frame count
    assert video_info(path)[0] == 30
    assert [_index_of(f) for f in load_video(path, num_segments=8)] == [1, 5, 8, 12, 15, 19, 23, 26]


def test_bad_videos(tmp_path, mp4):
    with pytest.raises(VideoError, match=r"missing\.mp4: no such file"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4: empty file"):
        load_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 definitely not a video " * 40)
    with pytest.raises(VideoError, match=r"junk\.mp4: cannot open video"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(
        VideoError, match=r"clip\.mp4: frames are 64x48 = 3072 pixels, above the limit of 1000"
    ):
        load_video(mp4, max_pixels=1000)
    with pytest.raises(VideoError, match=r"selects no frames"):
        load_video(mp4, bound=(10.0, 20.0))


def test_truncated_video_with_overstated_frame_count_resamples(tmp_path):
    if "libx264" not in av.codecs_available:
        pytest.skip("no H.264 encoder in this PyAV build")
    full = tmp_path / "full.mp4"
    _write_video(full, "libx264", movflags="faststart")  # index first: a cut file still opens
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == 30  # the index still claims every frame
    indices = [_index_of(f) for f in load_video(cut, num_segments=8)]
    assert len(indices) == 8 and indices == sorted(indices) and indices[-1] < 27  # spread over what exists


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*s.encode(frame), *s.encode()]:
            c.mux(packet)
    with pytest.raises(VideoError, match=r"tone\.wav: no video stream"):
        load_video(path)
