"""Time-ordered identifiers (UUID version 7, RFC 9562).

Ids are generated in-process without a database round trip. Within one process they
are strictly increasing: the 12-bit ``rand_a`` field carries a counter that is reseeded
every millisecond, so ids created in the same millisecond still sort in creation order,
which keeps B-tree inserts on the primary key append-only.
"""

from __future__ import annotations

import os
import time
import uuid

_last_ms = 0
_counter = 0


def uuid7_bytes() -> bytes:
    global _last_ms, _counter
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _last_ms = ms
        _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave headroom before overflow
    else:
        _counter += 1
        if _counter > 0xFFF:  # more than ~3,000 ids in one ms: borrow the next millisecond
            _last_ms += 1
            _counter = 0
        ms = _last_ms
    rand_b = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (_counter << 64) | (0b10 << 62) | rand_b
    return value.to_bytes(16, "big")


def uuid7() -> uuid.UUID:
    return uuid.UUID(bytes=uuid7_bytes())


def parse_uuid(text: str) -> uuid.UUID | None:
    """Accept the canonical 36-character form or 32 hex digits (as upstream does); else None."""
    n = len(text)
    if n == 36:
        if text[8] != "-" or text[13] != "-" or text[18] != "-" or text[23] != "-":
            return None
    elif n != 32:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
