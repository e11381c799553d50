"""benchmarks/bench_efficiency.py's accuracy half: a setting that a task's prompts refuse (a visual-token budget
below one tile per video frame) leaves that task out, names it, and scores the rest; with no task left the error still raises. 'vs plain'
is over the same tasks; --only picks settings by label."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_efficiency

from internvl.api import load
from internvl.errors import PromptError
from internvl.eval import synthetic_split


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
    summary, left_out = bench_efficiency.evaluate_fitting(model, split, tasks, args, tmp_path / "b", 1)
    assert left_out == [] and set(summary["tasks"]) == {"color", "video"}


def test_a_refusal_with_nothing_left_to_score_still_raises(model, tmp_path):
    split = synthetic_split("test", 2, ["video"], data_dir=None)
    model.use_efficiency(f"max_visual_tokens={4 * model.config.num_image_token}")
    try:
        with pytest.raises(PromptError, match="video/video_000000: max_visual_tokens=.* below one tile"):
            bench_efficiency.evaluate_fitting(
                model, split, ["video"], Namespace(n=2, batch_size=2), tmp_path, 1
            )
    finally:
        model.use_efficiency(None)


def test_vs_plain_is_over_the_tasks_the_setting_was_scored_on():
    plain = {"tasks": {"color": 0.5, "count": 0.3, "video": 0.9}}
    assert bench_efficiency.same_tasks(plain, {"left_out": ["video"]}, 0.57) == pytest.approx(0.4)
    assert bench_efficiency.same_tasks(plain, {"left_out": []}, 0.57) == 0.57


def test_only_picks_settings_by_label_and_names_the_unknown_ones():
    settings = [("plain", "plain", "off"), ("budget", "7 tiles", "max_visual_tokens=7")]
    assert bench_efficiency.chosen(settings, ["7 tiles"]) == [(1, settings[1])]
    assert bench_efficiency.chosen(settings, None) == list(enumerate(settings))
    with pytest.raises(SystemExit, match="no setting '7 tile'.*the settings: plain, 7 tiles"):
        bench_efficiency.chosen(settings, ["7 tile"])
