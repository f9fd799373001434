"""Per-call cost of the shared-memory key cache on the authentication hot path.

Run:  .venv/bin/pytest bench/micro/test_keycache_bench.py -p no:cacheprovider --benchmark-enable

``get`` runs once per API request, so its hit and miss costs are the numbers that matter;
writes happen only on cache fills and revocations and include two ``fcntl`` system calls
for the cross-process writer lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from zlib import crc32

import pytest

from runlater.cache.keycache import NEGATIVE, CachedKey, KeyCache
from runlater.cache.shm import SharedRegion

SLOTS = 8192


def _key(n: int, prefix: bytes = b"pk_live_") -> bytes:
    return prefix + f"{n:024d}".encode()


def _value(n: int) -> CachedKey:
    return CachedKey(n.to_bytes(16, "big"), bytes(range(16)), bytes(range(32)), 1)


@pytest.fixture
def cache() -> Iterator[KeyCache]:
    region = SharedRegion.anonymous(KeyCache.region_size(SLOTS))
    cache = KeyCache(region, slots=SLOTS)
    # A realistic fill: half the table live, so probes meet neighbours as they would in service.
    for n in range(SLOTS // 2):
        cache.put(_key(n), _value(n), ttl=3600.0)
    yield cache
    region.close()


def test_get_hit(benchmark, cache: KeyCache) -> None:
    k = _key(17)
    assert benchmark(cache.get, k) == _value(17)


def test_get_hit_last_in_window(benchmark) -> None:
    # Worst case for a hit: the key sits at the end of a full probe window.
    region = SharedRegion.anonymous(KeyCache.region_size(SLOTS))
    cache = KeyCache(region, slots=SLOTS)
    chain: list[bytes] = []
    n = 0
    while len(chain) < 8:
        candidate = _key(n, b"pk_coll_")
        if crc32(candidate) % SLOTS == 100:
            chain.append(candidate)
            cache.put(candidate, _value(n), ttl=3600.0)
        n += 1
    assert benchmark(cache.get, chain[-1]) is not None
    region.close()


def test_get_negative(benchmark, cache: KeyCache) -> None:
    k = _key(1, b"pk_nope_")
    cache.put_negative(k, ttl=3600.0)
    assert benchmark(cache.get, k) is NEGATIVE


def test_get_miss(benchmark, cache: KeyCache) -> None:
    k = _key(10**9)
    assert benchmark(cache.get, k) is None


def test_put_update(benchmark, cache: KeyCache) -> None:
    k, v = _key(17), _value(17)
    benchmark(cache.put, k, v)
    assert cache.get(k) == v


def test_put_negative(benchmark, cache: KeyCache) -> None:
    k = _key(2, b"pk_nope_")
    benchmark(cache.put_negative, k)
    assert cache.get(k) is NEGATIVE


def test_invalidate_missing(benchmark, cache: KeyCache) -> None:
    assert benchmark(cache.invalidate, _key(10**9)) is False
