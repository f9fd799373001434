"""Requests in flight per (organization, Idempotency-Key), shared by every process of a node.

A request carrying an ``Idempotency-Key`` first takes an entry here; a second request with the
same key that arrives while the first is still running -- on any worker of the node -- finds
the entry and is answered 409 at once instead of running the action a second time. The entry
is dropped when the first request has stored its answer (``release`` in a ``finally``).

Only requests with an ``Idempotency-Key`` come here, and they already pay a database lookup,
so this table favours simplicity over speed: every operation takes the region's writer lock
(two ``fcntl`` calls) and nothing is read without it.

Layout (all integers little-endian), at ``offset`` in a region:

    header, 64 bytes
       0 magic    8s  b"rlinfl\\0\\0"
       8 version  u32 1
      12 slots    u32
      16 probe    u32
      24 cleaned  f64 time.time() of the last cleanup of stored keys (see runlater.http.idempotency)
    slot i at 64 + 48*i, 48 bytes
       0 digest   16s BLAKE2b-128 of organization id + key; all zero: free
      16 token    u64 random, identifies one acquisition (release only removes its own entry)
      24 expires  f64 time.monotonic() after which the entry no longer counts
      32 pid      u32 process that holds it
      36-47 unused

Invariants (every read and write holds the writer lock, byte ``offset`` of the region):
  I1. A digest appears at most once among the live entries of its probe window (``probe`` slots
      from digest % slots): ``acquire`` scans the whole window before taking a slot.
  I2. An entry is live while it is not expired and its process exists. A worker that dies
      mid-request (OOM kill, SIGKILL) therefore blocks its key only until someone notices the
      process is gone (checked when a request for the same key finds the entry) or, should the
      pid have been reused, until ``ttl`` passes.
  I3. Free and dead slots are interchangeable and nothing depends on the order of slots in a
      window, so release may simply zero a slot; no tombstones are needed.
Clock: CLOCK_MONOTONIC is system-wide on Linux, so deadlines mean the same to every process.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import time
from collections.abc import Callable
from typing import Final

from runlater.cache.shm import SharedRegion

__all__ = ["InflightFull", "InflightTable"]

_MAGIC: Final = b"rlinfl\0\0"
_VERSION: Final = 1
_HEADER: Final = struct.Struct("<8sIII")
_HEADER_SIZE: Final = 64
_CLEANED_AT: Final = 24
_SLOT: Final = struct.Struct("<16sQdI12x")
_SLOT_SIZE: Final = 48
_F64: Final = struct.Struct("<d")
_FREE: Final = bytes(16)


class InflightFull(RuntimeError):
    """Every slot of the key's probe window holds a live entry of another key."""


class InflightTable:
    def __init__(self, region: SharedRegion, *, slots: int = 4096, probe: int = 16, offset: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if slots < 1 or slots >= 2**31:
            raise ValueError(f"slots must be in 1..2**31-1, got {slots}")
        if not 1 <= probe <= slots:
            raise ValueError(f"probe must be in 1..slots ({slots}), got {probe}")
        if offset < 0 or offset % 64:
            raise ValueError(f"offset must be a non-negative multiple of 64, got {offset}")
        if region.size < offset + self.region_size(slots):
            raise ValueError(f"region of {region.size} bytes is too small: needs {offset + self.region_size(slots)}")
        self._region = region
        self._buf = region.buf
        self._slots = slots
        self._probe = probe
        self._offset = offset
        self._base = offset + _HEADER_SIZE
        self._clock = clock
        self._lock = region.lock(offset)
        self._cleanup_lock = region.lock(offset + 1)
        with self._lock:
            magic, version, stored_slots, stored_probe = _HEADER.unpack_from(self._buf, offset)
            if magic == bytes(8):
                _HEADER.pack_into(self._buf, offset, _MAGIC, _VERSION, slots, probe)
            elif magic != _MAGIC or version != _VERSION:
                raise ValueError(f"region at offset {offset} holds something else ({magic!r})")
            elif (stored_slots, stored_probe) != (slots, probe):
                raise ValueError(f"in-flight table has slots={stored_slots} probe={stored_probe}, "
                                 f"this process asked for slots={slots} probe={probe}")

    @staticmethod
    def region_size(slots: int = 4096) -> int:
        return _HEADER_SIZE + slots * _SLOT_SIZE

    @staticmethod
    def digest(organization: bytes, key: str) -> bytes:
        return hashlib.blake2b(organization + key.encode("utf-8", "surrogatepass"), digest_size=16,
                               person=b"rl-idempotency").digest()

    def acquire(self, digest: bytes, ttl: float) -> tuple[int, int] | None:
        """Take ``digest`` for at most ``ttl`` seconds: a handle for ``release``, or None if a
        live request holds it. Raises ``InflightFull`` when the window has no room."""
        if len(digest) != 16 or digest == _FREE:
            raise ValueError("digest must be 16 bytes, not all zero")
        now = self._clock()
        buf = self._buf
        home = int.from_bytes(digest[:8], "little") % self._slots
        with self._lock:
            free = -1
            index = home
            for _ in range(self._probe):
                at = self._base + index * _SLOT_SIZE
                held, _, expires, pid = _SLOT.unpack_from(buf, at)
                if held == _FREE or expires <= now:
                    if free < 0:
                        free = at
                elif held == digest:
                    if _alive(pid):
                        return None
                    if free < 0:
                        free = at  # its holder died (I2)
                index = index + 1 if index + 1 < self._slots else 0
            if free < 0:
                raise InflightFull(f"no free in-flight slot among {self._probe} for this key")
            token = secrets.randbits(64) or 1
            _SLOT.pack_into(buf, free, digest, token, now + ttl, os.getpid())
            return free, token

    def release(self, handle: tuple[int, int]) -> bool:
        """Drop an entry taken by ``acquire``; False if it had expired and was taken over."""
        at, token = handle
        with self._lock:
            _, held_token, _, _ = _SLOT.unpack_from(self._buf, at)
            if held_token != token:
                return False
            _SLOT.pack_into(self._buf, at, _FREE, 0, 0.0, 0)
            return True

    def held(self, digest: bytes) -> bool:
        """Whether a live entry holds ``digest`` (for tests and diagnostics)."""
        now = self._clock()
        home = int.from_bytes(digest[:8], "little") % self._slots
        with self._lock:
            index = home
            for _ in range(self._probe):
                held, _, expires, pid = _SLOT.unpack_from(self._buf, self._base + index * _SLOT_SIZE)
                if held == digest and expires > now and _alive(pid):
                    return True
                index = index + 1 if index + 1 < self._slots else 0
        return False

    # -- periodic cleanup of stored keys: one process per node at a time --------------------

    def claim_cleanup(self, interval: float, now: float) -> bool:
        """True for exactly one caller per ``interval`` across the node's processes."""
        if not self._cleanup_lock.acquire(blocking=False):
            return False
        try:
            last = _F64.unpack_from(self._buf, self._offset + _CLEANED_AT)[0]
            if now - last < interval:
                return False
            _F64.pack_into(self._buf, self._offset + _CLEANED_AT, now)
            return True
        finally:
            self._cleanup_lock.release()


def _alive(pid: int) -> bool:
    if pid == 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
