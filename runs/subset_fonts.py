"""Writes src/internvl/assets/fonts/ from the system's DejaVu 2.37 and Liberation 1.07 faces (one-off; needs
fonttools, which is not a dependency of the package). Render.py's faces, in its order (issue 14).
    python runs/subset_fonts.py [--src /usr/share/fonts/truetype] [--out src/internvl/assets/fonts]

DejaVu faces are cut down to printable ASCII, keeping hinting, kerning and every layout feature so FreeType
draws the same pixels (the Bitstream Vera terms allow modified copies whose name has no "Bitstream" or "Vera").
Liberation 1.07 faces are copied byte for byte: its terms (GPLv2 with a font exception, and Red Hat's
trademark clause) ask modified copies to drop the "Liberation" name, so they are not modified at all."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from internvl.synth.render import FONT_FACES

CHARS = "".join(chr(c) for c in range(0x20, 0x7F))  # the generator draws A-Z and 0-9 only; ASCII leaves room


def subset(src: Path, dst: Path) -> None:
    from fontTools import subset as ft

    options = ft.Options()
    options.hinting = True  # glyph programs; fpgm, prep and cvt are kept whole
    options.legacy_kern = True  # the 'kern' table: FreeType's kerning without raqm
    options.layout_features = ["*"]  # GSUB/GPOS as raqm/HarfBuzz shapes with them
    options.notdef_outline = True
    options.glyph_names = True
    options.name_IDs = ["*"]  # copyright, licence and trademark notices stay in the file
    options.name_languages = ["*"]
    options.recalc_bounds = False  # head and glyph boxes as the original's
    font = ft.load_font(str(src), options)
    sub = ft.Subsetter(options)
    sub.populate(text=CHARS)
    sub.subset(font)
    ft.save_font(font, str(dst), options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("/usr/share/fonts/truetype"))
    parser.add_argument("--out", type=Path, default=ROOT / "src/internvl/assets/fonts")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in FONT_FACES:
        family = "dejavu" if name.startswith("DejaVu") else "liberation"
        src, dst = args.src / family / name, args.out / name
        if family == "dejavu":
            subset(src, dst)
        else:
            shutil.copyfile(src, dst)
        total += dst.stat().st_size
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        print(
            f"{name:40s} {src.stat().st_size:8d} -> {dst.stat().st_size:7d} bytes  (source sha256 {digest})"
        )
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
