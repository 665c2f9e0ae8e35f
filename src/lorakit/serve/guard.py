"""The ASGI guard in front of the app: body size limit (413) and the API key."""

import hmac
import logging
import time

from .schemas import (
    APIError,
)

logger = logging.getLogger("lorakit.serve")
API_KEY_ENV = "LORAKIT_API_KEY"


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes; send a shorter "
        f"prompt, or start the server with a larger --max-body-bytes.",
        code="request_too_large",
    )


class _Guard:
    """ASGI middleware in front of every route: the API key, the body-size limit, one log line.

    Plain ASGI rather than @app.middleware("http"): it wraps `receive`, so a chunked body is cut
    off as soon as it passes the limit, and a client's disconnect reaches the routes unchanged.
    With a key set, every path but /health needs it (/docs and /openapi.json included).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        state = scope.setdefault("state", {})
        state["started"] = started = time.perf_counter()
        headers = Headers(scope=scope)
        refusal = None
        if self.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                refusal = APIError(
                    401, "missing or wrong API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key"
                )
        length = headers.get("content-length", "")
        if refusal is None and length.isdigit() and int(length) > self.limit:
            refusal = _too_large(self.limit)  # refused before a byte of the body is read
        if refusal is not None:
            _log(scope["method"], scope["path"], refusal.status, started)
            return await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)

        status, received = [500], [0]

        async def receiving():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.limit:  # a chunked body has no Content-Length to check first
                    raise _too_large(self.limit)
            return message

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, receiving, sending)
        if not state.get("logged"):  # generation routes log their own line, with token counts
            _log(scope["method"], scope["path"], status[0], started)


def _log(
    method: str, path: str, status: int, started: float, model: str = "-", tokens_in: int = 0, tokens_out: int = 0
) -> None:
    logger.info(
        "%s %s status=%s model=%s tokens_in=%d tokens_out=%d latency_ms=%.1f",
        method,
        path,
        status,
        model,
        tokens_in,
        tokens_out,
        (time.perf_counter() - started) * 1000,
    )
