"""A safetensors reader that reads each tensor straight into its own buffer.

`safetensors.safe_open` memory-maps the file and copies each tensor out of the mapping, so while a
checkpoint loads, both the mapped pages and the copies are resident (about twice the checkpoint).
Reading with `readinto` into the final tensor keeps the peak at about one checkpoint. The header is
validated against the file size so a truncated or corrupt file fails with its name, before any read.
"""

from __future__ import annotations

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
                if n > self.size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {self.size}")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for tensor {key!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            expected = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected or end < begin:
                raise CheckpointError(f"{self.path}: tensor {key!r} spans {end - begin} bytes, but dtype "
                                      f"{info['dtype']} and shape {list(shape)} need {expected}")  # fmt: skip
            if self.data_start + end > self.size:
                raise CheckpointError(f"{self.path}: cannot read safetensors file (truncated: tensor {key!r} ends "
                                      f"at byte {self.data_start + end} of {self.size})")  # fmt: skip
            self.entries[key] = (dtype, shape, begin, end)

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
