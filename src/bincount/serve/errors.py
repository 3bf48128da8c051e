"""A bad request: its HTTP status and one message that names the problem, answered to the client and logged as one
WARNING line; the server carries on.

`RequestError` subclasses kserve's `InvalidInput`, so that without our handler it would still be a 400, never a
500. kserve's own handlers log the client errors they answer (a body that is not JSON, an unknown model) at ERROR
with a traceback; `ClientErrorsAsWarnings` turns those records into one WARNING line, so real errors stand out. A
body that does not fit the V2 schema gets a 422 naming where it is wrong, with short excerpts, never the body.
"""

from __future__ import annotations

import logging
import reprlib
from http import HTTPStatus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from kserve.errors import InvalidInput, ModelNotFound
from kserve.logging import logger

SCHEMA_PROBLEMS = 5                             # schema problems a 422 lists
LOGGED_CHARS = 300                              # of a reason, in the log line
KSERVE_CLIENT_ERRORS = {InvalidInput: HTTPStatus.BAD_REQUEST, ModelNotFound: HTTPStatus.NOT_FOUND}
EXCERPT = reprlib.Repr()
EXCERPT.maxstring = EXCERPT.maxother = 40
EXCERPT.maxlist = EXCERPT.maxdict = 3
EXCERPT.maxlevel = 2


class RequestError(InvalidInput):
    def __init__(self, reason: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(reason)
        self.status = status


def log_refusal(what: str, status: int, reason: str) -> None:
    clipped = reason if len(reason) <= LOGGED_CHARS else reason[:LOGGED_CHARS] + " …"
    logger.warning("%s refused (%d): %s", what, status, clipped)


async def request_error_handler(request: Request, exc: RequestError) -> ORJSONResponse:
    log_refusal(f"{request.method} {request.url.path}", exc.status, exc.reason)
    return ORJSONResponse(status_code=exc.status, content={"error": exc.reason})


async def validation_error_handler(request: Request, exc: RequestValidationError) -> ORJSONResponse:
    errors = exc.errors()
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    reason = (f"the body is not a V2 inference request: {'.'.join(map(str, first['loc']))}: {first['msg']}"
              + (f" ({str(cause)[:80]})" if cause else ""))
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "input": EXCERPT.repr(e.get("input"))}
              for e in errors[:SCHEMA_PROBLEMS]]
    log_refusal(f"{request.method} {request.url.path}", HTTPStatus.UNPROCESSABLE_ENTITY, reason)
    return ORJSONResponse(status_code=HTTPStatus.UNPROCESSABLE_ENTITY, content={"error": reason, "detail": detail})


class ClientErrorsAsWarnings(logging.Filter):
    """Rewrites kserve's ERROR-with-traceback record of a client error it answered into one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = KSERVE_CLIENT_ERRORS.get(type(exc))
        if status is not None:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg, record.args = "request refused (%d): %s", (status, str(exc)[:LOGGED_CHARS])
            record.exc_info = record.exc_text = None
        return True
