"""Errors a handler raises when the caller sent something the API refuses.

Each error knows its HTTP status and renders the exact upstream body (upstream-api §0.3),
so handlers only ``raise`` and one place in the API layer turns the exception into a
``Response``. The value that caused the error is kept on the exception (``value``) for
logs and tests; it never goes into the body.

Body shapes, by class:

* ``ControllerError``  ``{"error": {"code": ..., "message": ...}}``
* ``ValidationError``  422 ``{"error": {"code": "validation_error", "details": {field: [msg, ...]}}}``
* ``SyncValidationError`` 422 ``{"error": {"code": "validation_error", "details": [{"name", "error"}]}}``
* ``FrameworkError``   ``{"errors": {"detail": "<reason phrase>"}}`` (bad JSON, bad UUID, unknown route)
* ``PlainError``       ``{"error": "<text>"}`` (rate limit, idempotency in flight)

``ServiceUnavailable`` is the one error that is the server's fault rather than the
caller's; it is here because it shares the controller-error shape and the mapping point.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson

from runlater.http.messages import Response

Headers = list[tuple[bytes, bytes]]

# Phoenix renders framework errors with Plug's reason phrases. Pinned here because
# Python's own table renames some of them between versions (413 became "Content Too
# Large" in 3.13) and clients may compare the text.
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def reason_phrase(status: int) -> str:
    phrase = _REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
    return phrase


class ApiError(Exception):
    """Base of every error that maps to one HTTP response."""

    status: int = 500

    def __init__(self, status: int | None = None, *, value: Any = None) -> None:
        if status is not None:
            self.status = status
        self.value = value  # what the caller sent that caused the error, when useful
        super().__init__(self.status)

    def response(self) -> Response:
        raise NotImplementedError


class ControllerError(ApiError):
    """``{"error": {"code", "message"}}`` with any status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        value: Any = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(status, value=value)
        self.code = code
        self.message = message
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def response(self) -> Response:
        body = orjson.dumps({"error": {"code": self.code, "message": self.message}})
        return Response(self.status, body, list(self.headers) if self.headers else None)


class InvalidDelay(ControllerError):
    def __init__(self, message: str, value: Any) -> None:
        super().__init__(400, "invalid_delay", message, value=value)


class InvalidRunAt(ControllerError):
    def __init__(self, value: Any) -> None:
        super().__init__(400, "invalid_run_at", "run_at must be a valid ISO 8601 datetime", value=value)


class InvalidParams(ControllerError):
    def __init__(self, message: str, value: Any = None) -> None:
        super().__init__(400, "invalid_params", message, value=value)


# The next three answer many requests under attack or overload with the same bytes, so
# their bodies are encoded once.
_UNAUTHORIZED_BODY = b'{"error":{"code":"unauthorized","message":"Invalid or missing API key"}}'
_NOT_FOUND_BODY = b'{"error":{"code":"not_found","message":"Resource not found"}}'
_UNAVAILABLE_BODY = b'{"error":{"code":"service_unavailable","message":"Server is busy, please retry"}}'


class Unauthorized(ControllerError):
    def __init__(self, value: Any = None) -> None:
        super().__init__(401, "unauthorized", "Invalid or missing API key", value=value)

    def response(self) -> Response:
        return Response(401, _UNAUTHORIZED_BODY)


class NotFound(ControllerError):
    def __init__(self, value: Any = None) -> None:
        super().__init__(404, "not_found", "Resource not found", value=value)

    def response(self) -> Response:
        return Response(404, _NOT_FOUND_BODY)


class ServiceUnavailable(ControllerError):
    """The database is unreachable or saturated; the client should come back later."""

    def __init__(self, retry_after: int = 5, *, cause: str | None = None) -> None:
        super().__init__(503, "service_unavailable", "Server is busy, please retry", value=cause)
        self.retry_after = retry_after

    def response(self) -> Response:
        return Response(503, _UNAVAILABLE_BODY, [(b"retry-after", str(self.retry_after).encode())])


class ValidationError(ApiError):
    """422 with a field → messages map, like upstream's changeset errors."""

    status = 422

    def __init__(self, details: dict[str, list[str]], *, value: Any = None) -> None:
        super().__init__(value=value)
        self.details = details

    def __str__(self) -> str:
        return f"422 validation_error: {self.details}"

    def response(self) -> Response:
        body = orjson.dumps({"error": {"code": "validation_error", "details": self.details}})
        return Response(422, body)


class SyncValidationError(ApiError):
    """422 for ``PUT /sync``: one ``{"name", "error"}`` entry per failing declared item."""

    status = 422

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__()
        self.items = items

    def response(self) -> Response:
        body = orjson.dumps({"error": {"code": "validation_error", "details": self.items}})
        return Response(422, body)


class FrameworkError(ApiError):
    """``{"errors": {"detail": "<reason phrase>"}}``: what upstream's framework answers for
    requests it cannot even hand to a controller (malformed JSON, a path id that is not a
    UUID, an unknown route). ``reason`` is for logs only."""

    def __init__(self, status: int = 400, *, value: Any = None, reason: str | None = None) -> None:
        super().__init__(status, value=value)
        self.reason = reason

    def __str__(self) -> str:
        detail = reason_phrase(self.status)
        return f"{self.status} {detail}: {self.reason}" if self.reason else f"{self.status} {detail}"

    def response(self) -> Response:
        return Response(self.status, orjson.dumps({"errors": {"detail": reason_phrase(self.status)}}))


class BadRequest(FrameworkError):
    def __init__(self, *, value: Any = None, reason: str | None = None) -> None:
        super().__init__(400, value=value, reason=reason)


class PlainError(ApiError):
    """``{"error": "<text>"}``: the string-valued shape of the rate limiter (429) and the
    idempotency layer (409)."""

    def __init__(self, status: int, message: str, *, headers: Headers | None = None) -> None:
        super().__init__(status)
        self.message = message
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def response(self) -> Response:
        return Response(
            self.status,
            orjson.dumps({"error": self.message}),
            list(self.headers) if self.headers else None,
        )


RATE_LIMITED_MESSAGE = "Rate limit exceeded. Try again later."
IN_FLIGHT_MESSAGE = "Request in progress. Please wait and retry."
