"""A benchmark question (`EvalItem`) and its images (`ImageSource`): base64 payloads or files, decoded only
when asked, as VLMEvalKit decodes and dumps them (`vlmeval/smp/vlm.py`).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from internvl.errors import DataError, ImageError
from internvl.processing.image import DEFAULT_MAX_PIXELS, open_image


def _reason(exc: ImageError, name: str) -> str:
    """An `ImageError`'s message without its leading `name: `."""
    return str(exc).removeprefix(f"{name}: ")


def decode_base64_image(data: str, where: str = "image") -> Image.Image:
    """Decode a base64 image to PIL; palette and alpha modes become RGB, as VLMEvalKit's decoder does. Images
    above `DEFAULT_MAX_PIXELS` (decompression bombs) are refused from their header, before decoding."""
    try:
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{where}: not a decodable base64 image ({exc})") from None
    try:
        image = open_image(io.BytesIO(raw), where, DEFAULT_MAX_PIXELS)
    except ImageError as exc:
        raise DataError(f"{where}: not a decodable base64 image ({_reason(exc, where)})") from None
    if image.mode in ("RGBA", "P", "LA"):
        image = image.convert("RGB")
    return image


@dataclass(frozen=True)
class ImageSource:
    """One image of an item: a base64 payload or a file path, decoded only when `load` is called."""

    data: str | None = field(default=None, repr=False)
    path: str | None = None
    name: str | None = None  # the `image_path` entry: the file name VLMEvalKit dumps this image to
    where: str = "image"  # file, row and column, for error messages

    @classmethod
    def from_image(cls, image: Image.Image, fmt: str = "PNG") -> ImageSource:
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return cls(data=base64.b64encode(buf.getvalue()).decode("ascii"))

    def to_base64(self) -> str:
        if self.data is not None:
            return self.data
        return base64.b64encode(Path(self.path).read_bytes()).decode("ascii")

    def load(self) -> Image.Image:
        """The decoded image: what VLMEvalKit's model sees after its lossless PNG dump (since February 2026)."""
        if self.data is not None:
            return decode_base64_image(self.data, self.where)
        try:
            with open(self.path, "rb") as f:
                return open_image(f, self.path, DEFAULT_MAX_PIXELS)
        except ImageError as exc:
            raise DataError(f"{self.where}: cannot read image file {self.path!r} "
                            f"({_reason(exc, self.path)})") from None
        except OSError as exc:
            raise DataError(f"{self.where}: cannot read image file {self.path!r} ({exc.strerror or exc})") from None


@dataclass
class EvalItem:
    """One benchmark question. `options` maps letters to text in letter order; `raw` is the row as read."""

    index: int | str
    question: str
    options: dict[str, str] = field(default_factory=dict)
    answer: str | None = None
    hint: str | None = None
    category: str | None = None
    l2_category: str | None = None
    split: str | None = None
    images: list[ImageSource] = field(default_factory=list)
    g_index: int | str | None = None  # circular group: the index of the unrotated question
    raw: dict[str, str | None] = field(default_factory=dict, repr=False)



def dump_images(item: EvalItem, root: str | Path) -> list[Path]:
    """Write an item's images where VLMEvalKit's `dump_image` puts them: `<root>/<image_path name>` when the row
    names its files, else `<root>/<index>.png` for one image and `<root>/<index>_<k>.png` for several; existing
    files are kept. Path images are returned as they are."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for k, src in enumerate(item.images):
        if src.data is None:
            out.append(Path(src.path))
            continue
        default = f"{item.index}.png" if len(item.images) == 1 else f"{item.index}_{k}.png"
        target = root / (src.name or default)
        if not target.exists():
            src.load().save(target)
        out.append(target)
    return out
