"""API key material: generation and hashing.

A key is ``<key_id>.<secret>`` with ``key_id = pk_live_`` + 24 and ``secret = sk_live_``
+ 32 characters of the URL-safe base64 alphabet, drawn from the OS CSPRNG. Only
SHA-256(secret) is stored; the secret is shown once. An unsalted fast hash is right
here: the secret has 192 bits of entropy, so there is nothing to brute-force, and
authentication must stay cheap on every request.
"""

from __future__ import annotations

import base64
import hashlib
import secrets


def _random_chars(n: int) -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(n)).decode()[:n]


def generate_key() -> tuple[str, str]:
    """Return (key_id, secret)."""
    return "pk_live_" + _random_chars(24), "sk_live_" + _random_chars(32)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def generate_webhook_secret() -> str:
    return "whsec_" + secrets.token_hex(24)
