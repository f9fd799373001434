"""Outbound client throughput: runlater's HttpClient against aiohttp's, same run, same target.

    .venv/bin/pytest bench/micro/test_client_vs_aiohttp.py -p no:cacheprovider --benchmark-enable

The mock target runs in its own process (``python -m bench.mock_target``) so that it does not
share the client's event loop; recording is off there. Each round is 200 sequential GETs, or
200 GETs with 100 in flight at once (both clients capped at 100 connections). Requests per second
and the client's CPU time per request are in each benchmark's ``extra_info`` and printed at the
end of the module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import uvloop

from runlater.workers.httpclient import HttpClient

ROOT = Path(__file__).resolve().parents[2]
REQUESTS_PER_ROUND = 200
CONCURRENCY = 100
ROUNDS = 25

_results: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module")
def target_url():
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.mock_target", "--port", "0", "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"mock target did not start: {line!r}")
        yield line.split(" ", 2)[2].strip() + "/hook"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


@pytest.fixture(scope="module")
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


@pytest.fixture(scope="module")
def runlater_get(loop, target_url):
    client = HttpClient(allow_private=True, max_per_origin=CONCURRENCY)

    async def get() -> int:
        response = await client.request("GET", target_url, [], None, 10.0)
        return len(response.body)

    yield get
    loop.run_until_complete(client.close())


@pytest.fixture(scope="module")
def aiohttp_get(loop, target_url):
    async def make() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))

    session = loop.run_until_complete(make())
    timeout = aiohttp.ClientTimeout(total=10.0)

    async def get() -> int:
        async with session.get(target_url, timeout=timeout) as response:
            return len(await response.read())

    yield get
    loop.run_until_complete(session.close())


def sequential(get):
    async def round_() -> None:
        for _ in range(REQUESTS_PER_ROUND):
            assert await get() > 0

    return round_


def concurrent(get):
    async def worker(n: int) -> None:
        for _ in range(n):
            assert await get() > 0

    async def round_() -> None:
        per_worker = REQUESTS_PER_ROUND // CONCURRENCY
        await asyncio.gather(*(worker(per_worker) for _ in range(CONCURRENCY)))

    return round_


def measure(benchmark, loop, name: str, make_round) -> None:
    round_ = make_round()
    loop.run_until_complete(round_())  # open the pool's connections before timing
    cpu = [0.0, 0]

    def timed_round() -> None:
        # Client CPU per request is reported too: on a shared machine it is far steadier
        # than wall-clock throughput, which the target process and neighbours also affect.
        started = time.process_time()
        loop.run_until_complete(round_())
        cpu[0] += time.process_time() - started
        cpu[1] += REQUESTS_PER_ROUND

    benchmark.pedantic(timed_round, rounds=ROUNDS, warmup_rounds=2)
    if benchmark.disabled:  # plain test run: the round ran once as a smoke test
        return
    rate = REQUESTS_PER_ROUND / benchmark.stats.stats.mean
    cpu_us = cpu[0] / cpu[1] * 1e6
    benchmark.extra_info["requests_per_second"] = round(rate)
    benchmark.extra_info["client_cpu_us_per_request"] = round(cpu_us, 1)
    _results[name] = (rate, cpu_us)


@pytest.mark.benchmark(group="sequential")
def test_sequential_runlater(benchmark, loop, runlater_get):
    measure(benchmark, loop, "runlater sequential", lambda: sequential(runlater_get))


@pytest.mark.benchmark(group="sequential")
def test_sequential_aiohttp(benchmark, loop, aiohttp_get):
    measure(benchmark, loop, "aiohttp sequential", lambda: sequential(aiohttp_get))


@pytest.mark.benchmark(group="concurrent-100")
def test_concurrent_runlater(benchmark, loop, runlater_get):
    measure(benchmark, loop, "runlater 100 concurrent", lambda: concurrent(runlater_get))


@pytest.mark.benchmark(group="concurrent-100")
def test_concurrent_aiohttp(benchmark, loop, aiohttp_get):
    measure(benchmark, loop, "aiohttp 100 concurrent", lambda: concurrent(aiohttp_get))


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if _results:
        lines = [
            f"  {name:<26} {rate:>9,.0f} req/s  {cpu_us:6.1f} µs client CPU/request"
            for name, (rate, cpu_us) in _results.items()
        ]
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n\nclient throughput, same run:\n" + "\n".join(lines))
