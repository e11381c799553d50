"""ASGI middleware in front of the app: the bearer API key and the request body size limit.

It answers 401/413 itself, in the OpenAI error shape, before any body is buffered or parsed. A refused
upload is read and thrown away (up to a bound) first, so the client sees the answer, not a reset socket.
Once a large body has been answered, the heap pages it used go back to the OS.
"""

from __future__ import annotations

import ctypes
import hmac
import json

from .schemas import error_body

DRAIN_LIMIT = 256 * 1024 * 1024  # bytes of a refused body we read before just closing the connection
LARGE_BODY = 4 * 1024 * 1024  # after a body this large, free heap memory is released


class Guard:
    def __init__(self, app, api_key: str | None = None, max_body_bytes: int = 32 * 1024 * 1024):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(headers):
            body = error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")  # fmt: skip
            return await _reject(receive, send, 401, body)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _reject(receive, send, 413, self._too_large(int(length)))
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body_bytes:
                return await _reject(receive, send, 413, self._too_large(total, at_least=True), message)
            chunks.append(body)
            if not message.get("more_body"):
                break
        whole = b"".join(chunks)
        del chunks  # one copy of a large body, not two
        replayed = False

        async def replay():
            nonlocal replayed, whole
            if replayed:
                return await receive()
            replayed = True
            message, whole = {"type": "http.request", "body": whole, "more_body": False}, b""
            return message

        try:
            await self.app(scope, replay, send)
        finally:
            if total > LARGE_BODY:  # its chunks, its copy and its parsed strings are free now
                release_free_memory()

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def _too_large(self, n: int, at_least: bool = False) -> dict:
        size = f"more than {self.max_body_bytes}" if at_least else str(n)
        mb = self.max_body_bytes / 2**20
        return error_body(f"the request body is {size} bytes, above this server's limit of {self.max_body_bytes} "
                          f"bytes ({mb:g} MiB, --max-body-mb)", code="request_too_large")  # fmt: skip


async def _reject(receive, send, status: int, body: dict, last: dict | None = None) -> None:
    more = last is None or last.get("more_body", False)
    drained = 0
    while more and drained < DRAIN_LIMIT:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        drained += len(message.get("body", b""))
        more = message.get("more_body", False)
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and RSS never comes down)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
