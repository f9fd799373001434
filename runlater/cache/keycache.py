"""The API-key cache every HTTP worker authenticates from, shared through memory.

Every request carries ``pk_live_<24>.sk_live_<32>``. The worker looks up the public half
here and compares SHA-256 of the secret with the cached ``key_hash``; PostgreSQL is only
asked on a miss, and the answer (found or not found) is written back for all workers.
Which keys to trust, for how long and what to do on a miss is the caller's policy; this
module only stores and returns what it was given.
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Callable, Iterator
from typing import Final, Literal, NamedTuple
from zlib import crc32

from runlater.cache.shm import SharedRegion

__all__ = ["NEGATIVE", "CachedKey", "KeyCache", "Negative"]


class CachedKey(NamedTuple):
    """What authentication needs about one key, as raw bytes (no per-hit UUID objects).

    Convert with ``uuid.UUID(bytes=...)`` only where a UUID object is really needed.
    """

    api_key_id: bytes  # 16 bytes, api_keys.id
    organization_id: bytes  # 16 bytes
    key_hash: bytes  # 32 bytes, SHA-256 of the secret half
    tier: int  # 0 free, 1 pro, 2 unlimited; stored in one byte


class Negative(enum.Enum):
    """Type of ``NEGATIVE``: the key is known not to exist (cached "not found")."""

    NEGATIVE = "NEGATIVE"

    def __repr__(self) -> str:
        return "NEGATIVE"


NEGATIVE: Final = Negative.NEGATIVE

KEY_ID_MAX: Final = 32  # len("pk_live_") + 24
DEFAULT_SLOTS: Final = 8192
DEFAULT_WINDOW: Final = 8

# Layout --------------------------------------------------------------------------------
#
# All integers little-endian. A cache occupies ``KeyCache.region_size(slots)`` bytes of a
# region starting at ``offset`` (a multiple of 64, so slots are cache-line aligned).
#
#   header, 128 bytes
#     0  magic     8s   b"rlkeyc\0\0"
#     8  version   u32  1
#    12  slot_size u32  128
#    16  slots     u32
#    20  window    u32  probe window length
#    64  gen       u32  generation; clear() increments it (own cache line: read by every get)
#
#   slot i at 128 + 128*i, 128 bytes (two cache lines)
#     0  seq       u64  seqlock counter: odd while a writer is inside the slot; 0 = never written
#     8  gen       u32  header generation when written; any other value reads as empty
#    12  kind      u8   0 empty, 1 positive, 2 negative, 3 tombstone (invalidated)
#    13  tier      u8
#    14  key_len   u8
#    16  expires   f64  time.monotonic() deadline
#    24  key_id    32s  NUL padded, compared together with key_len
#    56  api_key_id 16s
#    72  org_id    16s
#    88  key_hash  32s
#   124  check     u32  CRC-32 of bytes 8..124
#
# Placement: linear probing from crc32(key_id) % slots over at most ``window`` slots (wrapping
# at the end). zlib.crc32 rather than hash(): it is the same in every process, whatever
# PYTHONHASHSEED each was started with, and key ids are random so it spreads them well.
#
# Invariants (kept by writers, which all hold the writer lock):
#   I1. A key appears at most once in its window (put updates in place when it finds it).
#   I2. An entry for key K at probe position p has only non-empty slots of the current
#       generation (live, expired, tombstone or unreadable) at positions < p. put fills the
#       first reusable slot; nothing but clear() ever turns a slot back into "empty", and
#       clear() empties every slot at once. So a reader may stop at the first empty slot,
#       and invalidate() must leave a tombstone rather than an empty slot.
#   I3. Nothing grows and nothing fails for lack of room: when a window has no reusable
#       slot, put evicts in it, negative entries first (so a flood of bad keys displaces
#       other bad keys before it displaces real ones), then the earliest deadline.
#
# Seqlock protocol (readers are lock-free and never write):
#   writer: s = seq (made odd if even); store s; copy bytes 8..128 in one memcpy; store s+1.
#   reader: s1 = seq; odd -> retry; copy bytes 8..128; s2 = seq; s2 != s1 -> retry;
#           then the copy's CRC must verify, else retry. After a bounded number of retries
#           the slot is skipped as unreadable (a miss at worst, and a miss is always safe:
#           the caller asks the database).
#   Passing over a slot that holds another key uses one unverified read of its first 56
#   bytes (seq..key_id). A torn look can only make the reader skip or stop too early, i.e.
#   miss; nothing is ever returned from a slot without the full protocol above.
# Why this is safe under CPython:
#   * Each step above is one C-level memory operation issued while holding the GIL: the
#     8-byte seq store/load is a fixed-size memcpy (struct swaps native code in for "<Q" on
#     little-endian hosts), which compilers emit as a single aligned 8-byte access, atomic on
#     x86-64 and arm64; the body copy is one memcpy (mmap slice). Threads of one process
#     therefore never interleave inside a step, and between processes the seq brackets it.
#   * x86-64 is TSO: stores become visible in program order and loads are not reordered with
#     older loads, so the plain seqlock is exact there.
#   * arm64 may reorder plain loads and plain stores, and Python code has no way to issue
#     the barriers a C seqlock would use. The CRC closes that gap: any snapshot that mixes
#     two versions of a slot fails the check (except with probability 2**-32 per torn copy,
#     which itself needs a writer inside that very slot during the copy).
#   * A writer that dies between its two seq stores leaves the slot odd. Readers skip it;
#     the next put whose window contains it overwrites it (the kernel released the lock).
# Clock: time.monotonic() reads CLOCK_MONOTONIC, which on Linux is one system-wide clock,
# not per process, so a deadline written by one worker means the same instant to all of
# them. (It would not be comparable across machines or time namespaces; neither can share
# this memory with us.)

_MAGIC: Final = b"rlkeyc\0\0"
_VERSION: Final = 1
_HEADER_SIZE: Final = 128
_GEN_OFFSET: Final = 64
_SLOT_SIZE: Final = 128
_BODY_OFFSET: Final = 8  # the body is everything after seq

_HEADER: Final = struct.Struct("<8sIIII")
_U32: Final = struct.Struct("<I")
_SEQ: Final = struct.Struct("<Q")
# seq, gen, kind, key_len, key_id: enough to pass over a slot that is not the one wanted.
_HEAD: Final = struct.Struct("<QIBxBx8x32s")
# Body with its check word (120 bytes) and without it (116 bytes, what the CRC covers).
_BODY: Final = struct.Struct("<IBBBxd32s16s16s32s4xI")
_BODY_DATA: Final = struct.Struct("<IBBBxd32s16s16s32s4x")
assert _BODY.size == _SLOT_SIZE - _BODY_OFFSET and _BODY_DATA.size == _BODY.size - 4

# CRC-32 of (data + its own CRC, little-endian) is this constant for any data, so a body is
# verified with one crc32 call over the whole copy instead of slicing the check word off.
_CRC_RESIDUE: Final = 0x2144DF1C

_EMPTY, _POSITIVE, _NEGATIVE, _TOMBSTONE = 0, 1, 2, 3

# A writer holds a slot for well under a microsecond unless it is descheduled mid-write;
# 64 rereads cover the first case and bound what a reader pays for the second.
_READ_RETRIES: Final = 64

_NO_BYTES_16: Final = bytes(16)
_NO_BYTES_32: Final = bytes(32)

Clock = Callable[[], float]


def _seal(data: bytes) -> bytes:
    return data + crc32(data).to_bytes(4, "little")


class KeyCache:
    """Fixed-size open-addressing hash table of API keys, shared by all processes mapping it.

    ``get`` never locks and never blocks; ``put``, ``put_negative``, ``invalidate`` and
    ``clear`` take the region's writer lock (byte ``offset`` of its file). Layout, invariants
    and the memory-ordering argument are in the comment block above.
    """

    __slots__ = ("_base", "_buf", "_clock", "_gen_offset", "_lock", "_probes", "_region", "_slots", "_window")

    def __init__(
        self,
        region: SharedRegion,
        *,
        slots: int = DEFAULT_SLOTS,
        window: int = DEFAULT_WINDOW,
        offset: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        """Attach to (and on first use, format) the cache at ``offset`` in ``region``.

        Every process must pass the same ``slots`` and ``window``; a mismatch with what the
        first process wrote raises ``ValueError`` instead of silently probing differently.
        ``clock`` must be CLOCK_MONOTONIC in production; tests inject their own.
        """
        if slots < 1 or slots >= 2**32:
            raise ValueError(f"slots must be in 1..2**32-1, got {slots}")
        if not 1 <= window <= slots:
            raise ValueError(f"window must be in 1..slots ({slots}), got {window}")
        if offset < 0 or offset % 64:
            raise ValueError(f"offset must be a non-negative multiple of 64, got {offset}")
        needed = offset + self.region_size(slots)
        if region.size < needed:
            raise ValueError(
                f"region of {region.size} bytes is too small for {slots} slots at offset {offset}: needs {needed}"
            )
        self._region = region
        self._buf = region.buf
        self._slots = slots
        self._window = window
        self._probes = range(window)
        self._base = offset + _HEADER_SIZE
        self._gen_offset = offset + _GEN_OFFSET
        self._clock = clock
        self._lock = region.lock(offset)
        with self._lock:
            self._format_or_check(offset)

    @staticmethod
    def region_size(slots: int = DEFAULT_SLOTS) -> int:
        """Bytes a cache of ``slots`` slots occupies (8192 slots: 1 MiB + 128 bytes)."""
        return _HEADER_SIZE + slots * _SLOT_SIZE

    def _format_or_check(self, offset: int) -> None:
        magic, version, slot_size, slots, window = _HEADER.unpack_from(self._buf, offset)
        if magic == bytes(8):
            # Fresh zero-filled memory: every slot already reads as never-written (seq 0).
            _HEADER.pack_into(self._buf, offset, _MAGIC, _VERSION, _SLOT_SIZE, self._slots, self._window)
            return
        if magic != _MAGIC or version != _VERSION or slot_size != _SLOT_SIZE:
            raise ValueError(
                f"region at offset {offset} holds something else "
                f"(magic {magic!r}, version {version}, slot size {slot_size})"
            )
        if (slots, window) != (self._slots, self._window):
            raise ValueError(
                f"cache in region has slots={slots} window={window}, "
                f"but this process asked for slots={self._slots} window={self._window}"
            )

    # -- reads (lock-free) ------------------------------------------------------------------

    def get(self, key_id: bytes) -> CachedKey | Literal[Negative.NEGATIVE] | None:
        """The cached entry for ``key_id``: a ``CachedKey``, ``NEGATIVE``, or None.

        None means "ask the database": never cached, expired, invalidated, evicted, or the
        slot was being rewritten for longer than a reader is willing to wait.
        """
        n = len(key_id)
        if not 0 < n <= KEY_ID_MAX:
            raise ValueError(f"key id must be 1..{KEY_ID_MAX} bytes, got {n}")
        buf = self._buf
        gen = _U32.unpack_from(buf, self._gen_offset)[0]
        padded = key_id.ljust(KEY_ID_MAX, b"\0")
        slots = self._slots
        index = crc32(key_id) % slots
        seq_at = _SEQ.unpack_from
        head_at = _HEAD.unpack_from
        for _ in self._probes:
            start = self._base + index * _SLOT_SIZE
            # A cheap unverified look decides only to skip this slot or to stop: if it was
            # torn, the worst outcome is a miss, and a miss is always safe. Returning an
            # entry needs the full seqlock read below.
            seq, slot_gen, kind, key_len, key = head_at(buf, start)
            if seq == 0:
                return None  # never written: end of the probe sequence (I2)
            if key != padded or key_len != n:
                if slot_gen != gen or kind == _EMPTY:
                    return None
                index += 1
                if index == slots:
                    index = 0
                continue
            # One optimistic seqlock pass inline (what nearly every read needs); retries
            # live in _read_stable so the common case pays for no retry loop.
            seq = seq_at(buf, start)[0]
            body = buf[start + _BODY_OFFSET : start + _SLOT_SIZE]
            if seq & 1 or seq_at(buf, start)[0] != seq or crc32(body) != _CRC_RESIDUE:
                body = self._read_stable(start)
                if body is None:
                    # Unreadable for now; it may or may not be our key, so keep probing.
                    index += 1
                    if index == slots:
                        index = 0
                    continue
                if not body:
                    return None
            slot_gen, kind, tier, key_len, expires, key, api_key_id, org_id, key_hash, _ = _BODY.unpack(body)
            if slot_gen != gen or kind == _EMPTY:
                return None
            if key == padded and key_len == n and kind != _TOMBSTONE:
                if expires <= self._clock():
                    return None
                if kind == _NEGATIVE:
                    return NEGATIVE
                return tuple.__new__(CachedKey, (api_key_id, org_id, key_hash, tier))
            index += 1
            if index == slots:
                index = 0
        return None

    # -- writes (under the writer lock) -----------------------------------------------------

    def put(self, key_id: bytes, value: CachedKey, ttl: float = 60.0) -> None:
        """Cache ``value`` for ``key_id`` for ``ttl`` seconds, replacing any entry for it."""
        api_key_id, org_id, key_hash, tier = value
        if len(api_key_id) != 16 or len(org_id) != 16 or len(key_hash) != 32:
            raise ValueError(
                "CachedKey needs 16-byte api_key_id and organization_id and a 32-byte key_hash, got "
                f"{len(api_key_id)}, {len(org_id)} and {len(key_hash)} bytes"
            )
        if not 0 <= tier <= 255:
            raise ValueError(f"tier must fit in one byte, got {tier}")
        self._store(key_id, _POSITIVE, tier, ttl, api_key_id, org_id, key_hash)

    def put_negative(self, key_id: bytes, ttl: float = 60.0) -> None:
        """Remember for ``ttl`` seconds that ``key_id`` does not exist."""
        self._store(key_id, _NEGATIVE, 0, ttl, _NO_BYTES_16, _NO_BYTES_16, _NO_BYTES_32)

    def invalidate(self, key_id: bytes) -> bool:
        """Forget ``key_id`` in every process; True if an entry was there."""
        _check_key(key_id)
        with self._lock:
            gen = _U32.unpack_from(self._buf, self._gen_offset)[0]
            for start, slot in self._window_slots(key_id):
                if slot is None:
                    continue
                slot_gen, kind, _, key_len, _, key = slot[:6]
                if slot_gen != gen or kind == _EMPTY:
                    return False
                if kind != _TOMBSTONE and key_len == len(key_id) and key == key_id.ljust(KEY_ID_MAX, b"\0"):
                    # A tombstone, not an empty slot: keys further along must stay reachable (I2).
                    self._write(start, gen, _TOMBSTONE, 0, b"", 0.0, _NO_BYTES_16, _NO_BYTES_16, _NO_BYTES_32)
                    return True
            return False

    def clear(self) -> None:
        """Forget every entry in every process, in O(1): entries of older generations read as empty."""
        with self._lock:
            gen = (_U32.unpack_from(self._buf, self._gen_offset)[0] + 1) & 0xFFFF_FFFF
            if gen == 0:
                # After 2**32 clears, slots written 2**32 generations ago would match again.
                # Rewrite them all as empty, through the seqlock, before reusing the number.
                for i in range(self._slots):
                    self._write(
                        self._base + i * _SLOT_SIZE, 0, _EMPTY, 0, b"", 0.0, _NO_BYTES_16, _NO_BYTES_16, _NO_BYTES_32
                    )
            _U32.pack_into(self._buf, self._gen_offset, gen)

    def _store(
        self, key_id: bytes, kind: int, tier: int, ttl: float, api_key_id: bytes, org_id: bytes, key_hash: bytes
    ) -> None:
        _check_key(key_id)
        if not 0 < ttl < float("inf"):
            raise ValueError(f"ttl must be a positive finite number of seconds, got {ttl}")
        padded = key_id.ljust(KEY_ID_MAX, b"\0")
        with self._lock:
            now = self._clock()
            gen = _U32.unpack_from(self._buf, self._gen_offset)[0]
            target = None  # first reusable slot
            victim = None  # best live entry to evict if nothing is reusable
            victim_rank: tuple[bool, float] = (True, float("inf"))
            for start, slot in self._window_slots(key_id):
                if slot is None:  # a dead writer's half-written slot: the lock says nobody is in it
                    target = start if target is None else target
                    continue
                slot_gen, slot_kind, _, key_len, expires, key = slot[:6]
                if slot_gen != gen or slot_kind == _EMPTY:
                    target = start if target is None else target
                    break  # end of the probe sequence (I2): key_id cannot be further along
                if slot_kind != _TOMBSTONE and key_len == len(key_id) and key == padded:
                    target = start  # update in place (I1)
                    break
                if slot_kind == _TOMBSTONE or expires <= now:
                    target = start if target is None else target
                    continue
                rank = (slot_kind == _POSITIVE, expires)
                if victim is None or rank < victim_rank:
                    victim, victim_rank = start, rank
            if target is None:
                target = victim
            assert target is not None  # window >= 1 and every slot is reusable or a victim
            self._write(target, gen, kind, tier, key_id, now + ttl, api_key_id, org_id, key_hash)

    def _window_slots(self, key_id: bytes) -> Iterator[tuple[int, tuple | None]]:
        """(offset, unpacked body or None if unreadable) along key_id's probe window.

        Only called with the writer lock held, so no live writer can be inside a slot and a
        single read is enough; an odd seq or a bad CRC means a writer died there.
        """
        buf = self._buf
        index = crc32(key_id) % self._slots
        for _ in range(self._window):
            start = self._base + index * _SLOT_SIZE
            seq = _SEQ.unpack_from(buf, start)[0]
            if seq == 0:
                yield start, (0, _EMPTY, 0, 0, 0.0, b"")
            else:
                body = buf[start + _BODY_OFFSET : start + _SLOT_SIZE]
                yield start, (_BODY.unpack(body) if seq & 1 == 0 and crc32(body) == _CRC_RESIDUE else None)
            index = index + 1 if index + 1 < self._slots else 0

    def _write(
        self,
        start: int,
        gen: int,
        kind: int,
        tier: int,
        key_id: bytes,
        expires: float,
        api_key_id: bytes,
        org_id: bytes,
        key_hash: bytes,
    ) -> None:
        body = _seal(_BODY_DATA.pack(gen, kind, tier, len(key_id), expires, key_id, api_key_id, org_id, key_hash))
        buf = self._buf
        seq = _SEQ.unpack_from(buf, start)[0]
        seq |= 1  # odd: "writer inside". Already odd only if a writer died here.
        _SEQ.pack_into(buf, start, seq)
        buf[start + _BODY_OFFSET : start + _SLOT_SIZE] = body
        _SEQ.pack_into(buf, start, seq + 1)

    # -- introspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Slot counts by state, for metrics and tests. Lock-free, so only approximately
        consistent while writers are active: ``positive``, ``negative``, ``expired``,
        ``tombstone``, ``empty``, ``unreadable``."""
        counts = dict.fromkeys(("positive", "negative", "expired", "tombstone", "empty", "unreadable"), 0)
        for _, entry in self._entries():
            counts[entry] += 1
        return counts

    def _entries(self) -> Iterator[tuple[bytes, str]]:
        # (key_id, state) for every slot; key_id is b"" when the slot holds no key.
        buf = self._buf
        gen = _U32.unpack_from(buf, self._gen_offset)[0]
        now = self._clock()
        for i in range(self._slots):
            start = self._base + i * _SLOT_SIZE
            body = self._read_stable(start)
            if body is None:
                yield b"", "unreadable"
                continue
            if body == b"":
                yield b"", "empty"
                continue
            slot_gen, kind, _, key_len, expires, key = _BODY.unpack(body)[:6]
            if slot_gen != gen or kind == _EMPTY:
                yield b"", "empty"
            elif kind == _TOMBSTONE:
                yield b"", "tombstone"
            elif expires <= now:
                yield key[:key_len], "expired"
            else:
                yield key[:key_len], "positive" if kind == _POSITIVE else "negative"

    def _read_stable(self, start: int) -> bytes | None:
        # The get() read loop for one slot: body, b"" if never written, None if unreadable.
        buf = self._buf
        for _ in range(_READ_RETRIES):
            seq = _SEQ.unpack_from(buf, start)[0]
            if seq & 1:
                continue
            if seq == 0:
                return b""
            body = buf[start + _BODY_OFFSET : start + _SLOT_SIZE]
            if _SEQ.unpack_from(buf, start)[0] == seq and crc32(body) == _CRC_RESIDUE:
                return body
        return None

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def region(self) -> SharedRegion:
        return self._region


def _check_key(key_id: bytes) -> None:
    if not 0 < len(key_id) <= KEY_ID_MAX:
        raise ValueError(f"key id must be 1..{KEY_ID_MAX} bytes, got {len(key_id)}")
