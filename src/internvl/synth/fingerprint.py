"""The generator's fingerprint: a hash of what decides a split's bytes (this package's source, the font files
render.py draws with, Pillow's and FreeType's versions), so that a cached split follows the generator."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

BUNDLED = "pillow-bundled"  # ImageFont.load_default(size): Pillow's own face, versioned with Pillow


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def generator_inputs(source_dir: Path | None = None) -> dict:
    """Everything a split's pixels and text depend on besides the seed: the source files of internvl.synth
    (`source_dir`, default this package), the fonts render.py picks from (the package's assets/fonts, by content)
    and the rasterizer's versions. Raqm's and HarfBuzz's too: without them (no libfribidi on the machine) Pillow
    lays text out itself and places most strings' glyphs differently."""
    import numpy
    import PIL
    from PIL import features

    from .render import font_files

    source = hashlib.sha256()
    for path in sorted((source_dir or Path(__file__).parent).glob("*.py")):
        source.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    fonts = [{"file": BUNDLED} if f is None else {"file": Path(f).name, "sha256": _sha256(Path(f))[:16]}
             for f in font_files()]  # fmt: skip
    layout = {
        name: features.version(name) if name in features.features else None for name in ("raqm", "harfbuzz")
    }
    return {"source": source.hexdigest()[:16], "fonts": fonts, "pillow": PIL.__version__,
            "freetype": features.version("freetype2"), **layout, "numpy": numpy.__version__}  # fmt: skip


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """12 hex digits of the hash of `generator_inputs()`."""
    text = json.dumps(generator_inputs(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
