"""benchmarks/bench_efficiency.py's accuracy half: a setting that a task's prompts refuse (a visual-token budget
below one tile per video frame) leaves that task out, names it, and scores the rest; other errors still raise."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_efficiency  # noqa: E402

from internvl.api import load  # noqa: E402
from internvl.eval import synthetic_split  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load(None, device="cpu")


def test_budget_below_one_tile_per_frame_leaves_the_video_task_out(model, tmp_path):
    tasks = ["color", "video"]
    split = synthetic_split("test", 2, tasks, data_dir=None)
    args = Namespace(n=2, batch_size=2)
    tile = model.config.num_image_token
    model.use_efficiency(f"max_visual_tokens={4 * tile}")  # 8 video frames need 8 tiles
    try:
        summary, left_out = bench_efficiency.evaluate_fitting(model, split, tasks, args, tmp_path / "a", 1)
    finally:
        model.use_efficiency(None)
    assert left_out == ["video"]
    assert set(summary["tasks"]) == {"color"}
    model.use_efficiency(None)
    summary, left_out = bench_efficiency.evaluate_fitting(model, split, tasks, args, tmp_path / "b", 1)
    assert left_out == [] and set(summary["tasks"]) == {"color", "video"}
