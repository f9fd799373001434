"""The OpenAPI 3.1 document of this server, built from its routing table, and the docs page.

One source of truth: every handler carries its own description (``@operation(...)``, next to
its code in ``api.py`` and ``mutations.py``), the request and response bodies are the JSON
Schemas in ``schemas.py``, and ``build_document`` walks the routes the ``Api`` registered.
What follows from how a route is registered is added here, once, so no handler can forget it:

* every operation: ``429`` (rate limiting runs before any handler);
* authenticated operations: the ``bearerAuth`` requirement, ``401``, and ``503`` with
  ``Retry-After`` (the key lookup and every handler may need the database);
* authenticated POST, PUT, PATCH and DELETE: the ``Idempotency-Key`` header with its answers
  (``409`` while the first request runs, ``422`` for a key reused on another request, ``400``
  for a key over 255 characters);
* operations with a path parameter: ``404`` (a value with a ``/`` in it, or an empty one,
  matches no route);
* operations with a request body: ``413`` (over the server's body size limit).

A route whose handler has no ``@operation`` still gets an operation (marked
``x-undocumented``) so the server always starts; ``Docs.problems`` lists it and
``tests/test_openapi.py`` fails on it.

The document is built once per process, when the ``Api`` is constructed, and served as the
same bytes to every request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

import runlater
from runlater.http import schemas
from runlater.http.messages import Request, Response

if TYPE_CHECKING:
    from runlater.http.api import Api

__all__ = ["Answer", "Docs", "Operation", "build_document", "header", "operation", "path_param", "query"]

OPENAPI_VERSION = "3.1.0"
TITLE = "runlater API"
DESCRIPTION = """\
Schedule HTTP requests: one-time (now, after a delay, at a time), recurring (cron), or in batches
and named queues that run one request at a time.

Authenticate with `Authorization: Bearer <key>`, where a key reads `pk_live_<24>.sk_live_<32>`
(`runlater keys create --org NAME` prints one).

Every answer is JSON. Bad input gets a 4xx, never a 5xx; a `503` with `Retry-After` means the
server is overloaded or cannot reach its database, and the request can be retried after that delay.
"""
TAGS = [
    {"name": "Tasks", "description": "One-time and recurring HTTP requests and their executions."},
    {"name": "Queues", "description": "Named queues: pause, resume, cancel."},
    {"name": "Sync", "description": "Declare the full set of cron tasks at once."},
    {"name": "Service", "description": "Health and this document."},
]
MUTATIONS = frozenset(("POST", "PUT", "PATCH", "DELETE"))
JSON = "application/json"

_PATH_PARAM = re.compile(r"\{([^}/]+)\}")


# --------------------------------------------------------------------------------------
# Metadata attached to handlers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One documented response: a description, a JSON body schema (None: no body) and the
    names of the response headers it always carries (defined in ``HEADERS``).

    With ``name`` it is emitted once under ``components.responses`` and referenced."""

    description: str
    schema: Mapping[str, Any] | None = None
    headers: tuple[str, ...] = ()
    media_type: str = JSON
    name: str | None = None


@dataclass(frozen=True)
class Operation:
    summary: str
    tags: tuple[str, ...]
    responses: Mapping[int, Answer]
    description: str | None = None
    request: Mapping[str, Any] | None = None
    request_required: bool = True
    parameters: tuple[Mapping[str, Any], ...] = ()
    operation_id: str | None = None
    deprecated: bool = False


_ATTRIBUTE = "__openapi__"


def operation(*, summary: str, tags: Iterable[str], responses: Mapping[int, Answer],
              description: str | None = None, request: Mapping[str, Any] | None = None,
              request_required: bool = True, parameters: Iterable[Mapping[str, Any]] = (),
              operation_id: str | None = None, deprecated: bool = False) -> Callable[[Any], Any]:
    """Describe a handler for the OpenAPI document; returns the handler itself, unchanged.

    ``responses`` lists what the handler itself can answer; the answers every route of its
    kind shares (401, 429, 503, idempotency, 404 for path parameters, 413) are added by
    ``build_document``. ``parameters`` are OpenAPI parameter objects (``query``, ``path_param``);
    path parameters not listed are documented as plain strings. ``operation_id`` defaults to
    the handler's name; a handler serving several routes gets a suffix per route.
    """
    meta = Operation(
        summary=summary, tags=tuple(tags), responses=dict(responses), description=description,
        request=request, request_required=request_required, parameters=tuple(parameters),
        operation_id=operation_id, deprecated=deprecated,
    )

    def attach(handler: Any) -> Any:
        setattr(handler, _ATTRIBUTE, meta)
        return handler

    return attach


def described(handler: Any) -> Operation | None:
    """The ``@operation`` metadata of a handler (function or bound method), if any."""
    return getattr(handler, _ATTRIBUTE, None)


def query(name: str, schema: Mapping[str, Any], description: str, *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": dict(schema)}


def path_param(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": dict(schema)}


def header(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": dict(schema)}


# --------------------------------------------------------------------------------------
# Shared parts
# --------------------------------------------------------------------------------------

# Response headers, by name; Answer.headers refers to these.
HEADERS: dict[str, dict[str, Any]] = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Limit": {
        "description": "Requests allowed per window for this key (or client address).",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in the current window.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Reset": {
        "description": "Unix time (seconds) at which a request will be admitted again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
}

UNAUTHORIZED = Answer("Missing, malformed, unknown or revoked API key.", schemas.Error, name="Unauthorized")
RATE_LIMITED = Answer(
    "Too many requests for this API key (or, without a key, this client address).",
    schemas.PlainError,
    ("Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"),
    name="RateLimited",
)
UNAVAILABLE = Answer(
    "The server is overloaded or cannot reach its database; retry after `Retry-After` seconds.",
    schemas.UnavailableBody, ("Retry-After",), name="Unavailable",
)
IN_FLIGHT = Answer(
    "A request with the same `Idempotency-Key` is still running.", schemas.PlainError, name="InFlight",
)
PAYLOAD_TOO_LARGE = Answer("The request body exceeds the server's limit.", schemas.FrameworkError,
                           name="PayloadTooLarge")
ROUTE_NOT_FOUND = Answer("No route matches the path (e.g. an empty or `/`-containing path segment).",
                         schemas.FrameworkError, name="RouteNotFound")

# Answers handlers share; their own wording lives with the handler.
BAD_REQUEST = Answer(
    "Malformed JSON body, a path id that is not a UUID, or (with `code`) a refused parameter.",
    schemas.BadRequestBody, name="BadRequest",
)
NOT_FOUND = Answer(
    "No live task with that id in this organization (or a path that matches no route).",
    schemas.NotFoundBody, name="NotFound",
)
MUTATION_REFUSED = Answer(
    "`idempotency_key_reused`: the `Idempotency-Key` was used for a different request.",
    schemas.Error,
)

IDEMPOTENCY_KEY = header(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 255},
    "Run this request at most once: a repeat within 24 hours gets the first successful answer "
    "again, without running. The key must not be reused for a different request.",
)

TASK_ID = path_param("id", schemas.UUID, "The task's id.")
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key, `pk_live_<24 characters>.sk_live_<32 characters>`.",
    }
}


# --------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------


@dataclass
class Document:
    """The built document and what is missing from it (empty when complete)."""

    body: dict[str, Any]
    problems: list[str] = field(default_factory=list)


class _Builder:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.responses: dict[str, dict[str, Any]] = {}
        self.operation_ids: set[str] = set()

    def response(self, answer: Answer) -> dict[str, Any]:
        rendered: dict[str, Any] = {"description": answer.description}
        if answer.headers:
            rendered["headers"] = {name: HEADERS[name] for name in answer.headers}
        if answer.schema is not None:
            rendered["content"] = {answer.media_type: {"schema": dict(answer.schema)}}
        if answer.name is None:
            return rendered
        known = self.responses.get(answer.name)
        if known is not None and known != rendered:
            raise ValueError(f"two different responses are named {answer.name}")
        self.responses[answer.name] = rendered
        return {"$ref": f"#/components/responses/{answer.name}"}

    def unique_id(self, base: str, method: str, pattern: str, shared: bool) -> str:
        """``base`` (the handler's name); for a handler serving several routes, with the method,
        then also the path, until unique."""
        by_method = f"{base}_{method.lower()}"
        by_path = f"{by_method}_" + re.sub(r"[^A-Za-z0-9]+", "_", pattern).strip("_")
        candidates = (by_method, by_path) if shared else (base, by_method, by_path)
        for candidate in candidates:
            if candidate not in self.operation_ids:
                self.operation_ids.add(candidate)
                return candidate
        raise ValueError(f"no unique operationId for {method} {pattern}")

    def operation(self, method: str, pattern: str, handler: Any, authenticated: bool, shared: int) -> dict[str, Any]:
        meta = described(handler)
        where = f"{method} {pattern}"
        if meta is None:
            self.problems.append(f"{where}: handler {getattr(handler, '__qualname__', handler)!r} has no @operation")
            meta = Operation(summary=f"{method} {pattern} (undocumented)", tags=(), responses={})
        answers: dict[int, Answer] = dict(meta.responses)
        if not answers:
            self.problems.append(f"{where}: no answer documented")

        parameters = [dict(p) for p in meta.parameters]
        declared_path = {p["name"] for p in parameters if p["in"] == "path"}
        in_pattern = _PATH_PARAM.findall(pattern)
        for name in in_pattern:
            if name not in declared_path:
                self.problems.append(f"{where}: path parameter {name!r} is not described")
                parameters.append(path_param(name, {"type": "string"}, name))
        for name in declared_path - set(in_pattern):
            self.problems.append(f"{where}: parameter {name!r} is not in the path")

        # What the kind of route implies (module docstring).
        answers.setdefault(429, RATE_LIMITED)
        if in_pattern:
            answers.setdefault(404, ROUTE_NOT_FOUND)
        if meta.request is not None:
            answers.setdefault(413, PAYLOAD_TOO_LARGE)
        if authenticated:
            answers.setdefault(401, UNAUTHORIZED)
            answers.setdefault(503, UNAVAILABLE)
            if method in MUTATIONS:
                parameters.append(dict(IDEMPOTENCY_KEY))
                answers.setdefault(409, IN_FLIGHT)
                answers.setdefault(400, BAD_REQUEST)
                answers.setdefault(422, MUTATION_REFUSED)

        base_id = meta.operation_id or getattr(handler, "__name__", "operation").lstrip("_")
        op: dict[str, Any] = {
            "operationId": self.unique_id(base_id, method, pattern, shared > 1),
            "summary": meta.summary,
            "tags": list(meta.tags),
        }
        if meta.description:
            op["description"] = meta.description
        if meta.deprecated:
            op["deprecated"] = True
        if parameters:
            op["parameters"] = parameters
        if meta.request is not None:
            op["requestBody"] = {
                "required": meta.request_required,
                "content": {JSON: {"schema": dict(meta.request)}},
            }
        op["responses"] = {str(status): self.response(answers[status]) for status in sorted(answers)}
        op["security"] = [{"bearerAuth": []}] if authenticated else []
        if described(handler) is None:
            op["x-undocumented"] = True
        return op


def build_document(routes: Iterable[tuple[str, str, Any, bool]]) -> Document:
    """The OpenAPI document of ``routes``: (method, pattern, handler, authenticated) each, in
    registration order. Never raises for a missing description; see ``Document.problems``."""
    builder = _Builder()
    routes = list(routes)
    uses: dict[int, int] = {}
    for _method, _pattern, handler, _auth in routes:
        key = id(getattr(handler, "__func__", handler))
        uses[key] = uses.get(key, 0) + 1
    paths: dict[str, dict[str, Any]] = {}
    for method, pattern, handler, authenticated in routes:
        shared = uses[id(getattr(handler, "__func__", handler))]
        paths.setdefault(pattern, {})[method.lower()] = builder.operation(
            method, pattern, handler, authenticated, shared)
    body = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": TITLE,
            "version": runlater.__version__,
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": TAGS,
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": dict(schemas.COMPONENTS),
            "responses": builder.responses,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
    return Document(body, builder.problems)


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------

_PAGE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>runlater API</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
details { margin: .4rem 0; border: 1px solid #ddd; border-radius: 4px; padding: .3rem .6rem; }
summary { cursor: pointer; }
code, pre { font: 13px ui-monospace, monospace; }
pre { background: #f6f6f6; padding: .5rem; overflow: auto; max-height: 24rem; }
.m { display: inline-block; width: 4.5rem; font-weight: bold; }
.lock { color: #a60; }
</style>
</head>
<body>
<h1>runlater API</h1>
<p>The machine-readable description is <a href="/api/v1/openapi">/api/v1/openapi</a> (OpenAPI 3.1);
any OpenAPI viewer or client generator can read it. This page lists its operations.</p>
<div id="ops"><noscript>Enable JavaScript to list the operations here, or read the JSON above.</noscript></div>
<script>
(async function () {
  const out = document.getElementById("ops");
  const doc = await (await fetch("/api/v1/openapi")).json();
  const el = (tag, text) => { const e = document.createElement(tag); if (text) e.textContent = text; return e; };
  const resolve = (ref) => ref.split("/").slice(1).reduce((node, key) => node[key], doc);
  const show = (value) => JSON.stringify(value, null, 2);
  out.appendChild(el("p", doc.info.description));
  for (const tag of doc.tags) {
    out.appendChild(el("h2", tag.name));
    out.appendChild(el("p", tag.description));
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        if (!(op.tags || []).includes(tag.name)) continue;
        const box = el("details"), head = el("summary");
        head.appendChild(el("span", method.toUpperCase())).className = "m";
        head.appendChild(el("code", path));
        head.appendChild(document.createTextNode(" " + op.summary));
        if (op.security && op.security.length) head.appendChild(el("span", " (key)")).className = "lock";
        box.appendChild(head);
        if (op.description) box.appendChild(el("p", op.description));
        if (op.parameters) box.appendChild(el("pre", "Parameters\\n" + show(op.parameters)));
        if (op.requestBody) box.appendChild(el("pre", "Request body\\n" + show(op.requestBody.content)));
        const answers = {};
        for (const [status, r] of Object.entries(op.responses)) answers[status] = r.$ref ? resolve(r.$ref) : r;
        box.appendChild(el("pre", "Responses\\n" + show(answers)));
        out.appendChild(box);
      }
    }
  }
  out.appendChild(el("h2", "Schemas"));
  out.appendChild(el("pre", show(doc.components.schemas)));
})();
</script>
</body>
</html>
"""
_HTML = b"text/html; charset=utf-8"


class Docs:
    """Serves ``GET /api/v1/openapi`` and ``GET /api/v1/docs`` from bytes built once."""

    def __init__(self) -> None:
        self.document: Document | None = None
        self._json = Response(503, b'{"errors":{"detail":"Service Unavailable"}}', [(b"retry-after", b"1")])
        self._page = Response(200, _PAGE.encode(), content_type=_HTML)

    def build(self, api: Api) -> Document:
        """Describe every route ``api`` has registered so far (call after the last one)."""
        routes = []
        for method, pattern, _entry in api.router.routes:
            handler, authenticated = api.registered.get((method, pattern), (None, False))
            routes.append((method, pattern, handler, authenticated))
        self.document = build_document(routes)
        self._json = Response(200, orjson.dumps(self.document.body))
        return self.document

    @operation(
        summary="This document (OpenAPI 3.1)",
        tags=["Service"],
        description="The description of every operation of this server, generated from its routing table.",
        responses={200: Answer("The OpenAPI document.", {"type": "object", "required": ["openapi", "info", "paths"]})},
    )
    def serve_document(self, req: Request) -> Response:
        return self._json

    @operation(
        summary="A page that lists the operations",
        tags=["Service"],
        description="HTML that reads `/api/v1/openapi` in the browser; it loads nothing from elsewhere.",
        responses={200: Answer("An HTML page.", {"type": "string"}, media_type="text/html")},
    )
    def serve_page(self, req: Request) -> Response:
        return self._page
