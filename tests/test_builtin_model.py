"""The shipped built-in model (src/internvl/assets/nano): what every command uses when no model is given.
It loads through the same code as official checkpoints and still scores what `nano ship` measured."""

import json
from pathlib import Path

import internvl
from internvl.api import BUILTIN
from internvl.checkpoint.layouts import read_config
from internvl.nano import ship

ROOT = Path(__file__).resolve().parents[1]
INFO = json.loads((BUILTIN / "training.json").read_text())


def test_the_built_in_model_is_an_original_layout_checkpoint_under_60_mb():
    raw = json.loads((BUILTIN / "config.json").read_text())
    assert "vision_config" in raw and "llm_config" in raw  # the internvl_chat layout
    read_config(BUILTIN / "config.json")
    size = sum(f.stat().st_size for f in BUILTIN.iterdir())
    assert size <= 60 * 2**20, size
    assert INFO["stage"] and INFO["step"] > 0 and INFO["test_split"]["accuracy_percent"]


def test_it_is_the_default_model():
    assert internvl.api.default_model_path() == BUILTIN
    model = internvl.load()
    answer = model.chat("How many circles are there?", str(ROOT / "examples" / "circles.png"), max_new_tokens=8)
    assert answer.strip() == "5", answer  # the README's quick start: examples/circles.png holds 5 circles


def test_it_still_answers_the_fixed_check_items_as_when_shipped(tmp_path):
    """Every task's right answers on the seeded check items, as `nano ship` recorded them (one item of slack
    per task for rounding differences between CPU kernels)."""
    check = INFO["check"]
    got = ship.check(BUILTIN, tmp_path, check["split"], check["n"])
    assert set(got) == set(check["correct"])
    worse = {t: (got[t], k) for t, k in check["correct"].items() if got[t] < k - 1}
    assert not worse, f"right answers (now, when shipped): {worse}"
    assert sum(got.values()) >= sum(check["correct"].values()) - 3
