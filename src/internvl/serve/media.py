"""Images named by `image_url` parts: data URLs, files under an allowed folder, and (only if enabled) http(s).

Every refusal is an `ImageError` whose message says what was wrong and how to allow it; the app answers 400.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ImageError
from ..processing import load_image


@dataclass
class MediaPolicy:
    allowed_local_dir: Path | None = None  # files must resolve (symlinks followed) inside this folder
    allow_remote: bool = False
    max_bytes: int = 20 * 1024 * 1024  # per image, encoded
    max_pixels: int = 40_000_000  # decompression-bomb cap, checked before decoding
    fetch_timeout: float = 10.0  # seconds for a whole remote download


def open_image(url: str, policy: MediaPolicy) -> Image.Image:
    """Decode the image behind `url` into RGB, within the policy's limits."""
    url = url.strip()
    if url.startswith("data:"):
        data, name = _data_url(url, policy), "data URL"
    elif url.startswith(("http://", "https://")):
        data, name = _fetch(url, policy), url
    elif len(url) < 4096 and (url.startswith(("file://", "/")) or os.path.splitext(url)[1]):
        data, name = _local(url, policy), url
    else:
        raise ImageError(f"unsupported image url {url[:60]!r}: use a data URL (data:image/png;base64,...), "
                         "a file path under the allowed folder, or an http(s) URL")  # fmt: skip
    try:
        return load_image(data, max_pixels=policy.max_pixels)
    except ImageError as e:
        raise ImageError(
            str(e).replace(f"<{len(data)} bytes>", f"{name[:200]} ({len(data)} bytes)")
        ) from None


def _too_big(n: int, policy: MediaPolicy, name: str) -> ImageError:
    return ImageError(f"{name}: the image is {n} bytes, above the limit of {policy.max_bytes} bytes")


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError("data URL: expected data:<media type>;base64,<data>")
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise _too_big(len(payload) * 3 // 4, policy, "data URL")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL: invalid base64 ({e})") from None
    if len(data) > policy.max_bytes:
        raise _too_big(len(data), policy, "data URL")
    return data


def _local(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_dir is None:
        raise ImageError(f"{url[:200]}: local image files are disabled; start the server with "
                         "--allowed-local-media-path DIR to allow files under DIR")  # fmt: skip
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    root = policy.allowed_local_dir.resolve()
    resolved = (root / path).resolve()  # an absolute `path` replaces root; `..` and symlinks are resolved
    if not resolved.is_relative_to(root):
        raise ImageError(f"{url[:200]}: not under the allowed media folder {root}")
    if not resolved.is_file():
        raise ImageError(f"{url[:200]}: no such file under {root}")
    size = resolved.stat().st_size
    if size > policy.max_bytes:
        raise _too_big(size, policy, url[:200])
    return resolved.read_bytes()


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise ImageError(f"{req.full_url}: redirected to a non-http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise ImageError(f"{url[:200]}: remote image URLs are disabled; send the image as a data URL, "
                         "or start the server with --allow-remote-images")  # fmt: skip
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    deadline = time.monotonic() + policy.fetch_timeout
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "internvl-serve"}),
                         timeout=policy.fetch_timeout) as r:  # fmt: skip
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise _too_big(int(length), policy, url[:200])
            chunks, total = [], 0
            while block := r.read(64 * 1024):
                total += len(block)
                if total > policy.max_bytes:
                    raise _too_big(total, policy, url[:200])
                if time.monotonic() > deadline:
                    raise ImageError(f"{url[:200]}: download took longer than {policy.fetch_timeout:g} s")
                chunks.append(block)
    except urllib.error.HTTPError as e:
        raise ImageError(f"{url[:200]}: download failed with HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"{url[:200]}: download failed ({reason})") from None
    return b"".join(chunks)
