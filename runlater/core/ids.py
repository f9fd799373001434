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
# Random bits come from the OS CSPRNG in 4 KiB refills rather than one system call per
# id: ids are minted on every create, and a getrandom() call cost more than the rest
# of the id put together. Reset after fork so children never share a buffer.
_RANDOM_REFILL = 4096
_random = b""
_random_at = _RANDOM_REFILL


def _reset_after_fork() -> None:
    global _random, _random_at
    _random, _random_at = b"", _RANDOM_REFILL


os.register_at_fork(after_in_child=_reset_after_fork)


def _random8() -> int:
    global _random, _random_at
    if _random_at >= _RANDOM_REFILL:
        _random, _random_at = os.urandom(_RANDOM_REFILL), 0
    at = _random_at
    _random_at = at + 8
    return int.from_bytes(_random[at : at + 8], "big")


def uuid7_int() -> int:
    global _last_ms, _counter
    ms = time.time_ns() // 1_000_000
    rand = _random8()
    if ms > _last_ms:
        _last_ms = ms
        _counter = rand >> 54  # 10 random bits: headroom before the 12-bit counter overflows
    else:
        _counter += 1
        if _counter > 0xFFF:  # more than ~3,000 ids in one ms: borrow the next millisecond
            _last_ms += 1
            _counter = 0
        ms = _last_ms
    return (ms << 80) | (0x7 << 76) | (_counter << 64) | (0b10 << 62) | (rand & 0x3FFF_FFFF_FFFF_FFFF)


def uuid7_bytes() -> bytes:
    return uuid7_int().to_bytes(16, "big")


def uuid7_str() -> str:
    """The canonical text form, built without a ``uuid.UUID`` object (hot path)."""
    h = "%032x" % uuid7_int()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7() -> uuid.UUID:
    return uuid.UUID(int=uuid7_int())


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


# Byte maps that set the version nibble (7) and the variant bits (10) of a UUID byte.
_VERSION_7 = bytes(0x70 | (b & 0x0F) for b in range(256))
_VARIANT_10 = bytes(0x80 | (b & 0x3F) for b in range(256))


def uuid7_hex_bulk(n: int) -> list[str]:
    """``n`` UUIDv7 ids (RFC 9562: 48-bit Unix milliseconds, version, random bits) as
    32 hex digits.

    Made in bulk, with byte-slice operations over one ``os.urandom`` buffer: a tick of
    100,000 executions spends a few hundredths of a second here, where ``uuid7()`` per
    row costs about a second and a uuid function per row in SQL more. Ids of one batch
    share their millisecond and are not ordered among themselves (``uuid7()``'s
    in-process counter orders ids of one process); nothing relies on that order.
    """
    if n <= 0:
        return []
    buf = bytearray(os.urandom(16 * n))
    ms = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    for k in range(6):
        buf[k::16] = ms[k : k + 1] * n
    buf[6::16] = buf[6::16].translate(_VERSION_7)
    buf[8::16] = buf[8::16].translate(_VARIANT_10)
    text = buf.hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]
