"""What bincount adds to kserve's HTTP server: the upload page, the body-size guard, the 4xx error handler and the
address it listens on.

They are installed on kserve's FastAPI app before the ModelServer starts, so the page's `GET /` route comes
before kserve's own `/` (the liveness answer, which non-browser clients still get) and the guard wraps
every endpoint. The page is package data, so it works from an installed wheel.
"""

from __future__ import annotations

import html
from http import HTTPStatus
from importlib import resources

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, ORJSONResponse
from kserve.logging import logger
from kserve.model_server import ModelServer, app
from kserve.protocol.dataplane import DataPlane

from bincount.config import ServeConfig
from bincount.serve.errors import (ClientErrorsAsWarnings, RequestError, log_refusal, request_error_handler,
                                   validation_error_handler)

BINARY_EXTENSION_HEADER = b"inference-header-content-length"


def install(cfg: ServeConfig) -> None:
    page = resources.files("bincount.serve").joinpath("static/index.html").read_text()
    page = page.replace("{{MODEL}}", html.escape(cfg.name, quote=True))

    async def index(request: Request):
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(page, headers={"X-Content-Type-Options": "nosniff",
                                               "Content-Security-Policy": CSP})
        return await DataPlane.live()

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_middleware(RequestGuard, max_body=cfg.max_body_bytes)
    app.add_exception_handler(RequestError, request_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    logger.addFilter(ClientErrorsAsWarnings())


class Server(ModelServer):
    """kserve's ModelServer, listening on `host`. kserve 0.21 builds its uvicorn config with host 0.0.0.0 whatever
    the caller wants; the address is set on that config once `start` has built it, before it binds."""

    def __init__(self, host: str, **kwargs):
        super().__init__(**kwargs)
        self.host = host

    def setup_event_loop(self) -> None:
        self._rest_server.config.host = self.host
        super().setup_event_loop()


CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; connect-src 'self'"


class RequestGuard:
    """Refuses a body over `max_body` bytes, by its Content-Length before storing any of it or, when it is
    sent chunked, as soon as it grows past the limit; and refuses the V2 binary data extension, which kserve
    0.21 turns into UTF-8 text (raw image bytes cannot survive that) and cannot parse safely.

    Before answering it reads and drops the rest of the body (up to `DRAIN_BYTES`): a client that is still
    sending then reads the answer instead of a reset connection."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        refusal = None
        if BINARY_EXTENSION_HEADER in headers:
            refusal = RequestError("the V2 binary data extension is not supported: send BYTES data as base64 "
                                   "strings in the JSON body", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        elif not length.isdigit() or int(length) > self.max_body:
            refusal = self._too_large()
        if refusal:
            log_refusal(f"{scope['method']} {scope['path']}", refusal.status, refusal.reason)
            await _drain(receive, 0)
            response = ORJSONResponse(status_code=refusal.status, content={"error": refusal.reason})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    if message.get("more_body"):
                        await _drain(receive, received)
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> RequestError:
        return RequestError(f"the request body is over this server's limit of {self.max_body} bytes",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


DRAIN_BYTES = 64 << 20


async def _drain(receive, seen: int) -> None:
    while seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body"):
            return
