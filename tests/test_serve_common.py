"""Helpers shared by the `serve` tests (no tests here): image data URLs, one torch thread, waiting for idle."""

from __future__ import annotations

import base64
import io
import time

import httpx
from PIL import Image


def png(w: int = 40, h: int = 30, color: str = "blue") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(image: Image.Image | bytes) -> str:
    """A PNG data URL of a PIL image, or of raw (possibly broken) bytes as they are."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode()


def wait_idle(base: str, seconds: float = 15) -> dict:
    """/health once nothing runs or waits in the engine (a cancelled request has really stopped)."""
    deadline = time.monotonic() + seconds
    while True:
        stats = httpx.get(base + "/health").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine is still busy: {stats}")
        time.sleep(0.02)
