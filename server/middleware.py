"""ASGI middleware (pure ASGI, so streamed responses are never buffered or detached):
request body size limit (413 before the body is parsed) and response status counting."""

from __future__ import annotations

import json


class BodyLimitMiddleware:
    """Refuse bodies over max_bytes, by Content-Length or by counting streamed chunks."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send) -> None:
        body = json.dumps({"error": {
            "message": f"request body exceeds {self.max_bytes} bytes",
            "type": "invalid_request_error", "param": None, "code": "body_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _TooLarge:
            return await self._reject(send)


class _TooLarge(Exception):
    pass


class StatusCountMiddleware:
    """Count responses by status code into `counts` (a Counter shared with /metrics)."""

    def __init__(self, app, counts):
        self.app = app
        self.counts = counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        return await self.app(scope, receive, counting_send)
