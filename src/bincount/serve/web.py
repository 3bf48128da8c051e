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
from bincount.serve import binary
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
    sent chunked, as soon as it grows past the limit; and hands kserve a V2 request in the binary data extension
    as the same request in plain JSON (`binary`), since kserve 0.21 would read its image files as UTF-8 text.

    Before refusing an oversized body it reads and drops the rest of it (up to `DRAIN_BYTES`): a client that is
    still sending then reads the answer instead of a reset connection."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            await _drain(receive, 0)
            return await _refuse(scope, receive, send, self._too_large())
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

        downstream = limited_receive
        if BINARY_EXTENSION_HEADER in headers:
            try:
                body = binary.to_json(await _body(limited_receive), headers[BINARY_EXTENSION_HEADER])
            except RequestError as e:
                return await _refuse(scope, receive, send, e)
            scope = {**scope, "headers": _json_headers(scope["headers"], len(body))}
            downstream = _replay(body, receive)
        await self.app(scope, downstream, send)

    def _too_large(self) -> RequestError:
        return RequestError(f"the request body is over this server's limit of {self.max_body} bytes",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


async def _refuse(scope, receive, send, refusal: RequestError) -> None:
    log_refusal(f"{scope['method']} {scope['path']}", refusal.status, refusal.reason)
    await ORJSONResponse(status_code=refusal.status, content={"error": refusal.reason})(scope, receive, send)


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


def _json_headers(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    replaced = {BINARY_EXTENSION_HEADER, b"content-type", b"content-length"}
    return [(k, v) for k, v in headers if k not in replaced] + [
        (b"content-type", b"application/json"), (b"content-length", str(length).encode())]


def _replay(body: bytes, receive):
    """The rewritten body as one message, then the client's own (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


DRAIN_BYTES = 64 << 20


async def _drain(receive, seen: int) -> None:
    while seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body"):
            return
