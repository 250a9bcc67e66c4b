"""The embedded engine's HTTP guard: the API key and the body-size cap, before any route runs.

An ASGI middleware (FastAPI's ``@app.middleware("http")`` wraps ``receive`` in a way that hides
the client's disconnect from the routes, which the server needs to notice abandoned requests):

1. with an API key, every route but the health checks needs ``Authorization: Bearer <key>``
   and answers 401 without it (reading nothing of the body);
2. the body is read here, before the route runs, and never beyond ``max_bytes``: a declared
   ``Content-Length`` over the cap is refused (413) before a byte of the body is read, and a
   body without one (``Transfer-Encoding: chunked``) is counted as it arrives and refused as
   soon as it passes the cap.  A refusal closes the connection, so the rest is never read.

The route then receives the whole body as one message, and after it the server's own
``receive``, which reports the client's disconnect.
"""

from __future__ import annotations

import hmac
import json
from typing import Optional

CLOSE = (b"connection", b"close")  # after a refusal the rest of the body is not read: the connection ends


class RequestGuard:
    def __init__(self, app, *, api_key: Optional[str], max_bytes: int, open_routes: frozenset[str]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_bytes = max_bytes
        self.open_routes = open_routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # ASGI header names are lower-case bytes
        if self.expected is not None and scope["path"] not in self.open_routes:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _reply(send, 401, {"error": "Unauthorized"}, close=True)  # its body is never read
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was complete: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await _reply(send, 413, {"error": {"message": f"request body over {self.max_bytes} bytes"}}, close=True)


async def _reply(send, status: int, payload: dict, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + ([CLOSE] if close else [])})
    await send({"type": "http.response.body", "body": body})
