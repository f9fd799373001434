"""SSRF guard: the address table, the save-time URL check, and the connect-time check inside the
client (every hop, the checked address is the one connected to)."""

from __future__ import annotations

import asyncio
import ipaddress
import sys
from pathlib import Path

import pytest
import uvloop

from runlater.workers.httpclient import BlockedAddress, HttpClient
from runlater.workers.ssrf import (
    MSG_HOST,
    MSG_PRIVATE,
    MSG_SCHEME,
    is_forbidden_address,
    public_only,
    validate_target_url,
)

ROOT = Path(__file__).resolve().parent.parent
# bench/ is not an installed package; the repository root makes it importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mock_target import MockTarget


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.0.1",
        "100.64.0.1",
        "100.127.255.255",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "192.0.0.8",
        "::",
        "::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fe80::1%2",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "::ffff:0:127.0.0.1",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::8.8.8.8",  # local-use NAT64
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
    ],
)
def test_forbidden_addresses(address):
    assert is_forbidden_address(address)
    assert not public_only(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "172.32.0.1",
        "100.128.0.1",
        "169.253.255.255",
        "2606:4700:4700::1111",
        "2a00:1450:4001::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "2002:808:808::",
    ],
)
def test_public_addresses(address):
    assert not is_forbidden_address(address)
    assert not is_forbidden_address(ipaddress.ip_address(address))


def test_forbidden_address_rejects_non_addresses():
    with pytest.raises(ValueError):
        is_forbidden_address("example.com")


@pytest.mark.parametrize(
    "url, message",
    [
        (None, None),
        ("", None),
        ("https://example.com/hook", None),
        ("http://api.github.com", None),
        ("http://8.8.8.8:8080/x", None),
        ("http://10.example.com/", None),  # a name: judged by its addresses at connect time
        ("ftp://example.com/file", MSG_SCHEME),
        ("file:///etc/passwd", MSG_SCHEME),
        ("javascript:alert(1)", MSG_SCHEME),
        ("example.com/no-scheme", MSG_SCHEME),
        ("http://", MSG_HOST),
        ("https:///path", MSG_HOST),
        ("http://[::1", MSG_HOST),
        ("http://localhost/", MSG_PRIVATE),
        ("https://LOCALHOST:8443/", MSG_PRIVATE),
        ("http://app.localhost/", MSG_PRIVATE),
        ("http://printer.local/", MSG_PRIVATE),
        ("http://metadata.google.internal/", MSG_PRIVATE),
        ("http://localhost./", MSG_PRIVATE),
        ("http://127.0.0.1/", MSG_PRIVATE),
        ("http://127.1/", MSG_PRIVATE),
        ("http://2130706433/", MSG_PRIVATE),
        ("http://0x7f000001/", MSG_PRIVATE),
        ("http://10.0.0.1/", MSG_PRIVATE),
        ("http://172.16.0.1/", MSG_PRIVATE),
        ("http://172.31.0.1/", MSG_PRIVATE),
        ("http://192.168.0.10/", MSG_PRIVATE),
        ("http://169.254.169.254/latest/meta-data", MSG_PRIVATE),
        ("http://[::1]:8080/", MSG_PRIVATE),
        ("http://[::ffff:127.0.0.1]/", MSG_PRIVATE),
        ("http://[fd00::1]/", MSG_PRIVATE),
    ],
)
def test_save_time_url_check(url, message):
    assert validate_target_url(url) == message


def test_save_time_check_allows_private_when_configured():
    assert validate_target_url("http://localhost:8080/", allow_private=True) is None
    assert validate_target_url("http://10.0.0.1/", allow_private=True) is None
    assert validate_target_url("ftp://10.0.0.1/", allow_private=True) == MSG_SCHEME


# ---------------------------------------------------------------------------------------------
# Connect-time check inside the client


def test_blocked_targets_are_never_connected():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = HttpClient()  # the default: only public addresses
        reasons = {}
        for url in (
            target.url("/"),
            f"http://localhost:{target.port}/",
            f"http://[::1]:{target.port}/",
            f"http://[::ffff:127.0.0.1]:{target.port}/",
            f"http://127.1:{target.port}/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "https://[fe80::1]/",
        ):
            with pytest.raises(BlockedAddress) as info:
                await client.request("GET", url, [], None, 2)
            reasons[url] = info.value
        await client.close()
        await target.stop()
        return reasons, target.connections

    reasons, connections = run(main())
    assert connections == 0
    assert len(reasons) == 8
    texts = [error.reason for error in reasons.values()]
    assert texts[0] == "blocked_address 127.0.0.1"
    assert texts[1] in ("blocked_address 127.0.0.1", "blocked_address ::1")  # localhost
    assert texts[2] == "blocked_address ::1"
    assert texts[3] == "blocked_address ::ffff:127.0.0.1"
    assert texts[4] == "blocked_address 127.0.0.1"
    assert texts[5:] == [
        "blocked_address 10.0.0.1",
        "blocked_address 169.254.169.254",
        "blocked_address fe80::1",
    ]
    assert all(error.url is not None for error in reasons.values())


def test_a_name_resolving_to_loopback_is_blocked():
    async def resolver(host, port):
        return {"public.test": ["8.8.8.8", "127.0.0.1"]}[host]

    async def main():
        client = HttpClient(resolver=resolver)
        with pytest.raises(BlockedAddress) as info:
            await client.request("GET", "http://public.test/", [], None, 2)
        await client.close()
        return info.value

    error = run(main())
    # One internal address among public ones is enough: the record set is refused.
    assert error.reason == "blocked_address 127.0.0.1"
    assert error.address == "127.0.0.1"


# A test-only policy: 127.0.0.1 plays the part of a public address, the rest of 127/8 stays
# forbidden, so "allowed" and "blocked" hops can both be served on loopback.
def loopback_is_public(ip):
    return ip == ipaddress.ip_address("127.0.0.1") or public_only(ip)


def test_connects_to_the_checked_address_without_resolving_again():
    calls = []

    async def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"]

    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = HttpClient(resolver=resolver, address_policy=loopback_is_public)
        # public.test exists in no DNS: only the injected answer can have been used.
        result = await client.request("GET", f"http://public.test:{target.port}/x", [], None, 2)
        await client.close()
        await target.stop()
        return result, target.requests[0]

    result, request = run(main())
    assert result.status == 200
    assert request.header("host").startswith("public.test:")
    assert calls == ["public.test"]


class OneShotServer:
    """Answers the first request of every connection with fixed bytes, then closes it."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.accepted = 0
        self._tasks = set()

    async def start(self):
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        self._tasks.add(asyncio.current_task())
        self.accepted += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.reply)
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()
            self._tasks.discard(asyncio.current_task())

    async def stop(self):
        self._server.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def test_redirect_to_an_internal_address_is_blocked():
    async def resolver(host, port):
        return {"public.test": ["127.0.0.1"]}[host]

    async def main():
        target = await MockTarget.start("127.0.0.1")
        location = f"http://127.0.0.2:{target.port}/internal"
        server = await OneShotServer(
            f"HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n".encode()
        ).start()
        client = HttpClient(resolver=resolver, address_policy=loopback_is_public)
        with pytest.raises(BlockedAddress) as info:
            await client.request("GET", f"http://public.test:{server.port}/start", [], None, 2)
        await client.close()
        await server.stop()
        await target.stop()
        return info.value, server.accepted, target.connections

    error, first_hop_connections, internal_connections = run(main())
    assert error.reason == "blocked_address 127.0.0.2"
    assert error.url.endswith("/internal")
    assert first_hop_connections == 1
    assert internal_connections == 0


def test_dns_rebinding_is_caught_on_the_next_connection():
    answers = [["127.0.0.1"], ["169.254.169.254"]]

    async def resolver(host, port):
        return answers.pop(0)

    async def main():
        server = await OneShotServer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        ).start()
        client = HttpClient(resolver=resolver, address_policy=loopback_is_public)
        url = f"http://rebind.test:{server.port}/"
        first = await client.request("GET", url, [], None, 2)
        # The server closed the connection, so the next request resolves again.
        with pytest.raises(BlockedAddress) as info:
            await client.request("GET", url, [], None, 2)
        await client.close()
        await server.stop()
        return first.body, info.value.reason, server.accepted

    body, reason, accepted = run(main())
    assert body == b"ok"
    assert reason == "blocked_address 169.254.169.254"
    assert accepted == 1


def test_allow_private_reaches_loopback():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = HttpClient(allow_private=True)
        result = await client.request("GET", f"http://localhost:{target.port}/ok", [], None, 2)
        await client.close()
        await target.stop()
        return result.status

    assert run(main()) == 200
