"""A safetensors reader that reads each tensor straight into its own buffer.

`safetensors.safe_open` memory-maps the file and copies each tensor out of the mapping, so while a
checkpoint loads, both the mapped pages and the copies are resident (about twice the checkpoint).
Reading with `readinto` into the final tensor keeps the peak at about one checkpoint. The header is
validated before any read: its size, each entry's dtype, shape and byte range against the file size,
and no two tensors sharing bytes, so a truncated, corrupt or hostile file fails with its name.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER = 100_000_000  # bytes of JSON header, the limit of the safetensors library itself


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file is shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(self.size - 8, MAX_HEADER):
                    raise ValueError(f"header length {n} exceeds the file size {self.size}" if n > self.size - 8
                                     else f"header length {n} exceeds the format's limit of {MAX_HEADER}")  # fmt: skip
                header = json.loads(f.read(n))
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self.entries[key] = self._entry(key, info)
        spans = sorted((begin, end, key) for key, (_, _, begin, end) in self.entries.items() if end > begin)
        for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
            if begin < end:
                raise CheckpointError(f"{self.path}: tensors {first!r} and {second!r} share bytes {begin}..{end} "
                                      "of the data; each tensor needs its own byte range")  # fmt: skip

    def _entry(self, key: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {key!r}"
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            raise CheckpointError(f"{where}: malformed header entry (dtype {dtype!r}; expected one of "
                                  f"{sorted(DTYPES)})")  # fmt: skip
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _ints(shape) or any(d < 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}"[:300])
        if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                  f"got {offsets!r}"[:300])  # fmt: skip
        dtype, (begin, end) = DTYPES[info["dtype"]], offsets
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(f"{where} spans {end - begin} bytes, but dtype {info['dtype']} and shape "
                                  f"{list(shape)} need {expected}")  # fmt: skip
        if self.data_start + end > self.size:
            raise CheckpointError(f"{self.path}: cannot read safetensors file (truncated: tensor {key!r} ends "
                                  f"at byte {self.data_start + end} of {self.size})")  # fmt: skip
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        # in file order, so that reads are sequential
        return sorted(self.entries, key=lambda k: self.entries[k][2])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        out = torch.empty(shape, dtype=dtype)
        if end == begin:
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buf):
                got = os.preadv(fd, [buf[done:]], self.data_start + begin + done)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file while reading tensor {key!r}")
                done += got
        finally:
            os.close(fd)
        return out


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
