"""Delivery signatures: upstream's x-runlater-signature and Standard Webhooks, with expected values
computed here independently with hmac, plus the published vectors of both schemes."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from runlater.workers.signing import (
    sign_webhook,
    upstream_signature,
    verify_upstream_signature,
    verify_webhook,
    webhook_headers,
    webhook_key,
)

# An organization secret in the shape we issue: whsec_ + 48 hex characters.
SECRET = "whsec_" + "0123456789abcdef" * 3
NEW_SECRET = "whsec_" + "fedcba9876543210" * 3
BODY = b'{"event":"ping","n":1}'
MSG_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
TS = 1_700_000_000


def expected_upstream(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def expected_v1(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# -- upstream scheme


def test_upstream_published_vector():
    assert upstream_signature("key", b"test") == (
        "sha256=02afb56304902c656fcb737cdd03de6205bb6d401da2812efd9b2d36a08af159"
    )


@pytest.mark.parametrize("body", [BODY, b"", "héllo ✓".encode(), b"\x00\xff" * 1000])
def test_upstream_signature_keys_with_the_whole_secret_string(body):
    signature = upstream_signature(SECRET, body)
    assert signature == expected_upstream(SECRET, body)
    assert len(signature) == len("sha256=") + 64 and signature == signature.lower()
    assert verify_upstream_signature(SECRET, body, signature)


def test_upstream_signature_changes_with_body_and_secret():
    base = upstream_signature(SECRET, BODY)
    assert upstream_signature(SECRET, BODY) == base
    assert upstream_signature(SECRET, BODY + b" ") != base
    assert upstream_signature(NEW_SECRET, BODY) != base
    # The prefix is part of the key: stripping it gives a different signature.
    assert upstream_signature(SECRET.removeprefix("whsec_"), BODY) != base


def test_upstream_verification_rejects():
    signature = upstream_signature(SECRET, BODY)
    assert not verify_upstream_signature(NEW_SECRET, BODY, signature)
    assert not verify_upstream_signature(SECRET, BODY + b"x", signature)
    assert not verify_upstream_signature(SECRET, BODY, signature.removeprefix("sha256="))
    assert not verify_upstream_signature(SECRET, BODY, "garbage")
    assert not verify_upstream_signature(SECRET, BODY, "sha256=" + "é" * 64)
    assert not verify_upstream_signature(SECRET, BODY, signature.upper())


# -- Standard Webhooks


def test_standard_webhooks_published_vector():
    # From the Standard Webhooks / Svix reference test suites.
    assert (
        sign_webhook(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_webhook_key_is_base64_of_the_text_after_the_prefix():
    key = webhook_key(SECRET)
    assert key == base64.b64decode("0123456789abcdef" * 3)
    assert len(key) == 36
    assert key != bytes.fromhex("0123456789abcdef" * 3)
    assert webhook_key("0123456789abcdef" * 3) == key  # the prefix is optional
    with pytest.raises(ValueError, match="5 characters after the prefix") as info:
        webhook_key("whsec_ab!cd")
    assert "ab!cd" not in str(info.value)  # secrets are not echoed in errors


def test_webhook_headers_one_secret():
    headers = webhook_headers(MSG_ID, TS, BODY, [SECRET])
    assert headers == [
        ("webhook-id", MSG_ID),
        ("webhook-timestamp", str(TS)),
        ("webhook-signature", expected_v1(SECRET, MSG_ID, TS, BODY)),
    ]
    assert verify_webhook(SECRET, headers, BODY, now=TS)
    assert verify_webhook([SECRET], dict(headers), BODY, now=TS + 299)


def test_webhook_headers_during_rotation_sign_with_both_secrets():
    headers = webhook_headers(MSG_ID, TS, BODY, [NEW_SECRET, SECRET])
    signature = dict(headers)["webhook-signature"]
    assert signature == (
        f"{expected_v1(NEW_SECRET, MSG_ID, TS, BODY)} {expected_v1(SECRET, MSG_ID, TS, BODY)}"
    )
    # A receiver holding either secret verifies; one holding neither does not.
    assert verify_webhook(SECRET, headers, BODY, now=TS)
    assert verify_webhook(NEW_SECRET, headers, BODY, now=TS)
    assert verify_webhook([NEW_SECRET, SECRET], headers, BODY, now=TS)
    assert not verify_webhook("whsec_" + "00" * 24, headers, BODY, now=TS)


def test_webhook_verification_rejects():
    headers = webhook_headers(MSG_ID, TS, BODY, [SECRET])
    as_dict = dict(headers)
    assert not verify_webhook(SECRET, headers, BODY + b" ", now=TS)
    assert not verify_webhook(SECRET, {**as_dict, "webhook-id": "other"}, BODY, now=TS)
    assert not verify_webhook(SECRET, {**as_dict, "webhook-timestamp": str(TS + 1)}, BODY, now=TS)
    assert not verify_webhook(SECRET, {**as_dict, "webhook-timestamp": "soon"}, BODY, now=TS)
    assert not verify_webhook(SECRET, headers, BODY, now=TS + 301)  # replay window
    assert not verify_webhook(SECRET, headers, BODY, now=TS - 301)
    assert not verify_webhook(SECRET, {"webhook-id": MSG_ID}, BODY, now=TS)
    v1 = as_dict["webhook-signature"]
    assert not verify_webhook(
        SECRET, {**as_dict, "webhook-signature": "v2," + v1[3:]}, BODY, now=TS
    )
    assert not verify_webhook(SECRET, {**as_dict, "webhook-signature": v1[3:]}, BODY, now=TS)
    # Header names are case-insensitive, as on the wire.
    upper = [(name.upper(), value) for name, value in headers]
    assert verify_webhook(SECRET, upper, BODY, now=TS)


def test_webhook_headers_need_a_secret():
    with pytest.raises(ValueError, match="at least one secret"):
        webhook_headers(MSG_ID, TS, BODY, [])
