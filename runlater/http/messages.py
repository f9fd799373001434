"""The request and response objects that pass between the protocol and the handlers.

A ``Request`` is built by ``protocol.HttpProtocol`` once the full message (headers and
body) has arrived. Handlers return a ``Response`` directly (fast, synchronous paths),
an ``asyncio.Future`` that resolves to a ``Response`` (the batched create path: no task
per request), or a coroutine (everything else; the protocol wraps it in a task).
"""

from __future__ import annotations

from typing import Any

import orjson

JSON_TYPE = b"application/json; charset=utf-8"


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "client", "route_params", "ctx")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        client: str,
    ) -> None:
        self.method = method  # upper-case, e.g. "POST"
        self.path = path  # percent-decoded path without the query string
        self.query = query  # raw query string (no leading "?"), "" when absent
        self.headers = headers  # lower-cased names; repeated headers joined with ", "
        self.body = body
        self.client = client  # peer IP address
        self.route_params: tuple[str, ...] = ()
        self.ctx: Any = None  # authentication result, set by the API layer

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)


class Response:
    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes | None = JSON_TYPE,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers  # extra headers, names in lower case
        self.content_type = content_type if body or status not in (204, 304) else None


def json_response(status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(status, orjson.dumps(payload), headers)


def error_response(
    status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return Response(status, orjson.dumps({"error": {"code": code, "message": message}}), headers)
