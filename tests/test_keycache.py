"""KeyCache and SharedRegion: single-process semantics, then real processes sharing them.

Processes are forked with os.fork() and talk over pipes; every wait is on a pipe or on
process exit, never on a sleep.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zlib import crc32

import pytest

from runlater.cache import keycache as kc
from runlater.cache.keycache import NEGATIVE, CachedKey, KeyCache
from runlater.cache.shm import SharedRegion

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(n: int, prefix: bytes = b"pk_live_") -> bytes:
    # 24 characters from the URL-safe alphabet, like a real key id.
    return prefix + f"{n:024d}".encode()


def derive(key_id: bytes, writer: int = 0, serial: int = 0) -> CachedKey:
    """A value tied to its key and to the write that produced it, so that any mix of two
    writes (or of a value with another key) fails ``consistent``."""
    api_key_id = struct.pack("<IIQ", writer, serial, 0x5EED)
    organization_id = hashlib.sha256(key_id).digest()[:16]
    tier = (writer + serial) % 3
    key_hash = hashlib.sha256(key_id + api_key_id + organization_id + bytes([tier])).digest()
    return CachedKey(api_key_id, organization_id, key_hash, tier)


def consistent(key_id: bytes, value: CachedKey) -> bool:
    expected_hash = hashlib.sha256(key_id + value.api_key_id + value.organization_id + bytes([value.tier])).digest()
    return value.organization_id == hashlib.sha256(key_id).digest()[:16] and value.key_hash == expected_hash


def colliding_keys(slots: int, count: int, home: int = 0) -> list[bytes]:
    """Distinct key ids whose probe sequences all start at slot ``home``."""
    found = []
    n = 0
    while len(found) < count:
        candidate = key(n, b"pk_coll_")
        if crc32(candidate) % slots == home:
            found.append(candidate)
        n += 1
    return found


def slot_offset(cache: KeyCache, key_id: bytes) -> int:
    return cache._base + (crc32(key_id) % cache.slots) * kc._SLOT_SIZE


def new_cache(slots: int = 64, window: int = 8, clock: Callable[[], float] | None = None) -> KeyCache:
    region = SharedRegion.anonymous(KeyCache.region_size(slots))
    if clock is None:
        return KeyCache(region, slots=slots, window=window)
    return KeyCache(region, slots=slots, window=window, clock=clock)


class ChildFailed(AssertionError):
    pass


class Channel:
    """Length-prefixed pickles over a pair of pipe ends."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj)
        view = memoryview(struct.pack("<I", len(data)) + data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def recv(self) -> Any:
        (size,) = struct.unpack("<I", self._read_exactly(4))
        return pickle.loads(self._read_exactly(size))

    def poll(self) -> bool:
        return bool(select.select([self.read_fd], [], [], 0)[0])

    def _read_exactly(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(self.read_fd, n)
            if not chunk:
                raise EOFError("peer closed the pipe")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)


class Child:
    """``fn(channel)`` running in a forked process. ``recv`` returns what it sends;
    ``join`` returns what it returns (or raises with the child's traceback)."""

    def __init__(self, fn: Callable[[Channel], Any]) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                os.close(down_w)
                os.close(up_r)
                channel = Channel(down_r, up_w)
                try:
                    outcome: tuple[str, Any] = ("ok", fn(channel))
                    code = 0
                except BaseException:  # noqa: BLE001 - any failure must reach the parent, not pytest
                    outcome = ("error", traceback.format_exc())
                channel.send(("exit", outcome))
            finally:
                os._exit(code)
        os.close(down_r)
        os.close(up_w)
        self.pid = pid
        self.channel = Channel(up_r, down_w)
        self.result: tuple[str, Any] | None = None

    def send(self, obj: Any) -> None:
        self.channel.send(obj)

    def recv(self) -> Any:
        message = self.channel.recv()
        if isinstance(message, tuple) and message and message[0] == "exit":
            self.result = message[1]
            self._raise_if_failed()
            raise AssertionError(f"child exited while a message was expected, returning {message[1][1]!r}")
        return message

    def join(self) -> Any:
        while self.result is None:
            self.recv_or_exit()
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        self._raise_if_failed()
        assert os.waitstatus_to_exitcode(status) == 0
        return self.result[1]

    def recv_or_exit(self) -> None:
        message = self.channel.recv()
        if isinstance(message, tuple) and message and message[0] == "exit":
            self.result = message[1]
        else:
            raise AssertionError(f"unexpected message from child: {message!r}")

    def _raise_if_failed(self) -> None:
        if self.result is not None and self.result[0] == "error":
            raise ChildFailed(f"child process failed:\n{self.result[1]}")

    def kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        os.close(self.channel.read_fd)
        os.close(self.channel.write_fd)


@pytest.fixture
def spawn() -> Iterator[Callable[[Callable[[Channel], Any]], Child]]:
    children: list[Child] = []

    def start(fn: Callable[[Channel], Any]) -> Child:
        child = Child(fn)
        children.append(child)
        return child

    yield start
    for child in children:  # after a failed assertion, leave no process behind
        child.kill()


# -- single process -----------------------------------------------------------------------


def test_put_then_get_returns_the_value() -> None:
    cache = new_cache()
    value = derive(key(1))
    assert cache.get(key(1)) is None
    cache.put(key(1), value)
    got = cache.get(key(1))
    assert got == value
    assert isinstance(got, CachedKey)
    assert uuid.UUID(bytes=got.api_key_id) == uuid.UUID(bytes=value.api_key_id)
    assert cache.get(key(2)) is None


def test_put_replaces_in_place() -> None:
    cache = new_cache()
    cache.put(key(1), derive(key(1), serial=1))
    cache.put(key(1), derive(key(1), serial=2))
    assert cache.get(key(1)) == derive(key(1), serial=2)
    assert cache.stats()["positive"] == 1


def test_entries_expire_at_their_deadline() -> None:
    clock = FakeClock(100.0)
    cache = new_cache(clock=clock)
    cache.put(key(1), derive(key(1)), ttl=5.0)
    cache.put_negative(key(2), ttl=1.0)
    clock.now = 100.999
    assert cache.get(key(1)) == derive(key(1))
    assert cache.get(key(2)) is NEGATIVE
    clock.now = 101.0
    assert cache.get(key(2)) is None
    clock.now = 104.999
    assert cache.get(key(1)) == derive(key(1))
    clock.now = 105.0
    assert cache.get(key(1)) is None
    assert cache.stats()["expired"] == 2
    cache.put(key(1), derive(key(1), serial=9), ttl=5.0)  # refill after expiry
    assert cache.get(key(1)) == derive(key(1), serial=9)


def test_negative_entries() -> None:
    cache = new_cache()
    cache.put_negative(key(7))
    assert cache.get(key(7)) is NEGATIVE
    assert repr(NEGATIVE) == "NEGATIVE"
    # A key created after being looked up as unknown replaces its negative entry.
    cache.put(key(7), derive(key(7)))
    assert cache.get(key(7)) == derive(key(7))
    cache.put_negative(key(7))
    assert cache.get(key(7)) is NEGATIVE
    assert cache.stats()["negative"] == 1


def test_invalidate() -> None:
    cache = new_cache()
    cache.put(key(1), derive(key(1)))
    cache.put(key(2), derive(key(2)))
    assert cache.invalidate(key(1)) is True
    assert cache.get(key(1)) is None
    assert cache.get(key(2)) == derive(key(2))
    assert cache.invalidate(key(1)) is False
    assert cache.invalidate(key(3)) is False


def test_invalidate_keeps_later_keys_of_the_same_probe_sequence_reachable() -> None:
    cache = new_cache(slots=16, window=8)
    a, b, c = colliding_keys(16, 3, home=5)
    for k in (a, b, c):
        cache.put(k, derive(k))
    assert cache.invalidate(a)
    assert cache.invalidate(b)
    assert cache.get(c) == derive(c)
    assert cache.stats()["tombstone"] == 2
    # Tombstones are reused by later puts.
    d = colliding_keys(16, 4, home=5)[3]
    cache.put(d, derive(d))
    assert cache.stats()["tombstone"] == 1
    assert cache.get(c) == derive(c) and cache.get(d) == derive(d)


def test_clear_forgets_everything_at_once() -> None:
    cache = new_cache()
    for n in range(20):
        cache.put(key(n), derive(key(n)))
    cache.put_negative(key(99))
    cache.clear()
    assert all(cache.get(key(n)) is None for n in range(20))
    assert cache.get(key(99)) is None
    assert cache.stats()["empty"] == cache.slots
    cache.put(key(3), derive(key(3), serial=1))
    assert cache.get(key(3)) == derive(key(3), serial=1)


def test_clear_survives_generation_wraparound() -> None:
    cache = new_cache(slots=16)
    cache.put(key(1), derive(key(1)))  # written in generation 0
    struct.pack_into("<I", cache.region.buf, kc._GEN_OFFSET, 0xFFFF_FFFF)
    cache.put(key(2), derive(key(2)))
    cache.clear()  # back to generation 0: the old generation-0 entry must not return
    assert struct.unpack_from("<I", cache.region.buf, kc._GEN_OFFSET)[0] == 0
    assert cache.get(key(1)) is None
    assert cache.get(key(2)) is None
    cache.put(key(3), derive(key(3)))
    assert cache.get(key(3)) == derive(key(3))


def test_full_window_evicts_the_earliest_deadline() -> None:
    clock = FakeClock()
    cache = new_cache(slots=8, window=8, clock=clock)  # the whole table is one window
    keys = [key(n) for n in range(9)]
    for i, k in enumerate(keys[:8]):
        cache.put(k, derive(k), ttl=100.0 + i)
    assert cache.stats()["positive"] == 8
    cache.put(keys[8], derive(keys[8]), ttl=100.0)
    assert cache.get(keys[0]) is None  # earliest deadline
    assert all(cache.get(k) == derive(k) for k in keys[1:])


def test_eviction_prefers_expired_then_negative_entries() -> None:
    clock = FakeClock()
    cache = new_cache(slots=8, window=8, clock=clock)
    keys = [key(n) for n in range(10)]
    for k in keys[:7]:
        cache.put(k, derive(k), ttl=10.0)
    cache.put_negative(keys[7], ttl=1000.0)
    # Full: a negative entry goes before any positive one, even an older one.
    cache.put(keys[8], derive(keys[8]))
    assert cache.get(keys[7]) is None
    assert all(cache.get(k) == derive(k) for k in keys[:7] + [keys[8]])
    # An expired entry is reused before any live one is evicted.
    cache.put(keys[3], derive(keys[3]), ttl=0.5)
    clock.now += 1.0
    cache.put(keys[9], derive(keys[9]))
    assert cache.get(keys[3]) is None
    assert all(cache.get(k) == derive(k) for k in keys[:3] + keys[4:7] + [keys[8], keys[9]])


def test_never_grows_never_fails() -> None:
    cache = new_cache(slots=64, window=4)
    for n in range(2000):
        cache.put(key(n), derive(key(n)))
        assert cache.get(key(n)) == derive(key(n))  # a key is always there right after its put
        if n % 3 == 0:
            cache.put_negative(key(n, b"pk_nope_"))
    stats = cache.stats()
    assert sum(stats.values()) == 64
    assert stats["unreadable"] == 0
    assert stats["empty"] < 64


@pytest.mark.parametrize("bad", [b"", b"x" * 33, key(1) + b"!"])
def test_key_ids_outside_1_to_32_bytes_are_rejected(bad: bytes) -> None:
    cache = new_cache()
    for call in (
        lambda: cache.get(bad),
        lambda: cache.put(bad, derive(key(1))),
        lambda: cache.put_negative(bad),
        lambda: cache.invalidate(bad),
    ):
        with pytest.raises(ValueError, match="key id must be 1..32 bytes"):
            call()
    assert cache.stats()["empty"] == cache.slots


def test_short_key_ids_are_distinct_from_padded_ones() -> None:
    cache = new_cache()
    cache.put(b"abc", derive(b"abc"))
    assert cache.get(b"abc\0") is None
    assert cache.get(b"abc") == derive(b"abc")


@pytest.mark.parametrize(
    ("value", "ttl", "message"),
    [
        (CachedKey(bytes(15), bytes(16), bytes(32), 0), 60.0, "16-byte api_key_id"),
        (CachedKey(bytes(16), bytes(16), bytes(31), 0), 60.0, "32-byte key_hash"),
        (CachedKey(bytes(16), bytes(16), bytes(32), 256), 60.0, "tier must fit"),
        (CachedKey(bytes(16), bytes(16), bytes(32), 1), 0.0, "ttl must be"),
        (CachedKey(bytes(16), bytes(16), bytes(32), 1), float("nan"), "ttl must be"),
        (CachedKey(bytes(16), bytes(16), bytes(32), 1), float("inf"), "ttl must be"),
    ],
)
def test_invalid_values_are_rejected(value: CachedKey, ttl: float, message: str) -> None:
    cache = new_cache()
    with pytest.raises(ValueError, match=message):
        cache.put(key(1), value, ttl=ttl)
    assert cache.get(key(1)) is None


def test_attach_checks_the_layout() -> None:
    region = SharedRegion.anonymous(KeyCache.region_size(64))
    cache = KeyCache(region, slots=64)
    cache.put(key(1), derive(key(1)))
    assert KeyCache(region, slots=64).get(key(1)) == derive(key(1))  # second attach sees the data
    with pytest.raises(ValueError, match="slots=64 window=8, but this process asked for slots=32"):
        KeyCache(region, slots=32)
    with pytest.raises(ValueError, match="too small"):
        KeyCache(region, slots=128)
    region.buf[0:8] = b"garbage!"
    with pytest.raises(ValueError, match="holds something else"):
        KeyCache(region, slots=64)


def test_two_caches_at_different_offsets_of_one_region_are_independent() -> None:
    size = KeyCache.region_size(32)
    region = SharedRegion.anonymous(2 * size)
    first = KeyCache(region, slots=32)
    second = KeyCache(region, slots=32, offset=size)
    first.put(key(1), derive(key(1)))
    second.put_negative(key(1))
    second.clear()
    assert first.get(key(1)) == derive(key(1))
    assert second.get(key(1)) is None
    with pytest.raises(ValueError, match="multiple of 64"):
        KeyCache(region, slots=16, offset=10)


def test_slot_held_by_a_writer_reads_as_miss_until_the_write_completes() -> None:
    cache = new_cache()
    cache.put(key(1), derive(key(1)))
    start = slot_offset(cache, key(1))
    (seq,) = struct.unpack_from("<Q", cache.region.buf, start)
    struct.pack_into("<Q", cache.region.buf, start, seq + 1)  # a writer is inside
    assert cache.get(key(1)) is None
    assert cache.stats()["unreadable"] == 1
    struct.pack_into("<Q", cache.region.buf, start, seq + 2)  # it finished
    assert cache.get(key(1)) == derive(key(1))


def test_torn_body_with_a_stable_seq_is_never_returned() -> None:
    # What weak memory ordering could show a reader: a matching seq around a mixed copy.
    cache = new_cache()
    cache.put(key(1), derive(key(1)))
    start = slot_offset(cache, key(1))
    buf = cache.region.buf
    buf[start + 56 : start + 72] = b"\xff" * 16  # half of another write's api_key_id
    assert cache.get(key(1)) is None
    assert cache.stats()["unreadable"] == 1
    cache.put(key(1), derive(key(1), serial=2))  # a writer repairs the slot
    assert cache.get(key(1)) == derive(key(1), serial=2)
    assert cache.stats()["unreadable"] == 0


def test_region_lock_excludes_other_threads() -> None:
    region = SharedRegion.anonymous(4096)
    lock = region.lock(0)
    other_index = region.lock(1)
    results = []
    with lock:
        thread = threading.Thread(target=lambda: results.append((lock.acquire(False), other_index.acquire(False))))
        thread.start()
        thread.join()
    assert results == [(False, True)]
    other_index.release()
    assert lock.acquire(blocking=False)
    lock.release()


def test_region_open_and_close(tmp_path: Path) -> None:
    path = str(tmp_path / "region")
    with pytest.raises(FileNotFoundError):
        SharedRegion.open(path, 4096, create=False)
    region = SharedRegion.open(path, 4096)
    assert os.path.getsize(path) == 4096
    region.buf[0:5] = b"hello"
    with pytest.raises(ValueError, match="expected at least 8192"):
        SharedRegion.open(path, 8192, create=False)
    lock = region.lock(0)
    region.close()
    region.close()
    assert region.closed
    with pytest.raises(ValueError, match="closed"):
        lock.acquire()
    with SharedRegion.open(path, 4096, create=False) as again:
        assert again.buf[0:5] == b"hello"
        again.unlink()
    assert not os.path.exists(path)
    with pytest.raises(ValueError):
        SharedRegion.anonymous(0)


# -- two processes ------------------------------------------------------------------------


def test_fill_in_child_hit_in_parent(spawn: Callable[..., Child]) -> None:
    cache = new_cache()
    child = spawn(lambda ch: cache.put(key(1), derive(key(1), writer=1)))
    child.join()
    assert cache.get(key(1)) == derive(key(1), writer=1)


def test_fill_after_fork_is_seen_by_the_child(spawn: Callable[..., Child]) -> None:
    cache = new_cache()

    def child_side(ch: Channel) -> Any:
        ch.recv()  # wait until the parent has written
        return cache.get(key(1)), cache.get(key(2))

    child = spawn(child_side)
    cache.put(key(1), derive(key(1)))  # the child already exists: this is shared, not copied
    cache.put_negative(key(2))
    child.send("go")
    assert child.join() == (derive(key(1)), NEGATIVE)


def test_invalidate_and_clear_in_one_process_miss_in_the_other(spawn: Callable[..., Child]) -> None:
    cache = new_cache()

    def child_side(ch: Channel) -> None:
        cache.put(key(1), derive(key(1)))
        cache.put(key(2), derive(key(2)))
        ch.send("filled")
        assert ch.recv() == "invalidated"
        ch.send((cache.get(key(1)), cache.get(key(2))))
        assert ch.recv() == "cleared"
        ch.send(cache.get(key(2)))

    child = spawn(child_side)
    assert child.recv() == "filled"
    assert cache.get(key(1)) == derive(key(1))
    assert cache.invalidate(key(1))
    child.send("invalidated")
    assert child.recv() == (None, derive(key(2)))
    cache.clear()
    child.send("cleared")
    assert child.recv() is None
    child.join()


def test_deadlines_written_by_one_process_hold_in_another(spawn: Callable[..., Child]) -> None:
    # Real time.monotonic() in both: CLOCK_MONOTONIC is one clock for the whole system.
    cache = new_cache(clock=None)
    spawn(lambda ch: (cache.put(key(1), derive(key(1)), ttl=30.0), cache.put_negative(key(2), ttl=1e-9))).join()
    assert cache.get(key(1)) == derive(key(1))
    assert cache.get(key(2)) is None  # its deadline passed before the child even exited


def test_writer_lock_excludes_processes_and_dies_with_its_holder(spawn: Callable[..., Child]) -> None:
    cache = new_cache()
    lock = cache._lock

    def holder(ch: Channel) -> None:
        lock.acquire()
        # Die mid-write: seq left odd, lock never released.
        start = slot_offset(cache, key(1))
        (seq,) = struct.unpack_from("<Q", cache.region.buf, start)
        struct.pack_into("<Q", cache.region.buf, start, seq | 1)
        cache.region.buf[start + 24 : start + 56] = key(1)
        ch.send("holding")
        ch.recv()  # parent closes the pipe after checking; then we "crash"
        os._exit(0)

    cache.put(key(1), derive(key(1)))
    child = spawn(holder)
    assert child.recv() == "holding"
    assert lock.acquire(blocking=False) is False  # held by another process
    assert cache.get(key(1)) is None  # half-written slot: a miss, never garbage
    child.send("crash")
    _, status = os.waitpid(child.pid, 0)
    child.pid = 0
    assert os.waitstatus_to_exitcode(status) == 0
    # The kernel released the lock with its holder; the next put repairs the slot.
    cache.put(key(1), derive(key(1), serial=2))
    assert cache.get(key(1)) == derive(key(1), serial=2)
    assert cache.stats()["unreadable"] == 0


def _writer(cache: KeyCache, writer: int, own: list[bytes], shared: list[bytes], rounds: int) -> None:
    for serial in range(rounds):
        for i, k in enumerate(own):
            cache.put(k, derive(k, writer, serial))
            s = shared[i % len(shared)]
            op = (i + writer + serial) % 7
            if op == 0:
                cache.put_negative(s)
            elif op == 1:
                cache.invalidate(s)
            else:
                cache.put(s, derive(s, writer, serial))


def _last_shared_ops(writer: int, own_count: int, shared: list[bytes], rounds: int) -> dict[bytes, Any]:
    """What ``_writer`` last did to each shared key: a value, NEGATIVE or None (invalidated)."""
    last: dict[bytes, Any] = {}
    for serial in range(rounds):
        for i in range(own_count):
            s = shared[i % len(shared)]
            op = (i + writer + serial) % 7
            last[s] = NEGATIVE if op == 0 else None if op == 1 else derive(s, writer, serial)
    return last


@pytest.mark.slow
@pytest.mark.parametrize(("slots", "writers", "own_count"), [(32, 3, 1500), (8192, 4, 800)])
def test_concurrent_writers_never_expose_a_torn_entry(
    spawn: Callable[..., Child], slots: int, writers: int, own_count: int
) -> None:
    """Writers hammer overlapping and distinct keys while a reader checks every value it sees.

    32 slots: constant eviction and many writers in the same slots, the worst case for
    torn reads. 8192 slots: little eviction, so the final state can be checked exactly.
    """
    cache = new_cache(slots=slots, window=8)
    rounds = 3
    shared = [key(n, b"pk_both_") for n in range(200)]
    own = [[key(n, f"pk_w{w}___".encode()) for n in range(own_count)] for w in range(writers)]
    watched = shared + [k for keys in own for k in keys[::50]]

    def reader(ch: Channel) -> dict[str, int]:
        counts = {"reads": 0, "hits": 0, "negative": 0, "torn": 0, "wrong_key": 0}
        ch.send("ready")
        while True:
            for k in watched:
                got = cache.get(k)
                counts["reads"] += 1
                if got is NEGATIVE:
                    counts["negative"] += 1
                elif got is not None:
                    counts["hits"] += 1
                    if not consistent(k, got):
                        counts["torn"] += 1
            if ch.poll():  # the parent says the writers are done; one more full pass ran
                return counts

    def writer(w: int) -> Callable[[Channel], None]:
        def run(ch: Channel) -> None:
            assert ch.recv() == "go"
            _writer(cache, w, own[w], shared, rounds)

        return run

    watcher = spawn(reader)
    assert watcher.recv() == "ready"
    workers = [spawn(writer(w)) for w in range(writers)]
    for child in workers:
        child.send("go")
    for child in workers:
        child.join()
    watcher.send("stop")
    counts = watcher.join()

    assert counts["torn"] == 0, counts
    assert counts["hits"] > 0 and counts["negative"] > 0, counts

    # Structure: each key at most once (I1), every stored key reachable by get (I2), and no
    # slot left half-written.
    stored = [k for k, state in cache._entries() if state in ("positive", "negative")]
    assert len(stored) == len(set(stored))
    assert all(cache.get(k) is not None for k in stored)
    assert cache.stats()["unreadable"] == 0

    # Values: an own key holds its writer's last value; a shared key holds what one of the
    # writers did to it last (any of them may have been the last to run). Evicted keys miss.
    present = 0
    for w in range(writers):
        for k in own[w]:
            got = cache.get(k)
            if got is not None:
                present += 1
                assert got == derive(k, w, rounds - 1)
    finals = [_last_shared_ops(w, own_count, shared, rounds) for w in range(writers)]
    for s in shared:
        got = cache.get(s)
        if got is not None:
            assert any(got == final[s] for final in finals), s
    if slots >= writers * own_count * 2:
        assert present >= 0.97 * writers * own_count


# -- unrelated processes: the open(path) variant ------------------------------------------


_SUBPROCESS = textwrap.dedent(
    """
    import sys
    from runlater.cache.keycache import KeyCache, CachedKey, NEGATIVE
    from runlater.cache.shm import SharedRegion

    path = sys.argv[1]
    region = SharedRegion.open(path, KeyCache.region_size(128), create=False)
    cache = KeyCache(region, slots=128)
    hit = cache.get(b"pk_live_from_parent_000000000000")
    assert isinstance(hit, CachedKey), hit
    assert cache.get(b"pk_live_negative_from_parent_000") is NEGATIVE
    cache.put(b"pk_live_from_child_0000000000000", CachedKey(hit.organization_id, hit.api_key_id, hit.key_hash, 2))
    assert cache.invalidate(b"pk_live_from_parent_000000000000")
    print(hit.api_key_id.hex())
    region.close()
    """
)


@pytest.fixture
def shm_path() -> Iterator[str]:
    path = f"/dev/shm/runlater-test-{uuid.uuid4().hex}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_open_region_is_shared_between_unrelated_processes(shm_path: str) -> None:
    region = SharedRegion.open(shm_path, KeyCache.region_size(128))
    cache = KeyCache(region, slots=128)
    value = derive(b"pk_live_from_parent_000000000000")
    cache.put(b"pk_live_from_parent_000000000000", value)
    cache.put_negative(b"pk_live_negative_from_parent_000")

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, shm_path],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == value.api_key_id.hex()
    assert cache.get(b"pk_live_from_parent_000000000000") is None
    assert cache.get(b"pk_live_from_child_0000000000000") == CachedKey(
        value.organization_id, value.api_key_id, value.key_hash, 2
    )
    region.close()
    region.unlink()
