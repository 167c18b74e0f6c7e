"""A size limit on every request body (ASGI middleware): 413 `too_large` before the app sees the body.

Uploads (`POST /v1/rounds/{n}/update`) may carry up to `ServerConfig.max_upload_bytes` (`--max-upload-mb`, at
most the largest valid upload of the run's spec); every other body (JSON:
register, profile) up to MAX_JSON_BYTES. A declared Content-Length over the limit is refused at once,
a streamed body as soon as it passes the limit; an accepted body is handed to the app in one piece.
Before a 413 the rest of the body is read and dropped up to DRAIN_BYTES more, so a client that is still
sending gets the answer instead of a connection reset; a larger body is cut off.
"""

from __future__ import annotations

import json
import re

MAX_JSON_BYTES = 256 * 1024
DRAIN_BYTES = 4 * 1024 * 1024
UPLOAD_PATH = re.compile(r"^/v1/rounds/[^/]+/update$")


class BodyLimit:
    """Wrap an ASGI app: bodies over `limit_for(path)` bytes get 413 `too_large` (docs/PROTOCOL.md)."""

    def __init__(self, app, max_upload_bytes: int):
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    def limit_for(self, path: str) -> tuple[int, str]:
        if UPLOAD_PATH.match(path):
            return self.max_upload_bytes, (f"the upload is larger than the server's limit of {self.max_upload_bytes} "
                                           f"bytes ({self.max_upload_bytes / 2**20:g} MB: --max-upload-mb, at most the "
                                           "largest valid upload of this run's model and global rank)")
        return MAX_JSON_BYTES, f"the request body is larger than the server's limit of {MAX_JSON_BYTES} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, message = self.limit_for(scope["path"])
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            await _drain(receive, 0)
            return await _too_large(send, message)
        chunks, size, more = [], 0, True
        while more:
            message_in = await receive()
            if message_in["type"] != "http.request":  # the client went away
                return
            chunks.append(message_in.get("body", b""))
            size += len(chunks[-1])
            more = message_in.get("more_body", False)
            if size > limit:
                if more:
                    await _drain(receive, size)
                return await _too_large(send, message)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _drain(receive, received: int) -> None:
    """Read and drop the rest of a refused body, up to DRAIN_BYTES in all."""
    while received < DRAIN_BYTES:
        message_in = await receive()
        if message_in["type"] != "http.request":
            return
        received += len(message_in.get("body", b""))
        if not message_in.get("more_body", False):
            return


async def _too_large(send, message: str) -> None:
    body = json.dumps({"error": {"code": "too_large", "message": message}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
