"""The generator's fonts ship with the package (issue 14): render.py draws only with assets/fonts/, every drawn
character is a real glyph of every face, and the cut-down faces draw the same pixels as the released files."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from internvl.synth import render
from internvl.synth.builders import BUILDERS, OCR_CHARS
from internvl.synth.chart import render_chart, sample_chart
from internvl.synth.render import FONT_DIR, FONT_FACES, font_files

SYSTEM = Path("/usr/share/fonts/truetype")


def _system_file(name: str) -> Path:
    return SYSTEM / ("dejavu" if name.startswith("DejaVu") else "liberation") / name


def _face_draws(n_faces: int) -> list[float]:
    """One font draw (`font_u`) per entry of font_files(), the bundled face first."""
    return [(i + 0.5) / n_faces for i in range(n_faces)]


def _renders() -> list[np.ndarray]:
    """An OCR scene and a chart with tick numbers in each face: every character the generator draws."""
    scene = BUILDERS["ocr"](random.Random(10), False)[0]  # 7 characters, cap height 23 px
    k = len(scene.text.text)
    chart = dataclasses.replace(sample_chart(random.Random(4), [3, 9, 1, 6, 5]), ticks=True)
    out = []
    for u in _face_draws(len(font_files())):
        for text in [OCR_CHARS[i : i + k] for i in range(0, len(OCR_CHARS), k)]:
            scene.text = dataclasses.replace(scene.text, text=text, font_u=u)
            out.append(np.asarray(render.render_scene(scene)))
        out.append(np.asarray(render_chart(dataclasses.replace(chart, font_u=u))))
    return out


def test_font_files_are_the_packaged_faces_in_order():
    files = font_files()
    assert files[0] is None and len(files) == 1 + len(FONT_FACES) == 25
    assert [Path(f).name for f in files[1:]] == list(FONT_FACES)
    assert all(Path(f).parent == FONT_DIR and Path(f).is_file() for f in files[1:])
    assert (FONT_DIR / "LICENSE-DejaVu.txt").is_file() and (FONT_DIR / "LICENSE-Liberation.txt").is_file()
    assert sum(Path(f).stat().st_size for f in files[1:]) < 2_000_000


def test_every_drawn_character_is_a_glyph_of_every_face():
    # a character a face lacks is drawn as its .notdef box, the same ink for any missing character
    for path in font_files()[1:]:
        font = render._font(path, 24)
        inks = {}
        for ch in OCR_CHARS + "\U0001f600":
            img = Image.new("L", (40, 40), 0)
            ImageDraw.Draw(img).text((8, 30), ch, font=font, fill=255, anchor="ls")
            inks[ch] = np.asarray(img).tobytes()
        notdef = inks.pop("\U0001f600")
        assert all(ink != notdef and any(ink) for ink in inks.values()), Path(path).name


def test_packaged_faces_draw_what_the_released_files_draw(monkeypatch):
    if not all(_system_file(name).is_file() for name in FONT_FACES):
        pytest.skip("the released DejaVu 2.37 and Liberation 1.07 files are not in /usr/share/fonts")
    packaged = _renders()
    system = (None,) + tuple(str(_system_file(name)) for name in FONT_FACES)
    monkeypatch.setattr(render, "font_files", lambda: system)
    released = _renders()
    per_face = len(packaged) // 25
    assert len(packaged) == len(released) == 25 * per_face
    for i, (a, b) in enumerate(zip(packaged, released)):
        assert np.array_equal(a, b), f"face {system[i // per_face]}, render {i % per_face}: pixels differ"


def test_the_fingerprint_follows_the_text_layout_engine(monkeypatch):
    # without raqm (no libfribidi) Pillow lays the faces out itself: another split, never a reused one
    from PIL import features

    from internvl.synth import fingerprint

    inputs, version = fingerprint.generator_inputs(), features.version
    monkeypatch.setattr(
        features, "version", lambda name: None if name in ("raqm", "harfbuzz") else version(name)
    )
    other = fingerprint.generator_inputs()
    assert other["raqm"] is None and (inputs["raqm"] is None or other != inputs)
