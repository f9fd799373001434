"""A small routing table: (method, path pattern) → handler.

Patterns are literal segments and ``{name}`` placeholders (one whole segment each).
Lookup walks a tree of segments, so its cost depends on the path depth, not on the
number of routes. Upstream answers an unknown route and a known path with another
method alike (404), so this router has a single "no match" result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Callable[..., Any]


class _Node:
    __slots__ = ("children", "param", "handlers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.handlers: dict[str, Handler] = {}


class Router:
    def __init__(self) -> None:
        self._root = _Node()
        self.routes: list[tuple[str, str, Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        node = self._root
        for seg in pattern.strip("/").split("/"):
            if seg.startswith("{") and seg.endswith("}"):
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.children.setdefault(seg, _Node())
        if method in node.handlers:
            raise ValueError(f"duplicate route {method} {pattern}")
        node.handlers[method] = handler
        self.routes.append((method, pattern, handler))

    def match(self, method: str, path: str) -> tuple[Handler, tuple[str, ...]] | None:
        node = self._root
        params: list[str] = []
        for seg in path.strip("/").split("/"):
            child = node.children.get(seg)
            if child is None:
                child = node.param
                if child is None or not seg:
                    return None
                params.append(seg)
            node = child
        handler = node.handlers.get(method)
        if handler is None and method == "HEAD":
            handler = node.handlers.get("GET")
        if handler is None:
            return None
        return handler, tuple(params)
