"""The mock delivery target (bench/mock_target.py), driven with raw sockets so that its tests do
not depend on the client it is used to test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop

ROOT = Path(__file__).resolve().parent.parent
# bench/ is not an installed package; the repository root makes it importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mock_target import MockTarget


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def read_response(reader: asyncio.StreamReader, head_only: bool = False):
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    status = int(status_line.split(" ")[1])
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = b"" if head_only or status in (204, 304) else await reader.readexactly(length)
    return status, headers, body


class Conn:
    """A raw keep-alive connection to the target."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: MockTarget) -> Conn:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        return cls(reader, writer)

    def send(self, method: str, target: str, body: bytes = b"", extra: str = "") -> None:
        length = f"content-length: {len(body)}\r\n" if body else ""
        self.writer.write(
            f"{method} {target} HTTP/1.1\r\nhost: mock\r\n{extra}{length}\r\n".encode() + body
        )

    async def call(self, method: str, target: str, body: bytes = b"", extra: str = ""):
        self.send(method, target, body, extra)
        return await read_response(self.reader, head_only=method == "HEAD")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def test_get_records_request_and_answers_json():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        conn = await Conn.open(target)
        before_wall = time.time()
        before = time.monotonic()
        status, headers, body = await conn.call(
            "POST", "/hooks/a%20b?x=1", b'{"k":1}', "x-test: yes\r\n"
        )
        await conn.close()
        await target.stop()
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"status": "ok", "method": "POST", "path": "/hooks/a b"}
        [req] = target.requests
        assert (req.method, req.path, req.query, req.body) == (
            "POST",
            "/hooks/a b",
            "x=1",
            b'{"k":1}',
        )
        assert req.header("x-test") == "yes"
        assert req.header("host") == "mock"
        assert before <= req.monotonic <= time.monotonic()
        assert before_wall - 1 <= req.wall <= time.time() + 1

    run(main())


def test_query_parameters_shape_the_answer():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        conn = await Conn.open(target)
        results = {
            "status": await conn.call("GET", "/?status=201"),
            "bad_status": await conn.call("GET", "/?status=abc"),
            "out_of_range": await conn.call("GET", "/?status=99"),
            "fail_all": await conn.call("GET", "/?status=201&fail_rate=100"),
            "fail_none": await conn.call("GET", "/?fail_rate=0"),
            "retry": await conn.call("GET", "/?status=429&retry_after=30"),
            "no_content": await conn.call("DELETE", "/?status=204"),
            "head": await conn.call("HEAD", "/h"),
            "jitter_zero": await conn.call("GET", "/?jitter=0"),
            "jitter_neg": await conn.call("GET", "/?jitter=-5&delay=-3"),
            "after_head": await conn.call("GET", "/after"),
        }
        await conn.close()
        await target.stop()
        assert results["status"][0] == 201
        assert results["bad_status"][0] == 200
        assert results["out_of_range"][0] == 200
        assert results["fail_all"][0] == 500
        assert json.loads(results["fail_all"][2])["status"] == "ok"
        assert results["fail_none"][0] == 200
        assert results["retry"][0] == 429 and results["retry"][1]["retry-after"] == "30"
        assert results["no_content"][0] == 204 and "content-length" not in results["no_content"][1]
        head_status, head_headers, head_body = results["head"]
        assert head_status == 200 and head_body == b""
        assert int(head_headers["content-length"]) == len(
            b'{"status":"ok","method":"HEAD","path":"/h"}'
        )
        assert results["jitter_zero"][0] == 200 and results["jitter_neg"][0] == 200
        # The HEAD answer carried no body bytes: the next response on the connection parses.
        assert json.loads(results["after_head"][2])["path"] == "/after"
        assert target.connections == 1

    run(main())


def test_fail_rate_is_a_probability():
    async def main():
        target = await MockTarget.start("127.0.0.1", record=False)
        conn = await Conn.open(target)
        statuses = [(await conn.call("GET", "/?fail_rate=50"))[0] for _ in range(400)]
        await conn.close()
        await target.stop()
        failures = statuses.count(500)
        assert set(statuses) <= {200, 500}
        assert 120 < failures < 280  # binomial(400, 0.5): far outside 6 sigma otherwise

    run(main())


def test_delay_does_not_block_other_connections():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        slow = await Conn.open(target)
        fast = await Conn.open(target)
        started = time.monotonic()
        slow_call = asyncio.ensure_future(slow.call("GET", "/slow?delay=800"))
        await target.wait_for(1)
        fast_result = await fast.call("GET", "/fast")
        fast_elapsed = time.monotonic() - started
        assert not slow_call.done()
        slow_result = await slow_call
        slow_elapsed = time.monotonic() - started
        await slow.close()
        await fast.close()
        await target.stop()
        assert fast_result[0] == 200 and slow_result[0] == 200
        # The fast answer came while the slow one was still held (checked above, on the
        # future), and the slow one was held for its delay. libuv's timers count whole
        # milliseconds, so a delay may end up to a millisecond before the client's clock says.
        assert fast_elapsed < slow_elapsed
        assert slow_elapsed >= 0.8 - 0.002, slow_elapsed

    run(main())


def test_pipelined_responses_keep_request_order():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        conn = await Conn.open(target)
        conn.send("GET", "/first?delay=150")
        conn.send("GET", "/second")
        conn.send("GET", "/third?delay=50")
        paths = [json.loads((await read_response(conn.reader))[2])["path"] for _ in range(3)]
        await conn.close()
        await target.stop()
        assert paths == ["/first", "/second", "/third"]

    run(main())


def test_connection_close_is_honoured():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        conn = await Conn.open(target)
        status, headers, _ = await conn.call("GET", "/?delay=10", extra="connection: close\r\n")
        eof = await conn.reader.read()
        await conn.close()
        await target.stop()
        assert status == 200 and headers["connection"] == "close" and eof == b""

    run(main())


def test_wait_for_is_event_based_and_times_out():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        waiter = asyncio.ensure_future(target.wait_for(2, timeout=5))
        conn = await Conn.open(target)
        await conn.call("GET", "/1")
        assert not waiter.done()
        await conn.call("GET", "/2")
        recorded = [r.path for r in await waiter]
        with pytest.raises(TimeoutError, match="got 2 requests, waited for 3"):
            await target.wait_for(3, timeout=0.05)
        target.clear()
        await conn.close()
        await target.stop()
        return recorded, target.requests

    paths, after_clear = run(main())
    assert paths == ["/1", "/2"]
    assert after_clear == []


def test_stop_is_idempotent_and_closes_idle_connections():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        assert target.started
        conn = await Conn.open(target)
        await conn.call("GET", "/")
        delayed = asyncio.ensure_future(conn.call("GET", "/?delay=5000"))
        await target.wait_for(2)
        await target.stop()
        await target.stop()
        with pytest.raises(asyncio.IncompleteReadError):
            await delayed
        await conn.close()
        return target.started, target.open_connections

    started, still_open = run(main())
    assert started is False
    assert still_open == 0


def test_recording_off_keeps_nothing():
    async def main():
        target = await MockTarget.start("127.0.0.1", record=False)
        conn = await Conn.open(target)
        result = await conn.call("POST", "/x", b"abc")
        await conn.close()
        with pytest.raises(RuntimeError, match="record=True"):
            await target.wait_for(1)
        await target.stop()
        return result, target.requests

    (status, _, body), requests = run(main())
    assert status == 200 and json.loads(body)["method"] == "POST"
    assert requests == []


def test_command_line_serves_with_several_workers():
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.mock_target", "--port", "0", "--workers", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])

        async def main():
            results = []
            for _ in range(4):  # new connections, spread over both workers by the kernel
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                conn = Conn(reader, writer)
                results.append(await conn.call("GET", "/cli?status=202"))
                await conn.close()
            return results

        results = run(main())
        assert [status for status, _, _ in results] == [202] * 4
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
