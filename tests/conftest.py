"""Fixtures shared by the test modules. Tiny models run fastest on one thread (no OpenMP hand-offs on a
2-core machine), so every test starts on one, whatever the test before it set (a training run sets its own)."""

import pytest
import torch
from datafiles import COLORS, A, Q, write_pairs, write_split
from PIL import Image


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For module-scoped fixtures (a server thread) that must start on one thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    """An SFT split of six images of one color each (the answer names it) and one text-only row."""
    root = tmp_path_factory.mktemp("ftdata")
    (root / "img").mkdir()
    rows = []
    for i, color in enumerate(["red", "green", "blue"] * 2):
        Image.new("RGB", (60 + 20 * i, 56), color).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "conversations": [Q, {"from": "gpt", "value": color}]})
    rows.append({"conversations": [Q, A]})
    return write_split(root, rows, meta_extra={"data_augment": True})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Images of one color; chosen names the color, rejected another one (plus one text-only pair)."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    rows = []
    for i, color in enumerate(COLORS * 2):
        Image.new("RGB", (56 + 8 * i, 56), color).save(root / "img" / f"{i}.png")
        wrong = COLORS[(i + 1) % 3]
        rows.append({"image": f"img/{i}.png", "question": "What color is it?", "chosen": f"It is {color}.",
                     "rejected": f"It is {wrong}."})  # fmt: skip
    rows.append({"question": "Count: 1 2 3", "chosen": "4 5 6", "rejected": "left right"})
    return write_pairs(root, rows)
