"""Which network addresses a delivery may reach (DECISIONS 12).

Two layers, because they answer different questions:

* ``validate_target_url`` runs when a task is saved. It needs no DNS, so it is cheap enough for
  the create hot path, and it rejects what is obviously internal: non-HTTP schemes, missing hosts,
  ``localhost``/``*.localhost``/``*.local``/``*.internal`` names and IP literals in forbidden ranges.
  Its messages are upstream's, so API clients see the same field errors.
* ``resolve_checked`` runs right before every outbound connection (every redirect hop too). It
  resolves the host, rejects the request if ANY resolved address is forbidden, and hands back the
  checked addresses so the caller connects to exactly those — never to a second resolution, which
  is what DNS rebinding would exploit.

Whether private targets are allowed at all (``RUNLATER_ALLOW_PRIVATE_TARGETS=1``) is decided by the
caller; this module only answers "is this address internal".
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Save-time messages, verbatim from upstream (spec §3.1) so error bodies stay compatible.
MSG_SCHEME = "must use HTTP or HTTPS"
MSG_HOST = "must have a valid host"
MSG_PRIVATE = "cannot target private or internal addresses"

# Forbidden IPv4 ranges. Kept as an explicit table rather than ``not ip.is_global`` because the
# stdlib's notion of "global" has changed between patch releases; what we block must not depend on
# the interpreter build. Everything here is either not routable on the public internet or routes
# into the machine's own network (metadata services, carrier NAT, benchmarking nets).
_V4_BLOCKED = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 connects to the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT: other customers of the same provider
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, includes 169.254.169.254 cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments (incl. DS-Lite, NAT64 discovery)
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking; used inside some clouds for internal services
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes 255.255.255.255 broadcast
    )
)

# Forbidden IPv6 ranges that carry no IPv4 address worth unpacking.
_V6_BLOCKED = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/128",  # unspecified
        "::1/128",  # loopback
        "64:ff9b:1::/48",  # local-use NAT64: translates into private IPv4 space by definition
        "100::/64",  # discard-only
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local, still routed internally by some stacks
        "ff00::/8",  # multicast
    )
)

# IPv6 forms that embed an IPv4 address in their low 32 bits; the embedded address decides.
_V6_EMBEDS_V4_LOW32 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::ffff:0:0/96",  # IPv4-mapped
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "::/96",  # IPv4-compatible (deprecated, but kernels may still route it)
        "64:ff9b::/96",  # well-known NAT64 prefix
    )
)
_V6_6TO4 = ipaddress.IPv6Network("2002::/16")


def is_forbidden_address(ip: str | IPAddress) -> bool:
    """True if ``ip`` is loopback, private, link-local, multicast, unspecified, reserved, CGNAT,
    documentation/benchmark space, or an IPv6 form (mapped, compatible, NAT64, 6to4, Teredo)
    of such an IPv4 address. Raises ``ValueError`` for a string that is not an IP address."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if ip.version == 4:
        return any(ip in net for net in _V4_BLOCKED)
    # A zone index (fe80::1%eth0) does not change which range the address is in.
    if ip.scope_id is not None:
        ip = ipaddress.IPv6Address(ip.packed)
    if any(ip in net for net in _V6_BLOCKED):
        return True
    if any(ip in net for net in _V6_EMBEDS_V4_LOW32):
        return is_forbidden_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _V6_6TO4:
        return is_forbidden_address(ip.sixtofour)  # type: ignore[arg-type]
    teredo = ip.teredo
    if teredo is not None:
        # The client address is what the relay ultimately forwards to.
        return is_forbidden_address(teredo[1])
    return False


def _forbidden_host_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith((".localhost", ".local", ".internal"))


# inet_aton accepts shorthand IPv4 spellings ("127.1", "0x7f000001", "2130706433") that
# getaddrinfo will also accept at connect time; catching them at save time gives the clear message.
_LOOSE_V4 = re.compile(r"^[0-9a-fx.]+$", re.IGNORECASE)


def literal_address(host: str) -> IPAddress | None:
    """The IP address ``host`` spells, including shorthand IPv4 forms, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LOOSE_V4.match(host) and not host.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _is_canonical_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def validate_target_url(url: str | None, *, allow_private: bool = False) -> str | None:
    """Save-time check of a target URL; returns upstream's error message, or None when acceptable.

    Empty or missing URLs pass, as upstream: whether a URL is required is the caller's rule.
    Only names and literals are judged here; what a name resolves to is checked at connect time.
    """
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unbalanced "[" in the netloc
        return MSG_HOST
    if parts.scheme.lower() not in ("http", "https"):
        return MSG_SCHEME
    if not host:
        return MSG_HOST
    if allow_private:
        return None
    if _forbidden_host_name(host):
        return MSG_PRIVATE
    ip = literal_address(host)
    if ip is not None and is_forbidden_address(ip):
        return MSG_PRIVATE
    return None


Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressPolicy = Callable[[IPAddress], bool]


class AddressBlocked(Exception):
    """A resolved address failed the policy; ``address`` is the first offending one."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to forbidden address {address}")
        self.host = host
        self.address = address


def public_only(ip: IPAddress) -> bool:
    """The default address policy: allow exactly what ``is_forbidden_address`` does not forbid."""
    return not is_forbidden_address(ip)


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the OS resolver (``loop.getaddrinfo``), keeping order and dropping duplicates."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[str, None] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(sockaddr[0], None)
    return list(seen)


async def resolve_checked(
    host: str, port: int, resolver: Resolver, policy: AddressPolicy | None
) -> list[str]:
    """Addresses for ``host`` that the caller may connect to, in resolver order.

    Raises ``AddressBlocked`` if any address fails ``policy`` (None allows everything): one
    internal address among public ones is enough to refuse, otherwise an attacker could publish a
    mixed record set and win whenever the internal one is tried first. IP literals are not sent
    to the resolver.
    """
    literal = literal_address(host)
    if literal is not None:
        # A canonical literal is kept as written so error messages show what the user typed.
        addresses = [host if _is_canonical_literal(host) else str(literal)]
    else:
        addresses = await resolver(host, port)
    if policy is not None:
        for text in addresses:
            if not policy(ipaddress.ip_address(text)):
                raise AddressBlocked(host, text)
    return addresses
