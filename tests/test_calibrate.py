"""`internvl calibrate` (eval/calibrate.py): schedules that never increase with depth, within the cost budget,
the same files for the same seed, a head mask the model loads; the CLI verb writes what load() takes."""

from __future__ import annotations

import json

import pytest
import torch
from refmodels import tiny_checkpoint

import internvl
from internvl.cli.main import main
from internvl.eval.calibrate import cost, head_mask, sigmoid
from internvl.model.prune import load_schedule
from internvl.model.yopo import load_head_mask
from internvl.synth import generate_split


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    model = tiny_checkpoint(root / "model")
    generate_split(str(root / "val"), "val", n=2, tasks=["color", "count"])
    return root, model


def run_cli(root, model, name: str, *extra: str) -> dict:
    out = root / name
    # the tiny model: ~200 prompt tokens of which 4 visual, so a keep schedule saves at most 1% of the rows
    args = ["calibrate", str(model), "--data-dir", str(root / "val"), "--tasks", "color,count", "--rows", "3",
            "--max-num", "1", "--out", str(out / "schedule.json"), "--head-mask", str(out / "heads.json"), *extra]
    assert main(args) == 0
    return {f.name: f.read_text() for f in sorted(out.iterdir())}


def test_calibration_is_deterministic_per_seed_and_loads(setup, capsys):
    root, model = setup
    first = run_cli(root, model, "a", "--method", "p-sigmoid", "--budget", "0.999", "--trials", "3", "--prune-heads", "2")
    again = run_cli(root, model, "b", "--method", "p-sigmoid", "--budget", "0.999", "--trials", "3", "--prune-heads", "2")
    assert first == again
    doc = json.loads(first["schedule.json"])
    keep = doc["keep"]
    assert keep[0] == 1.0 and keep == sorted(keep, reverse=True)
    assert doc["cost"] <= 0.999 + 1e-6 and doc["method"] == "p-sigmoid"
    kept = load_head_mask(root / "a" / "heads.json", 2, 4)
    assert bool(kept.all())  # YOPO keeps the first two layers' heads: the tiny model has only those
    assert len(json.loads(first["heads.json"])["mean_ratio"]) == 2  # the statistics, the same for the seed
    llm = internvl.load(model, efficiency=f"schedule={root / 'a' / 'schedule.json'}")
    assert load_schedule(root / "a" / "schedule.json", 2) == keep
    assert llm.chat("<image>\nWhat color is it?", [str(next((root / "val" / "images").iterdir()))],
                    max_new_tokens=3) is not None  # fmt: skip


def test_g_search_keeps_the_loss_within_tolerance(setup):
    root, model = setup
    out = run_cli(root, model, "g", "--method", "g-search", "--tolerance", "0.5", "--step", "0.5")
    doc = json.loads(out["schedule.json"])
    assert doc["loss"] <= doc["baseline_loss"] + 0.5 + 1e-9
    assert all(r in (0.0, 0.5, 1.0) for r in doc["keep"])


def test_sigmoid_and_head_mask_rules():
    keep = sigmoid(2.0, 3.0, 0.25, 8)
    assert keep[0] == 1.0 and keep == sorted(keep, reverse=True) and min(keep) >= 0.25
    ratios = torch.tensor([[[1.0, 0.1, 0.5], [0.3, 0.01, 0.9], [0.05, 0.5, 0.02]]] * 5)  # 5 rows, 3 layers, 3 heads
    assert head_mask(ratios, prune=2, keep_first=1).tolist() == [[True] * 3, [True, False, True], [True, True, False]]
    assert head_mask(ratios, tau=0.1, keep_first=1).tolist() == [[True] * 3, [True, False, True], [False, True, False]]


def test_cost_counts_text_fully_and_visual_by_keep():
    class R:
        def __init__(self, t, v):
            self.ids, self.visual = torch.zeros(1, t), v

    assert cost([1.0, 0.5], [R(10, 8)]) == pytest.approx((10 + 6) / 20)
