"""VLMEvalKit benchmark TSV files: rows to `EvalItem`s (items.py) whose images decode on demand, and back.

Column rules follow VLMEvalKit (`vlmeval/dataset/image_base.py`, `image_mcq.py`, `smp/vlm.py`).
"""

from __future__ import annotations

import ast
import csv
import os
import re
import string
import sys
from collections.abc import Iterable
from pathlib import Path

from internvl.errors import DataError
from internvl.eval.items import EvalItem, ImageSource

# VLMEvalKit reads TSVs with pandas defaults, so every one of these cells is NaN there (pandas >= 2.0).
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
# An `image` cell this short is the `index` of the row whose image it reuses (VLMEvalKit's space saving).
MAX_REF_LEN = 64
REQUIRED_COLUMNS = ("index", "question")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_INT = re.compile(r"-?\d+")
# Bytes that are not UTF-8 read as these lone surrogates under errors="surrogateescape".
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
# What pandas' C parser reads as a number or a boolean (surrounding spaces allowed), deciding a column's dtype.
_PD_INT = re.compile(r"\s*[+-]?\d+\s*")
_PD_FLOAT = re.compile(r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity)\s*", re.IGNORECASE)
_PD_BOOL = {"True": "True", "TRUE": "True", "true": "True", "False": "False", "FALSE": "False", "false": "False"}
# Columns whose text reaches the prompt, so their pandas rendering matters.
TEXT_COLUMNS = ("question", "hint") + tuple(string.ascii_uppercase)


def _raise_field_limit() -> None:
    # Base64 images are far larger than csv's 128 KiB default; sys.maxsize overflows a C long on Windows.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _na(value: str | None) -> str | None:
    return None if value is None or value in PANDAS_NA else value


def pandas_column(cells: list[str]) -> list[str]:
    """A column's cells as VLMEvalKit prints them after pandas has read the file: a column of whole numbers is
    int64 ("007" -> "7"), or float64 once it has a missing cell or a decimal ("3" -> "3.0", "2.50" -> "2.5");
    a column of True/False spellings is bool ("true" -> "True"); any other column keeps its text."""
    present = [c for c in cells if _na(c) is not None]
    if not present:
        return cells
    if all(_PD_INT.fullmatch(c) for c in present):
        if len(present) == len(cells):
            return [str(int(c)) for c in cells]
        return [repr(float(c)) if _na(c) is not None else c for c in cells]
    if all(_PD_FLOAT.fullmatch(c) for c in present):
        return [repr(float(c)) if _na(c) is not None else c for c in cells]
    if all(c in _PD_BOOL for c in present):
        return [_PD_BOOL.get(c, c) for c in cells]
    return cells


def lmu_data_root() -> Path:
    """VLMEvalKit's `LMUDataRoot()`: $LMUData when that folder exists, else ~/LMUData."""
    env = os.environ.get("LMUData")
    return Path(env) if env and Path(env).exists() else Path.home() / "LMUData"


def _to_list(cell: str, where: str) -> list[str]:
    """VLMEvalKit's `toliststr`: a cell that looks like `[...]` is a Python list literal, else one string."""
    if not (cell.startswith("[") and cell.endswith("]")):
        return [cell]
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: looks like a list but does not parse ({exc.__class__.__name__})") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list literal, got {type(value).__name__}")
    return [str(x) for x in value]


def _check_b64(payload: str, where: str, checked: set[str]) -> str:
    # Rows that reference one image share its string; `checked` keeps it from being scanned per row.
    if payload not in checked:
        if len(payload) % 4 or not _B64.fullmatch(payload):
            raise DataError(f"{where}: not valid base64 (starts {payload[:20]!r}, length {len(payload)})")
        checked.add(payload)
    return payload


def _check_utf8(fields: list[str], columns: list[str], where) -> None:
    """Refuse a cell holding bytes that are not UTF-8 (read with errors="surrogateescape"), naming its column."""
    for col, cell in zip(columns, fields):
        if not cell.isascii() and (bad := _NOT_UTF8.search(cell)):
            byte = ord(bad.group()) - 0xDC00
            raise DataError(f"{where(col)}: invalid UTF-8 (byte 0x{byte:02x} at character {bad.start()}); "
                            f"VLMEvalKit TSV files are UTF-8")


def read_tsv(path: str | Path, skip_noimg: bool = True,
             image_root: str | Path | None = None) -> list[EvalItem]:
    """Read a VLMEvalKit TSV. Rows whose `image` is missing are dropped when `skip_noimg` (VLMEvalKit's
    default). Text columns read as pandas types them (see `pandas_column`). An `image` cell of at most 64
    characters is the index of the row whose image it reuses, followed through chains of such references.
    Relative `image_path` files (used when there is no `image` column) resolve as in VLMEvalKit: as given,
    else under `<LMUData>/images/<file stem>/`; failing both, under `image_root` (default: the TSV's folder).
    """
    path = Path(path)
    roots = [lmu_data_root() / "images" / path.stem, Path(image_root) if image_root is not None else path.parent]
    _raise_field_limit()
    rows: list[tuple[int, int, dict[str, str | None]]] = []
    # utf-8-sig drops a byte-order mark, as pandas does, so the first column is still "index".
    # Undecodable bytes become lone surrogates, found per cell below so that the error names the row and column.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file, expected a header row")
        _check_utf8(header, [f"#{k + 1}" for k in range(len(header))],
                    lambda col: f"{path}, row 0 (header, line 1), column {col}")
        # VLMEvalKit lower-cases every column name that is not an option letter.
        header = [h if h in string.ascii_uppercase else h.lower() for h in header]
        for col in REQUIRED_COLUMNS:
            if col not in header:
                raise DataError(f"{path}, row 0 (header, line 1), column {col!r}: missing required column "
                                f"(have {', '.join(header)})")
        for fields in reader:
            if not fields:
                continue  # blank line, skipped as pandas does
            row_no = len(rows) + 1
            if len(fields) != len(header):
                raise DataError(f"{path}, row {row_no} (line {reader.line_num}), column {header[-1]!r}: "
                                f"row has {len(fields)} fields, header has {len(header)}")
            at = f"{path}, row {row_no} (line {reader.line_num})"
            _check_utf8(fields, header, lambda col, at=at: f"{at}, column {col!r}")
            rows.append((row_no, reader.line_num, dict(zip(header, fields))))
    # pandas types each column over the whole file, before VLMEvalKit drops the rows without an image
    for col in (c for c in TEXT_COLUMNS if c in header):
        for (_, _, raw), text in zip(rows, pandas_column([raw[col] for _, _, raw in rows])):
            raw[col] = text

    def where(row_no: int, line: int, col: str) -> str:
        return f"{path}, row {row_no} (line {line}), column {col!r}"

    seen: dict[str, int] = {}
    kept = []
    for row_no, line, raw in rows:
        for col in REQUIRED_COLUMNS:
            if _na(raw[col]) is None:
                raise DataError(f"{where(row_no, line, col)}: required value is empty")
        key = raw["index"]
        if key in seen:
            raise DataError(f"{where(row_no, line, 'index')}: duplicate index {key!r} "
                            f"(first on row {seen[key]})")
        seen[key] = row_no
        if skip_noimg and "image" in raw and _na(raw["image"]) is None:
            continue
        kept.append((row_no, line, raw))

    all_int = all(_INT.fullmatch(raw["index"]) for _, _, raw in kept)
    # VLMEvalKit matches references against str(index) after pandas made the index an int ("007" is "7")
    image_map = {(str(int(raw["index"])) if all_int else raw["index"]): raw["image"]
                 for _, _, raw in kept if "image" in raw}
    items, checked = [], set()
    for row_no, line, raw in kept:
        images = _row_images(raw, image_map, roots, lambda col, r=row_no, n=line: where(r, n, col), checked)
        items.append(_row_item(raw, images, all_int))
    return items


def _follow(cell: str, image_map: dict, where) -> str:
    """The image a reference cell stands for, through chains (VLMEvalKit's circular tool writes rotated rows
    that reference a row whose own image may be a reference)."""
    seen = [cell]
    while True:
        target = image_map.get(seen[-1])
        if target is None or _na(target) is None:
            raise DataError(f"{where('image')}: {seen[-1]!r} is an index reference (<= {MAX_REF_LEN} chars) "
                            f"but no row with that index has an image")
        if len(target) > MAX_REF_LEN:
            return target
        if target in seen:
            raise DataError(f"{where('image')}: image references form a cycle ({' -> '.join(seen + [target])})")
        seen.append(target)


def _resolve_paths(names: list[str], roots: list[Path], where) -> list[str]:
    """VLMEvalKit's rule: the names as given when they all exist, else all of them under its image folder;
    then our fallback (the TSV's folder), where VLMEvalKit would fail."""
    candidates = [[Path(n) for n in names]] + [[root / n for n in names] for root in roots]
    for paths in candidates:
        if all(p.is_file() for p in paths):
            return [os.path.abspath(p) for p in paths]
    missing = next(n for n, p in zip(names, candidates[-1]) if not p.is_file())
    tried = ", ".join(str(root) for root in roots)
    raise DataError(f"{where('image_path')}: image file {missing!r} not found as given nor under {tried}")


def _row_images(raw: dict, image_map: dict, roots: list[Path], where, checked: set[str]) -> list[ImageSource]:
    names = _to_list(raw["image_path"], where("image_path")) if _na(raw.get("image_path")) else []
    cell = _na(raw.get("image"))
    if cell is None:
        if "image" in raw:
            return []
        paths = _resolve_paths(names, roots, where)
        return [ImageSource(path=p, name=n, where=where("image_path")) for p, n in zip(paths, names)]
    if len(cell) <= MAX_REF_LEN:
        cell = _follow(cell, image_map, where)
    payloads = _to_list(cell, where("image"))
    if names and len(names) != len(payloads):
        raise DataError(f"{where('image_path')}: {len(names)} names for {len(payloads)} images")
    names = names or [None] * len(payloads)
    return [ImageSource(data=_check_b64(p, where("image"), checked), name=n, where=where("image"))
            for p, n in zip(payloads, names)]


def _row_item(raw: dict, images: list[ImageSource], int_index: bool) -> EvalItem:
    def as_index(v):
        return int(v) if int_index and v is not None and _INT.fullmatch(v) else v

    answer = _na(raw.get("answer"))
    return EvalItem(
        index=as_index(raw["index"]),
        question=raw["question"],
        options={c: raw[c] for c in string.ascii_uppercase if _na(raw.get(c)) is not None},
        answer=answer.strip() if answer is not None else None,
        hint=_na(raw.get("hint")),
        category=_na(raw.get("category")),
        l2_category=_na(raw.get("l2-category", raw.get("l2_category"))),
        split=_na(raw.get("split")),
        images=images,
        g_index=as_index(_na(raw.get("g_index"))),
        raw=raw,
    )


_OWN = {"index", "question", "hint", "answer", "category", "l2-category", "l2_category", "split",
        "g_index", "image", "image_path"}


def write_tsv(path: str | Path, items: Iterable[EvalItem]) -> None:
    """Write items as a VLMEvalKit TSV. A repeated image cell is written as the index of its first row."""
    items = list(items)
    path = Path(path)
    letters = sorted({c for it in items for c in it.options})
    extras = sorted({k for it in items for k in it.raw if k not in _OWN and k not in string.ascii_uppercase})
    has_b64 = any(s.data is not None for it in items for s in it.images)
    has_names = any(s.name for it in items for s in it.images)
    cols = ["index", "question"] + (["hint"] if any(it.hint for it in items) else [])
    cols += letters + ["answer", "category", "l2-category", "split"]
    cols += ["g_index"] if any(it.g_index is not None for it in items) else []
    cols += ["image"] if has_b64 else []
    cols += ["image_path"] if has_names or (items and not has_b64 and any(it.images for it in items)) else []
    cols += extras

    first_with: dict[str, str] = {}  # image cell -> index of the first row that wrote it
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(cols)
        for row_no, it in enumerate(items, start=1):
            for col, text in [("question", it.question)] + list(it.options.items()):
                if text in PANDAS_NA:
                    raise DataError(f"{path}, row {row_no}, column {col!r}: value {text!r} would be read "
                                    f"back as missing (pandas NA token)")
            row = {"index": it.index, "question": it.question, "hint": it.hint, "answer": it.answer,
                   "category": it.category, "l2-category": it.l2_category, "split": it.split,
                   "g_index": it.g_index, **it.options}
            row.update({k: it.raw.get(k) for k in extras})
            if it.images and has_b64:
                payloads = [s.to_base64() for s in it.images]
                cell = payloads[0] if len(payloads) == 1 else repr(payloads)
                row["image"] = first_with.get(cell, cell)
                if cell not in first_with and len(str(it.index)) <= MAX_REF_LEN:
                    first_with[cell] = str(it.index)
            names = [s.name or s.path for s in it.images]
            if "image_path" in cols and all(names) and names:
                row["image_path"] = names[0] if len(names) == 1 else repr(names)
            writer.writerow(["" if row.get(c) is None else row[c] for c in cols])
