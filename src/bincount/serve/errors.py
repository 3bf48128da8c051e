"""A bad request: its HTTP status and one message that names the problem; the server carries on.

It subclasses kserve's `InvalidInput` so that without our handler it would still be a 400, never a 500.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import ORJSONResponse
from kserve.errors import InvalidInput


class RequestError(InvalidInput):
    def __init__(self, reason: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(reason)
        self.status = status


async def request_error_handler(_, exc: RequestError) -> ORJSONResponse:
    return ORJSONResponse(status_code=exc.status, content={"error": exc.reason})
