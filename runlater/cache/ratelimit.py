"""A node's limit counters in shared memory: API request rates and monthly execution quotas.

Every HTTP worker of a node counts into the same tables, so a limit holds for the node as a
whole, not per process. Two tables share one design:

* ``RateCounters``: requests per identity (an API key or a client IP) per time window, read as
  a sliding window (this window's count plus the previous window's, weighted by how much of it
  still overlaps the last ``window`` seconds).
* ``QuotaCounters``: executions created per organization per calendar month (UTC), on top of a
  base that the owner of the table refreshes from the database.

The problem both solve: CPython has no atomic add on shared memory, and a lock costs two
``fcntl`` system calls (1-2 µs on bare metal, ~7 µs in this project's benchmark VM), which the
rate limiter cannot pay on every request. So:

* **One column per process.** Each process that counts holds a column (see "Columns" below);
  every slot has one cell per column and a cell is written only by its column's owner. Writes
  therefore never race and a count is never lost; a reader sums the cells of all columns.
* **Increment first, then read.** A process publishes its increment, then reads the total,
  which includes its own increment and every increment published before its read. For any
  two admissions, the one that read last saw the other, so more than ``limit`` admissions
  would need the last of them to have read a total above ``limit`` -- and it would have
  refused. A refusal takes the increment back (the cell is the process's own).
* **A lock near the limit, none elsewhere.** An increment that is taken back was briefly
  visible, and could make another process refuse although the limit was not reached. So an
  admission goes through three doors, decided by a plain read of the total first:
    - already at the limit: refuse without writing anything (no lock);
    - far from the limit (at least ``margin`` below it): increment, read again, admit if
      still that far, else take the increment back and fall through (no lock);
    - near the limit: under the table's writer lock, increment, read, admit or take back.
  Processes near the limit are serialised, and see no transient increments (those only
  happen far below the limit), so the limit is reached exactly -- neither exceeded nor
  refused early. A hammering client's refused requests pay one read and no lock; at most
  ``margin`` requests per identity and window take the lock.
* Why ``margin`` is needed at all: the far-from-limit path has no lock, hence no memory
  barrier; on x86-64 (TSO) a store can still sit in the writing core's store buffer while
  that core reads other cells. At most one increment per process can be unpublished that
  way, for far less than a microsecond, so ``margin`` (two per column, plus slack) absorbs
  every increment a fast-path reader may not see yet. On arm64 plain loads may also be
  reordered; the same bound holds because each step below is a separate C call with many
  instructions in between, but this is a practical argument, not a proof: the exactness
  guarantee is "exact on x86-64, within ``margin`` elsewhere".

Columns
    Column ``c`` of a table belongs to whichever process holds an ``fcntl`` lock on byte
    ``offset + 8 + c`` of its region. The kernel releases it when the process dies, so a
    replacement worker takes over a dead one's column -- and its counts, which stay valid
    (they are counts of requests that were really served). Processes take the lowest free
    column; ``high_water`` in the header (only grows, written under the writer lock) is one
    past the highest column ever taken, and readers sum only that many cells. Tables must
    be created with enough columns for every process that may count at once, including
    workers draining after a reload (the server uses ``2 * http_workers + 2``).
    ``fcntl`` locks are not inherited by ``fork()``; a child forgets the parent's column and
    takes its own on first use.

Memory model of a cell
    A cell is one aligned 8-byte word read and written through a ``memoryview`` cast to
    ``Q`` (native byte order; shared memory never leaves the machine). CPython copies such an
    item with a fixed-size ``memcpy`` that compilers emit as one 8-byte access, atomic on
    x86-64 and arm64, so a reader sees a cell's old or new value, never a mix. Several cells
    are not read as one snapshot; every argument below holds cell by cell.

Slot placement
    Open addressing: an identity's slot is found by probing ``probe`` slots from
    ``hash % slots``. Slots are claimed (and reused) only under the writer lock. A slot may be
    reused for another identity only when it is *stale*: none of its cells can count in the
    current period any more (rate: no cell of the last two windows; quota: nothing of the
    current month). When an identity finds no slot, the caller decides (the rate limiter
    lets the request through and logs; the quota path answers 503 and logs).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Final

from runlater.cache.shm import RegionLock, SharedRegion

__all__ = ["NoFreeColumn", "QuotaCounters", "RateCounters", "identity_tag", "month_bounds", "month_index"]


class NoFreeColumn(RuntimeError):
    """Every column of a table is held by a live process."""


# Header, 128 bytes, shared by both tables (all integers little-endian):
#    0 magic      8s
#    8 version    u32
#   12 slots      u32
#   16 columns    u32
#   20 probe      u32
#   24 slot_words u32   8-byte words per slot
#   28 param      u32   table-specific (rate: window in ms; quota: 0)
#   64 high_water u64   one past the highest column ever claimed (own cache line: read by every hit)
#   72 loaded     u64   quota: 1 once the base was loaded from the database
#   80 refreshed  f64   quota: time.time() of the last successful refresh
#   88 reset_for  u64   quota: month index the database's monthly counters were last reset for
_HEADER: Final = struct.Struct("<8sIIIIII")
_HEADER_SIZE: Final = 128
_HW_WORD: Final = 8  # word index of high_water
_LOADED_WORD: Final = 9
_REFRESHED_AT: Final = 80
_RESET_WORD: Final = 11
_F64: Final = struct.Struct("<d")
_VERSION: Final = 1

_TABLE_LOCK: Final = 0  # lock byte (relative to the table's offset): claims, near-limit admissions
_REFRESH_LOCK: Final = 1  # quota: held by the process refreshing from the database
_COLUMN_LOCKS: Final = 8  # + column index

# Lock bytes of every column this process holds, per region, so two tables on one region in
# one process never share a column: a process's second try-lock on a byte it holds "succeeds".
_held_columns: weakref.WeakKeyDictionary[SharedRegion, set[int]] = weakref.WeakKeyDictionary()
_live_tables: weakref.WeakSet[_SharedCounters] = weakref.WeakSet()


def _forget_columns_in_child() -> None:
    _held_columns.clear()
    for table in list(_live_tables):
        table._forget_column()


os.register_at_fork(after_in_child=_forget_columns_in_child)


class _SharedCounters:
    """Layout, column ownership and slot placement common to both tables."""

    _MAGIC: bytes = b""
    _KEY_WORDS: int = 1
    _EXTRA_WORDS: int = 0
    _CELL_WORDS: int = 1

    def __init__(self, region: SharedRegion, *, slots: int, columns: int, probe: int, offset: int,
                 param: int) -> None:
        if slots < 1 or slots >= 2**31:
            raise ValueError(f"slots must be in 1..2**31-1, got {slots}")
        if not 1 <= columns <= 4096:
            raise ValueError(f"columns must be in 1..4096, got {columns}")
        if not 1 <= probe <= slots:
            raise ValueError(f"probe must be in 1..slots ({slots}), got {probe}")
        if offset < 0 or offset % 64:
            raise ValueError(f"offset must be a non-negative multiple of 64, got {offset}")
        size = self.region_size(slots, columns)
        if region.size < offset + size:
            raise ValueError(f"region of {region.size} bytes is too small: needs {offset + size}")
        self._region = region
        self._slots = slots
        self._columns = columns
        self._probe = probe
        self._offset = offset
        self._slot_words = self._words_per_slot(columns)
        self._mv = memoryview(region.buf)[offset:offset + size].cast("Q")
        self._base = _HEADER_SIZE // 8
        self._lock = region.lock(offset + _TABLE_LOCK)
        self._column = -1
        self._column_lock: RegionLock | None = None
        with self._lock:
            self._format_or_check(param)
        _live_tables.add(self)
        self._claim_column()

    @classmethod
    def _words_per_slot(cls, columns: int) -> int:
        words = cls._KEY_WORDS + cls._EXTRA_WORDS + cls._CELL_WORDS * columns
        return (words + 7) // 8 * 8  # whole cache lines

    @classmethod
    def region_size(cls, slots: int, columns: int) -> int:
        return _HEADER_SIZE + slots * cls._words_per_slot(columns) * 8

    def _format_or_check(self, param: int) -> None:
        buf, at = self._region.buf, self._offset
        magic, version, slots, columns, probe, slot_words, stored_param = _HEADER.unpack_from(buf, at)
        mine = (self._slots, self._columns, self._probe, self._slot_words, param)
        if magic == bytes(8):
            _HEADER.pack_into(buf, at, self._MAGIC, _VERSION, *mine)
            return
        if magic != self._MAGIC or version != _VERSION:
            raise ValueError(f"region at offset {at} holds something else ({magic!r} v{version})")
        if (slots, columns, probe, slot_words, stored_param) != mine:
            raise ValueError(f"table in region has slots={slots} columns={columns} probe={probe} "
                             f"param={stored_param}; this process asked for {mine}")

    # -- columns ------------------------------------------------------------------------------

    def _claim_column(self) -> None:
        region = self._region
        held = _held_columns.setdefault(region, set())
        for c in range(self._columns):
            byte = self._offset + _COLUMN_LOCKS + c
            if byte in held:
                continue
            lock = region.lock(byte)
            if lock.acquire(blocking=False):
                held.add(byte)
                self._column, self._column_lock = c, lock
                with self._lock:
                    self._mv[_HW_WORD] = max(self._mv[_HW_WORD], c + 1)
                self._column_changed()
                return
        raise NoFreeColumn(f"all {self._columns} columns of the shared counters are held by live processes")

    def _forget_column(self) -> None:
        # In a forked child: the parent's lock is not ours; take a column of our own on next use.
        self._column, self._column_lock = -1, None
        self._column_changed()

    def _column_changed(self) -> None:
        """Subclasses drop whatever they cached that depends on the column."""

    @property
    def column(self) -> int:
        return self._column

    def close(self) -> None:
        """Give the column back and release the view (call before closing the region)."""
        if self._column_lock is not None:
            _held_columns.get(self._region, set()).discard(self._offset + _COLUMN_LOCKS + self._column)
            self._column_lock.release()
            self._column_lock = None
        self._column = -1
        self._mv.release()

    # -- slots --------------------------------------------------------------------------------

    def _home(self, key: tuple[int, ...]) -> int:
        return key[-1] % self._slots

    def _slot_q(self, index: int) -> int:
        return self._base + index * self._slot_words

    def _find(self, key: tuple[int, ...]) -> int:
        """Word index of ``key``'s slot, or -1. Lock-free; a torn key word just misses."""
        mv, k = self._mv, self._KEY_WORDS
        index = self._home(key)
        for _ in range(self._probe):
            q = self._slot_q(index)
            if tuple(mv[q:q + k]) == key:
                return q
            index = index + 1 if index + 1 < self._slots else 0
        return -1

    def _find_or_claim(self, key: tuple[int, ...], period: int) -> int:
        """Word index of ``key``'s slot, claiming one if needed; -1 when its window is full."""
        q = self._find(key)
        if q >= 0:
            return q
        with self._lock:
            return self._claim_locked(key, period)

    def _claim_locked(self, key: tuple[int, ...], period: int) -> int:
        mv, k = self._mv, self._KEY_WORDS
        index = self._home(key)
        reusable = -1
        for _ in range(self._probe):
            q = self._slot_q(index)
            held = tuple(mv[q:q + k])
            if held == key:
                return q
            if reusable < 0 and (not any(held) or self._stale(q, period)):
                reusable = q
            index = index + 1 if index + 1 < self._slots else 0
        if reusable < 0:
            return -1
        self._init_slot(reusable, period)
        # The key last: a lock-free reader that matches it finds the slot's fields in place.
        for i, word in enumerate(key):
            mv[reusable + i] = word
        return reusable

    def _stale(self, q: int, period: int) -> bool:
        raise NotImplementedError

    def _init_slot(self, q: int, period: int) -> None:
        """Reset the slot's shared fields (not its cells: those belong to their columns)."""

    def _columns_in_use(self) -> int:
        return self._mv[_HW_WORD]


# -- request rates -----------------------------------------------------------------------------
#
# Slot (words): tag | cur[0] prev[0] | cur[1] prev[1] | ...   (rounded up to a cache line)
#   tag      u64  8-byte BLAKE2b of the identity (never 0: 0 marks an empty slot)
#   cur[c]   u64  window << 32 | count: requests column c admitted in window ``window``
#                 (window = floor(time / window_seconds): below 2**32 until 2106)
#   prev[c]  u64  count column c admitted in window cur[c].window - 1 (0 if it skipped it)
# Pairs are interleaved so that one slice of the view reads every cell in use.
#
# Invariants:
#   R1. Only column c's owner writes cur[c] and prev[c]. Rolling into a new window it writes
#       prev[c] first, then cur[c]: a reader in between sees the old count twice (once as
#       cur of the previous window, once as a prev it ignores) -- never less than the truth.
#   R2. For window t, a reader counts cur[c] when cur[c].window == t (and then prev[c] as
#       window t-1), or counts cur[c] as window t-1 when cur[c].window == t-1. Older and newer
#       cells count for nothing, so nobody ever has to clear a cell.
#   R3. Only admitted requests are counted: a refused increment is taken back by its writer
#       (its cell then reads as window t with one request fewer, which counts the same).
#   R4. The tag is written only under the writer lock, and only into an empty or stale slot
#       (no cur cell of window t or t-1). After incrementing, a hit re-reads the tag; if the
#       slot was re-tagged meanwhile, it takes its increment back and looks up again.
#   R5. Leases. Far from the limit (see ``lease_min_limit`` and ``lease_headroom``), the
#       lock-free door may count ``lease`` requests at once instead of one; the process then
#       admits the next lease-1 requests of that identity in that window from a counter of its
#       own, without touching shared memory. Leased requests are counted before they are
#       admitted, so every argument above still holds (a lease can only make counts higher).
#       Unused leases are given back (their owner decrements its cell) when the window ends
#       and every ``RateCounters.return_leases`` call (the server calls it twice a second), so
#       a request near the limit is refused early because of someone else's unused lease only
#       within that half second, and only when the limit is large (a lease is granted only if
#       every column's unused lease together is at most 1% of the limit). Small limits (the
#       free tier's 600) never use leases and are exact.

_COUNT: Final = 0xFFFF_FFFF


def identity_tag(kind: bytes, identity: bytes) -> int:
    """Stable 64-bit tag of an identity (the same in every process, unlike ``hash()``)."""
    tag = int.from_bytes(hashlib.blake2b(identity, digest_size=8, person=kind).digest(), "little")
    return tag or 1


class RateCounters(_SharedCounters):
    """Sliding-window request counters shared by every process that maps the region.

    ``entry(tag)`` places an identity (once per process; keep the result) and ``hit(entry,
    limit, now)`` counts one request, returning None when admitted or the seconds until a
    request would be admitted again.
    """

    _MAGIC = b"rlrate\0\0"
    _KEY_WORDS = 1
    _EXTRA_WORDS = 0
    _CELL_WORDS = 2

    def __init__(self, region: SharedRegion, *, slots: int = 16384, columns: int = 8, probe: int = 8,
                 window: float = 60.0, offset: int = 0, lease: int = 16) -> None:
        if not 1 <= window <= 86400:
            raise ValueError(f"window must be within 1..86400 seconds, got {window}")
        self.window = window
        super().__init__(region, slots=slots, columns=columns, probe=probe, offset=offset,
                         param=round(window * 1000))
        self._buf = region.buf
        # One unpack per slot read; which one depends on how many columns are in use (R2).
        self._readers = [struct.Struct(f"<{1 + 2 * n}Q").unpack_from for n in range(columns + 1)]
        # See the module docstring: more than every column's possible unpublished increment.
        self.margin = 2 * columns + 2
        # R5: leases only where all columns' unused leases are <= 1% of the limit, and only
        # while every column could take one more and stay below the lock-free door's bound.
        self.lease = max(1, lease)
        self.lease_min_limit = 100 * columns * self.lease if self.lease > 1 else 2**63
        self.lease_headroom = 2 * columns * self.lease + self.margin
        self._leased: dict[int, list] = {}  # id(entry) -> entry holding an unused lease

    def _stale(self, q: int, t: int) -> bool:
        mv = self._mv
        for c in range(self._columns_in_use()):
            w = mv[q + 1 + 2 * c] >> 32
            if w == t or w == t - 1:
                return False
        return True

    def window_of(self, now: float) -> int:
        return int(now // self.window)

    def entry(self, tag: int, now: float) -> list | None:
        """Where ``tag`` is counted, or None if no slot is free. Keep it: placing takes a lock.

        [slot word, own cur-cell word, tag, own cur-cell index in a slot read, slot byte offset,
         unused leased requests, end of the lease's window]
        """
        if self._column < 0:
            self._claim_column()
        q = self._find_or_claim((tag,), self.window_of(now))
        if q < 0:
            return None
        return [q, q + 1 + 2 * self._column, tag, 1 + 2 * self._column, self._offset + 8 * q, 0, 0.0]

    def _read_slot(self, at: int) -> tuple[int, ...]:
        """(tag, cur[0], prev[0], ...) for every column in use, in one ``unpack_from``."""
        return self._readers[self._mv[_HW_WORD]](self._buf, at)

    def hit(self, e: list, limit: int, now: float) -> float | None:
        """Count one request of ``e``'s identity; None if admitted, else seconds to wait.

        Runs before every request: the common case (a leased request) returns after two
        comparisons; the shared-memory reads below happen once per lease.
        """
        if e[5]:
            if now < e[6]:
                e[5] -= 1  # R5: counted already
                return None
            self._return_lease(e)
        mv = self._mv
        q, own, tag, oi, at = e[0], e[1], e[2], e[3], e[4]
        t = int(now // self.window)  # < 2**32 for any window >= 1 s until 2106
        weight = t + 1 - now / self.window  # share of the previous window still inside
        before = t - 1
        readers, buf = self._readers, self._buf
        # Door 1: a plain read. Over the limit: refuse, having written nothing.
        cells = readers[mv[_HW_WORD]](buf, at)
        if cells[0] != tag:
            return self._moved(e, limit, now)
        cur, prev = _totals(cells, t)
        est = cur + prev * weight
        if est + 1 > limit:
            return self._wait(cur, prev, weight, limit)
        if est + 1 <= limit - self.margin:
            # Door 2: far from the limit. Publish the increment (R1), then check again.
            k = self.lease if limit >= self.lease_min_limit and est + self.lease_headroom <= limit else 1
            old = cells[oi]
            if old >> 32 == t:
                mv[own] = old + k
            else:
                mv[own + 1] = old & _COUNT if old >> 32 == before else 0
                mv[own] = t << 32 | k
            cells = readers[mv[_HW_WORD]](buf, at)
            cur, prev = _totals(cells, t)
            if cells[0] != tag:
                mv[own] -= k  # R3/R4: reads the same as before the increment
                return self._moved(e, limit, now)
            if cur + prev * weight <= limit - self.margin:
                if k > 1:
                    e[5] = k - 1
                    e[6] = (t + 1) * self.window
                    self._leased[id(e)] = e
                return None
            mv[own] -= k
        # Door 3: near the limit, one process at a time.
        with self._lock:
            _bump(mv, own, t)
            cur, prev = _totals(self._read_slot(at), t)
            if mv[q] == tag and cur + prev * weight <= limit:
                return None
            mv[own] -= 1
        if mv[q] != tag:
            return self._moved(e, limit, now)
        return self._wait(cur - 1, prev, weight, limit)

    def _return_lease(self, e: list) -> None:
        left, e[5] = e[5], 0
        self._leased.pop(id(e), None)
        if not left:
            return
        mv = self._mv
        # Only while the cell still counts the lease's window for this identity (R4, R1): after
        # a rollover the leased requests are in prev, where they only ever overstate.
        if mv[e[0]] == e[2] and mv[e[1]] >> 32 == round(e[6] / self.window) - 1:
            mv[e[1]] -= left

    def return_leases(self) -> int:
        """Give back every unused lease of this process (R5); returns how many entries had one."""
        held = list(self._leased.values())
        for e in held:
            self._return_lease(e)
        return len(held)

    def _moved(self, e: list[int], limit: int, now: float) -> float | None:
        # Our slot was re-tagged (our identity had been idle for two windows): place it again.
        fresh = self.entry(e[2], now)
        if fresh is None:
            return None  # no room: admit uncounted (the caller logs table pressure)
        e[:] = fresh
        return self.hit(e, limit, now)

    def _wait(self, cur: int, prev: int, weight: float, limit: int) -> float:
        """Seconds until one more request fits, if no other request is admitted meanwhile."""
        w = self.window
        frac = 1.0 - weight
        if cur + 1 <= limit and prev > 0:
            # Later in this window, once the previous window weighs little enough.
            at = 1.0 - (limit - 1 - cur) / prev
            wait = (at - frac) * w
        else:
            # In the next window, where this window's count becomes the weighted one.
            at = 1.0 - (limit - 1) / cur if cur > 0 else 0.0
            wait = (1.0 - frac + max(at, 0.0)) * w
        return max(wait, 0.001)

    def counts(self, tag: int, now: float) -> tuple[int, int]:
        """(this window, previous window) counts for ``tag``; (0, 0) if it has no slot. For tests."""
        q = self._find((tag,))
        if q < 0:
            return 0, 0
        return _totals(self._read_slot(self._offset + 8 * q), self.window_of(now))


def _bump(mv: memoryview, own: int, t: int) -> None:
    """Add one request of window ``t`` to this process's cell (R1: prev first)."""
    old = mv[own]
    if old >> 32 == t:
        mv[own] = old + 1
    else:
        mv[own + 1] = old & _COUNT if old >> 32 == t - 1 else 0
        mv[own] = t << 32 | 1


def _totals(cells: tuple[int, ...], t: int) -> tuple[int, int]:
    """(count in window t, count in window t-1) from a slot read (R2)."""
    cur = prev = 0
    it = iter(cells)
    next(it)  # the tag
    for c in it:
        p = next(it)
        w = c >> 32
        if w == t:
            cur += c & _COUNT
            prev += p
        elif w == t - 1:
            prev += c & _COUNT
    return cur, prev


# -- monthly execution quotas -------------------------------------------------------------------
#
# Slot (words): org_hi | org_lo | offset | flushed | cell[0..columns)   (rounded up to a cache line)
#   org_hi/lo  the organization's UUID as two u64 (never both 0: that marks an empty slot)
#   offset     month << 48 | (base + 2**47): usage = base + sum of this month's cells
#   flushed    month << 48 | sum of this month's cells already added to the database
#   cell[c]    month << 48 | executions column c admitted this month (cumulative)
#
# Invariants:
#   Q1. Only column c's owner writes cell[c]; a cell of another month counts as 0 and its owner
#       restarts it at the new month. Cells only grow, except when their owner takes back an
#       increment it just made (a refused admission).
#   Q2. offset and flushed are written by the refreshing process only (at most one per node at
#       a time, under the refresh lock) and by a claim of a fresh slot (under the writer lock).
#       offset is one word, so a reader sees a whole base; a base of another month reads as 0.
#   Q3. The refresher sends sum(cells) - flushed to the database, gets back the organization's
#       total usage U (every node's flushed counts, or the executions the executor counted,
#       whichever is larger), then writes flushed := S and offset := U - S, where S is the cell
#       sum it sent. A reader's usage is then U + (cells admitted since) -- this node's
#       unflushed executions are never missing from it. A reader that still sees the previous
#       offset sees older database totals plus everything admitted since the previous flush.
#   Q4. An organization without a slot had no usage this month at the last refresh. The
#       refresher claims a slot for every organization the database reports usage for, so an
#       admission may start from 0 when it finds none (other nodes' usage arrives with the next
#       refresh). Until the first refresh has loaded the table (``loaded``), admissions refuse.
#   Q5. A slot is reusable only when nothing in it belongs to the current month.
#   Q6. Leases, as R5 for rates: far from the limit, an admission may count ``lease`` more
#       executions than it creates and let its process admit that many later without touching
#       shared memory; unused leases are given back by ``return_leases`` (twice a second in the
#       server) and at the end of the month. Granted only when every column's unused lease
#       together is at most 1% of the limit (so never for the free tier's 10,000). A refresh
#       that runs while a lease is out adds it to the database's count; the refresh after its
#       return sends the difference back (a negative delta).

_MONTH_SHIFT: Final = 48
_VALUE: Final = (1 << 48) - 1
_BIAS: Final = 1 << 47


def month_index(now: float) -> int:
    """Months since year 0 (UTC) of a ``time.time()`` value: year * 12 + month - 1."""
    tm = time.gmtime(now)
    return tm.tm_year * 12 + tm.tm_mon - 1


def month_bounds(index: int) -> tuple[float, float]:
    """(start, end) of a month index as epoch seconds, UTC."""
    import calendar

    year, month0 = divmod(index, 12)
    start = calendar.timegm((year, month0 + 1, 1, 0, 0, 0))
    year2, month2 = divmod(index + 1, 12)
    end = calendar.timegm((year2, month2 + 1, 1, 0, 0, 0))
    return float(start), float(end)


def _org_words(org: uuid.UUID) -> tuple[int, int]:
    value = org.int
    return value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF


class QuotaCounters(_SharedCounters):
    """Per-organization monthly execution counts, with a database base kept by a refresher.

    ``consume(entry, count, limit, month)`` is the admission; ``collect``/``apply`` are the two
    halves of a refresh around one database round trip (see ``runlater.http.limits``).
    """

    _MAGIC = b"rlquota\0"
    _KEY_WORDS = 2
    _EXTRA_WORDS = 2
    _CELL_WORDS = 1

    def __init__(self, region: SharedRegion, *, slots: int = 8192, columns: int = 8, probe: int = 32,
                 offset: int = 0, max_step: int = 1000, lease: int = 64,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(region, slots=slots, columns=columns, probe=probe, offset=offset, param=0)
        self._clock = clock
        self._buf = region.buf
        self._refresh_lock = region.lock(offset + _REFRESH_LOCK)
        # One unpack per slot read: org_hi, org_lo, offset, flushed, then the cells in use.
        self._readers = [struct.Struct(f"<{4 + n}Q").unpack_from for n in range(columns + 1)]
        # Admissions of up to max_step executions at once (plus a lease) take the lock-free door
        # only this far below the limit (see the module docstring); larger ones take the lock.
        self.max_step = max_step
        self.lease = max(0, lease)
        self.margin = (columns + 1) * (max_step + self.lease)
        self.lease_min_limit = 100 * columns * self.lease if self.lease else 2**63
        self._leased: dict[int, list] = {}

    def _home(self, key: tuple[int, ...]) -> int:
        return (key[0] ^ key[1]) % self._slots

    def _stale(self, q: int, month: int) -> bool:
        mv = self._mv
        if mv[q + 2] >> _MONTH_SHIFT == month:
            return False
        return all(mv[q + 4 + c] >> _MONTH_SHIFT != month for c in range(self._columns_in_use()))

    def _init_slot(self, q: int, month: int) -> None:
        self._mv[q + 2] = month << _MONTH_SHIFT | _BIAS
        self._mv[q + 3] = month << _MONTH_SHIFT

    @property
    def loaded(self) -> bool:
        return self._mv[_LOADED_WORD] != 0

    def entry(self, org: uuid.UUID, month: int) -> list | None:
        """Where ``org`` is counted, or None when no slot is free. Keep it: placing may lock.

        [slot word, own cell word, org_hi, org_lo, slot byte offset, unused lease, lease month]
        """
        if self._column < 0:
            self._claim_column()
        key = _org_words(org)
        q = self._find_or_claim(key, month)
        if q < 0:
            return None
        return [q, q + 4 + self._column, key[0], key[1], self._offset + 8 * q, 0, -1]

    def usage(self, e: list, month: int) -> int:
        return _usage(self._readers[self._mv[_HW_WORD]](self._buf, e[4]), month)

    def consume(self, e: list, count: int, limit: int, month: int) -> bool | None:
        """Admit ``count`` executions against ``limit``: True, False (over), or None when the
        slot now belongs to someone else (look the organization up again)."""
        if e[5]:
            if e[5] >= count and e[6] == month:
                e[5] -= count  # Q6: counted already
                return True
            self._return_lease(e)
        mv = self._mv
        q, own, hi, lo, at = e[0], e[1], e[2], e[3], e[4]
        readers, buf = self._readers, self._buf
        vals = readers[mv[_HW_WORD]](buf, at)
        if vals[0] != hi or vals[1] != lo:
            return None
        used = _usage(vals, month)
        if used + count > limit:
            return False
        if count <= self.max_step and used + count <= limit - self.margin:
            extra = self.lease if limit >= self.lease_min_limit else 0
            old = mv[own]
            mv[own] = (old + count + extra if old >> _MONTH_SHIFT == month
                       else month << _MONTH_SHIFT | (count + extra))
            vals = readers[mv[_HW_WORD]](buf, at)
            if vals[0] == hi and vals[1] == lo and _usage(vals, month) <= limit - self.margin:
                if extra:
                    e[5], e[6] = extra, month
                    self._leased[id(e)] = e
                return True
            mv[own] -= count + extra
        with self._lock:
            if mv[q] != hi or mv[q + 1] != lo:
                return None
            old = mv[own]
            mv[own] = old + count if old >> _MONTH_SHIFT == month else month << _MONTH_SHIFT | count
            if _usage(self._read_slot(at), month) <= limit:
                return True
            mv[own] -= count
            return False

    def _read_slot(self, at: int) -> tuple[int, ...]:
        return self._readers[self._mv[_HW_WORD]](self._buf, at)

    def _return_lease(self, e: list) -> None:
        left, e[5] = e[5], 0
        self._leased.pop(id(e), None)
        mv = self._mv
        if left and mv[e[0]] == e[2] and mv[e[0] + 1] == e[3] and mv[e[1]] >> _MONTH_SHIFT == e[6]:
            mv[e[1]] -= left

    def return_leases(self) -> int:
        """Give back every unused lease of this process (Q6); returns how many entries had one."""
        held = list(self._leased.values())
        for e in held:
            self._return_lease(e)
        return len(held)

    # -- refresh ------------------------------------------------------------------------------

    def try_refresh_lock(self) -> bool:
        """Become this node's refresher for a while (non-blocking)."""
        return self._refresh_lock.acquire(blocking=False)

    def release_refresh_lock(self) -> None:
        self._refresh_lock.release()

    @property
    def refreshed_at(self) -> float:
        return _F64.unpack_from(self._region.buf, self._offset + _REFRESHED_AT)[0]

    @property
    def reset_for(self) -> int:
        return self._mv[_RESET_WORD]

    def mark_reset(self, month: int) -> None:
        self._mv[_RESET_WORD] = month

    def collect(self, month: int) -> list[tuple[int, uuid.UUID, int, int]]:
        """Every slot of ``month``: (slot word, organization, cell sum S, S - flushed).

        Call with the refresh lock held; send the deltas, then ``apply``.
        """
        mv = self._mv
        n = mv[_HW_WORD]
        out = []
        for i in range(self._slots):
            q = self._slot_q(i)
            hi, lo = mv[q], mv[q + 1]
            if not (hi or lo):
                continue
            offset, flushed = mv[q + 2], mv[q + 3]
            cells = mv[q + 4:q + 4 + n].tolist()
            if offset >> _MONTH_SHIFT != month and all(c >> _MONTH_SHIFT != month for c in cells):
                continue
            total = sum(c & _VALUE for c in cells if c >> _MONTH_SHIFT == month)
            done = flushed & _VALUE if flushed >> _MONTH_SHIFT == month else 0
            out.append((q, uuid.UUID(int=hi << 64 | lo), total, total - done))
        return out

    def apply(self, month: int, collected: list[tuple[int, uuid.UUID, int, int]],
              used: dict[uuid.UUID, int], now: float) -> int:
        """Record a successful refresh (Q3): ``used`` maps organizations to database usage.

        Returns how many organizations could not get a slot (table too small).
        """
        mv = self._mv
        seen = set()
        for q, org, total, _ in collected:
            hi, lo = _org_words(org)
            if mv[q] != hi or mv[q + 1] != lo:
                continue  # re-tagged meanwhile (it had gone stale)
            seen.add(org)
            mv[q + 3] = month << _MONTH_SHIFT | total
            mv[q + 2] = month << _MONTH_SHIFT | (used.get(org, 0) - total + _BIAS)
        missing = 0
        for org, value in used.items():
            if org in seen:
                continue
            key = _org_words(org)
            with self._lock:
                q = self._claim_locked(key, month)
                if q < 0:
                    missing += 1
                    continue
                flushed = mv[q + 3]
                done = flushed & _VALUE if flushed >> _MONTH_SHIFT == month else 0
                mv[q + 2] = month << _MONTH_SHIFT | (value - done + _BIAS)
        _F64.pack_into(self._region.buf, self._offset + _REFRESHED_AT, now)
        mv[_LOADED_WORD] = 1
        return missing


def _usage(vals: tuple[int, ...], month: int) -> int:
    """Usage from a slot read (org_hi, org_lo, offset, flushed, cells...): base + this month's cells."""
    offset = vals[2]
    used = (offset & _VALUE) - _BIAS if offset >> _MONTH_SHIFT == month else 0
    for c in vals[4:]:
        if c >> _MONTH_SHIFT == month:
            used += c & _VALUE
    return used
