"""Reference fine-tuning data: the meta JSON, lazily read JSONL annotations, and row validation.

Meta JSON: `{name: {root, annotation, data_augment, repeat_time, length, [max_dynamic_patch]}}`; a relative
`root` or `annotation` is resolved against the meta file's directory; any other key is refused (a typo
would otherwise be ignored silently). Each annotation is scanned once to
record the byte offset of every line and to validate every row; rows are read later by seeking, so a large
file is never held in memory, nor is a line longer than `MAX_ROW_BYTES`. Every error names `file:line`.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

ROLES = ("human", "gpt", "system")
IMAGE, VIDEO = "<image>", "<video>"
MAX_ROW_BYTES = 16 << 20  # one annotation line; far beyond any conversation that fits a context window
META_KEYS = ("root", "annotation", "data_augment", "repeat_time", "length", "max_dynamic_patch")


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of the meta file."""

    name: str
    root: str
    annotation: str
    data_augment: bool = False
    repeat_time: float = 1.0
    length: int | None = None
    max_dynamic_patch: int | None = None


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, with where and why."""

    source: str  # "file:line"
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def display_path(path: str | os.PathLike[str]) -> str:
    """`path` relative to the working directory when it lies below it (short messages), else absolute."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else os.path.abspath(path)


def read_meta(path: str | os.PathLike[str]) -> list[DatasetSpec]:
    """Parse and check a meta JSON file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{display_path(path)}: no such meta file")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{display_path(path)}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError(
            f"{display_path(path)}: expected a non-empty object {{name: {{root, annotation, ...}}}}"
        )
    base = path.parent
    specs = []
    for name, entry in meta.items():
        where = f"{display_path(path)}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        for key in entry:
            if key not in META_KEYS:
                close = difflib.get_close_matches(str(key), META_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(META_KEYS)})"
                raise DataError(f"{where}: unknown key {key!r}{hint}")
        for key in ("root", "annotation"):
            if not isinstance(entry.get(key), str):
                raise DataError(f"{where}: missing the string key {key!r}")
            if entry[key].startswith("s3://"):
                raise DataError(f"{where}: {key} {entry[key]!r}: object storage (s3://) is not supported")
        annotation = str(base / entry["annotation"])
        if not annotation.endswith(".jsonl"):
            raise DataError(f"{where}: annotation must be a .jsonl file, got {entry['annotation']!r}")
        if not os.path.isfile(annotation):
            raise DataError(f"{where}: annotation {display_path(annotation)} does not exist")
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or repeat <= 0:
            raise DataError(f"{where}: repeat_time must be a positive number, got {repeat!r}")
        if repeat > 1 and float(repeat) != int(repeat):
            raise DataError(f"{where}: repeat_time above 1 must be a whole number, got {repeat!r}")
        mdp = entry.get("max_dynamic_patch")
        if mdp is not None and (not isinstance(mdp, int) or mdp < 1):
            raise DataError(f"{where}: max_dynamic_patch must be a positive integer, got {mdp!r}")
        spec = DatasetSpec(name=name, root=str(base / entry["root"]), annotation=annotation,
                           data_augment=bool(entry.get("data_augment", False)), repeat_time=float(repeat),
                           length=entry.get("length"), max_dynamic_patch=mdp)  # fmt: skip
        specs.append(spec)
    return specs


def media_path(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def human_count(turns: list[dict], token: str) -> int:
    return sum(t["value"].count(token) for t in turns if t["from"] == "human")


def check_row(item: Any, root: str, check_files: bool = True) -> str | None:
    """Why a parsed row cannot be trained on, or None. Checks structure, media files and placeholders."""
    if not isinstance(item, dict):
        return f"a row must be a JSON object, got {type(item).__name__}"
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "empty conversation: 'conversations' must be a non-empty list"
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            return f"turn {k}: expected {{'from': ..., 'value': <string>}}"
        if t.get("from") not in ROLES:
            return f"turn {k}: 'from' must be one of {list(ROLES)}, got {t.get('from')!r}"
        if t["from"] == "system" and k != 0:
            return f"turn {k}: a system turn may only come first"
    if not any(t["from"] == "gpt" for t in turns):
        return "no assistant turn: the conversation needs at least one {'from': 'gpt'} turn"
    image, video = item.get("image"), item.get("video")
    has_image = image is not None and image != [] and image != ""
    has_video = video is not None and video != ""
    if has_image and has_video:
        return "a row has either 'image' or 'video', not both"
    if (has_image or has_video) and not any(t["from"] == "human" for t in turns):
        return "a row with media needs a {'from': 'human'} turn for its placeholders"
    n_image, n_video = human_count(turns, IMAGE), human_count(turns, VIDEO)
    if has_image:
        paths = [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            return "'image' must be a path or a list of paths"
        if n_video:
            return f"{VIDEO} placeholder in a row without a video"
        if isinstance(image, str) and n_image > 1:
            return f"the conversation has {n_image} {IMAGE} placeholders but the row has 1 image"
        if isinstance(image, list) and n_image != len(paths):
            return (
                f"the conversation has {n_image} {IMAGE} placeholder(s) but the row has {len(paths)} images"
            )
        if check_files:
            for p in paths:
                if not os.path.isfile(media_path(root, p)):
                    return f"missing image file {display_path(media_path(root, p))}"
    elif has_video:
        if not isinstance(video, str):
            return "'video' must be a path (a video file or a folder of frames)"
        if n_image:
            return f"{IMAGE} placeholder in a video row: the frames replace {VIDEO}"
        if n_video > 1:
            return f"the conversation has {n_video} {VIDEO} placeholders; a row has one video"
        clip = item.get("clip")
        if clip is not None and not (
            isinstance(clip, list) and len(clip) == 2 and all(isinstance(c, (int, float)) for c in clip)
            and 0 <= clip[0] < clip[1]
        ):  # fmt: skip
            return f"'clip' must be [start_s, end_s] with 0 <= start < end, got {clip!r}"
        if check_files and not os.path.exists(media_path(root, video)):
            return f"missing video {display_path(media_path(root, video))}"
    elif n_image or n_video:
        return f"{IMAGE if n_image else VIDEO} placeholder in a row without media"
    return None


class RowIndex:
    """The usable rows of all datasets, repeats included: (dataset, line number, byte offset) per row."""

    def __init__(self, specs: list[DatasetSpec], ds: np.ndarray, line: np.ndarray, offset: np.ndarray,
                 bad: list[BadRow]):  # fmt: skip
        self.specs = specs
        self.ds, self.line, self.offset = ds, line, offset
        self.bad = bad
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.ds)

    def source(self, i: int) -> str:
        return f"{display_path(self.specs[self.ds[i]].annotation)}:{self.line[i]}"

    def read(self, i: int) -> tuple[dict, DatasetSpec, str]:
        """Row `i` parsed, its dataset and its `file:line`."""
        d = int(self.ds[i])
        if self._pid != os.getpid():  # a forked data-loader worker: open its own file handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(d)
        if f is None:
            f = self._files[d] = open(self.specs[d].annotation, "rb")  # noqa: SIM115 (kept open for seeks)
        f.seek(int(self.offset[i]))
        return json.loads(f.readline()), self.specs[d], self.source(i)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


def build_index(specs: list[DatasetSpec], skip_bad_rows: bool = False, check_files: bool = True,
                progress: bool = False, check=None, what: str = "rows") -> RowIndex:  # fmt: skip
    """Scan every annotation once: line offsets plus validation. Raises `DataError` naming `file:line` for
    the first bad row, or with `skip_bad_rows` leaves bad rows out and lists them in `index.bad`.
    `progress` shows a bar (by bytes) when the annotations are large. `check(row, root, check_files)` returns
    the reason a row is bad, or None (default: the fine-tuning row check; MPO passes its pair check)."""
    check = check or check_row
    from tqdm import tqdm

    size = sum(os.path.getsize(s.annotation) for s in specs)
    bar = tqdm(
        total=size, unit="B", unit_scale=True, desc="scan data", disable=not progress or size < (32 << 20)
    )
    ds_parts, line_parts, off_parts, bad = [], [], [], []
    for d, spec in enumerate(specs):
        lines, offsets = _scan_file(spec, bad, skip_bad_rows, check_files, check)
        bar.update(os.path.getsize(spec.annotation))
        if spec.repeat_time > 1:
            lines, offsets = np.tile(lines, int(spec.repeat_time)), np.tile(offsets, int(spec.repeat_time))
        ds_parts.append(np.full(len(lines), d, dtype=np.int32))
        line_parts.append(lines)
        off_parts.append(offsets)
    bar.close()
    index = RowIndex(
        specs, np.concatenate(ds_parts), np.concatenate(line_parts), np.concatenate(off_parts), bad
    )
    if len(index) == 0:
        raise DataError(f"no usable {what} in " + ", ".join(display_path(s.annotation) for s in specs)
                        + (f" ({len(bad)} bad rows skipped)" if bad else ""))  # fmt: skip
    return index


def _lines(f, limit: int):
    """(line number, byte offset, line, length) for each line of a binary file; the line is None when it is
    longer than `limit`, and it is then skipped in blocks, never held whole."""
    number = offset = 0
    while raw := f.readline(limit + 1):
        number += 1
        size = len(raw)
        if size > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
                size += len(raw)
            yield number, offset, None, size
        else:
            yield number, offset, raw, size
        offset += size


def _scan_file(spec: DatasetSpec, bad: list[BadRow], skip: bool, check_files: bool, check):
    name = display_path(spec.annotation)
    lines, offsets = [], []
    limit = None
    if spec.repeat_time < 1:
        # the reference keeps the first fraction of the lines; only those are read and validated
        with open(spec.annotation, "rb") as f:
            limit = int(sum(1 for _, _, raw, _ in _lines(f, MAX_ROW_BYTES) if raw is None or raw.strip())
                        * spec.repeat_time)  # fmt: skip
    seen = 0
    with open(spec.annotation, "rb") as f:
        for number, start, raw, size in _lines(f, MAX_ROW_BYTES):
            if raw is not None and not raw.strip():
                continue
            if limit is not None and seen >= limit:
                break
            seen += 1
            reason = None
            if raw is None:
                reason = f"the row is {size} bytes, above the limit of {MAX_ROW_BYTES} bytes for one line"
            else:
                try:
                    item = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                    reason = f"invalid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
                else:
                    reason = check(item, spec.root, check_files)
            if reason is not None:
                if not skip:
                    raise DataError(f"{name}:{number}: {reason}")
                bad.append(BadRow(f"{name}:{number}", reason))
                continue
            lines.append(number)
            offsets.append(start)
    return np.asarray(lines, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
