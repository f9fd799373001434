"""Signatures on outbound deliveries (CONTRACT "Outbound requests", DECISIONS 18).

Two schemes are sent on every delivery:

``x-runlater-signature`` (upstream compatible, spec §2.2)
    ``"sha256=" + hex(HMAC-SHA256(key=secret, msg=body))`` where the key is the organization's
    secret string *as written*, ``whsec_`` prefix included, encoded as UTF-8. It covers only the
    body, so it offers no replay protection; it is kept so existing receivers keep working.

Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``)
    ``webhook-signature`` is a space-separated list of ``v1,<base64(HMAC-SHA256(key, msg))>``
    with ``msg = f"{id}.{timestamp}.".encode() + body``; one entry per active secret, so during a
    rotation receivers holding either the old or the new secret can verify.

    **Key bytes.** The Standard Webhooks specification derives the key by stripping ``whsec_`` and
    base64-decoding the rest. We do exactly that, so the official Standard Webhooks and Svix
    libraries verify our deliveries when handed the secret string as shown to the user. Our
    organization secrets are ``whsec_`` + 48 hex characters; hex digits are valid base64 and 48
    characters decode to a 36-byte key. The key is therefore *not* the hex-decoded 24 bytes and
    *not* the text itself (that is the upstream scheme above) — the two schemes deliberately use
    different key bytes derived from the same secret string.

The verification helpers compare in constant time and are meant for tests and for users'
receivers written in Python.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

UPSTREAM_HEADER = "x-runlater-signature"
_UPSTREAM_PREFIX = "sha256="
_WHSEC_PREFIX = "whsec_"

# Standard Webhooks' recommended replay window.
DEFAULT_TOLERANCE_SECONDS = 300


def upstream_signature(secret: str, body: bytes) -> str:
    """The ``x-runlater-signature`` value: ``sha256=`` + lowercase hex HMAC-SHA256 of ``body``."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return _UPSTREAM_PREFIX + digest


def verify_upstream_signature(secret: str, body: bytes, signature: str) -> bool:
    """True if ``signature`` is exactly ``upstream_signature(secret, body)``.

    The prefixed string is compared as a whole, so a bare hex digest never verifies (as upstream).
    """
    expected = upstream_signature(secret, body).encode()
    try:
        given = signature.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        return False
    return hmac.compare_digest(expected, given)


def webhook_key(secret: str) -> bytes:
    """The HMAC key Standard Webhooks derives from ``secret``: base64 of the part after ``whsec_``.

    Raises ``ValueError`` if that part is not valid base64 (the secret itself is not echoed).
    """
    encoded = secret.removeprefix(_WHSEC_PREFIX)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"webhook secret is not whsec_ followed by base64 ({len(encoded)} characters after the prefix)"
        ) from None


def _signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature entry for ``secret``."""
    mac = hmac.new(webhook_key(secret), _signed_content(msg_id, timestamp, body), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def webhook_headers(
    msg_id: str, timestamp: int, body: bytes, secrets: list[str]
) -> list[tuple[str, str]]:
    """The three Standard Webhooks headers, one signature per secret in ``secrets`` order.

    ``msg_id`` should stay the same across retries of one delivery (receivers deduplicate on it);
    ``timestamp`` is the send time in whole seconds since the epoch.
    """
    if not secrets:
        raise ValueError("webhook_headers needs at least one secret, got none")
    signatures = " ".join(sign_webhook(secret, msg_id, timestamp, body) for secret in secrets)
    return [
        ("webhook-id", msg_id),
        ("webhook-timestamp", str(timestamp)),
        ("webhook-signature", signatures),
    ]


def _header(headers: Mapping[str, str] | Iterable[tuple[str, str]], name: str) -> str | None:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in pairs:
        if key.lower() == name:
            return value
    return None


def verify_webhook(
    secrets: str | list[str],
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """True if the Standard Webhooks headers carry a valid ``v1`` signature for any of ``secrets``
    and ``webhook-timestamp`` is within ``tolerance`` seconds of ``now`` (default: the clock).

    ``headers`` may be a mapping or a list of pairs; names are matched case-insensitively.
    """
    if isinstance(secrets, str):
        secrets = [secrets]
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signature_header = _header(headers, "webhook-signature")
    if msg_id is None or stamp is None or signature_header is None:
        return False
    if not (stamp.isascii() and stamp.isdigit()):
        return False
    timestamp = int(stamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    given = [entry[3:].encode() for entry in signature_header.split(" ") if entry.startswith("v1,")]
    for secret in secrets:
        expected = sign_webhook(secret, msg_id, timestamp, body)[3:].encode()
        for candidate in given:
            if hmac.compare_digest(expected, candidate):
                return True
    return False
