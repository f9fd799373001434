"""Named SQL queries, loaded once from the ``.sql`` files next to this module.

Each file holds blocks that start with a ``-- name: <query_name>`` line followed by
comment lines describing the query, then the statement. Call sites name the query
(``Q.create_once_batch``) so SQL never gets built from Python strings.
"""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)


def _load() -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in sorted(resources.files(__package__).joinpath("sql").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".sql"):
            continue
        text = entry.read_text(encoding="utf-8")
        marks = list(_NAME.finditer(text))
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            body = text[m.end() : end].strip()
            if m.group(1) in out:
                raise RuntimeError(f"duplicate query name {m.group(1)!r} in {entry.name}")
            out[m.group(1)] = body
    return out


class _Queries:
    def __init__(self, queries: dict[str, str]) -> None:
        self.__dict__.update(queries)

    def __getattr__(self, name: str) -> str:  # only reached for unknown names
        raise AttributeError(f"no SQL query named {name!r}")


Q = _Queries(_load())
