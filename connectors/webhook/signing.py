"""Request signatures of the webhook contract: HMAC-SHA256 over ``<timestamp>.<payload>``.

The same rule signs both directions, so this module is the whole of it: what a signature is,
how a header lists several (during a secret rotation), and why a request is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

TIMESTAMP_HEADER = "X-Eimis-Timestamp"
SIGNATURE_HEADER = "X-Eimis-Signature"
DIGEST_HEADER = "X-Eimis-Content-SHA256"
FILENAME_HEADER = "X-Eimis-Filename"
IDEMPOTENCY_HEADER = "Idempotency-Key"

MAX_SIGNATURES = 5
"""Signatures read from one header (a rotation needs two); more is refused, so a request cannot
make the receiver compute hundreds of HMACs."""

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"sha256=([0-9a-f]{64})")


def signature(secret: str, timestamp: str, payload: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<payload>")>``."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + payload, "sha256")
    return "sha256=" + mac.hexdigest()


def signature_header(secrets: Sequence[str], timestamp: str, payload: bytes) -> str:
    """The ``X-Eimis-Signature`` value: one signature per secret, the current one first."""
    return ", ".join(signature(secret, timestamp, payload) for secret in secrets)


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_refusal(
    secrets: Sequence[str],
    timestamp: str | None,
    signatures: str | None,
    *,
    now: float,
    window_s: int,
) -> str | None:
    """Why a request cannot be authentic from its headers alone (missing, malformed, outside
    the replay window, no secret to check with), as a sentence naming the rule; None when its
    signature is worth checking. Needs no body: a request refused here is refused unread."""
    if not timestamp or not signatures:
        return f"the {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} headers are required"
    if not _TIMESTAMP.fullmatch(timestamp):
        return f"{TIMESTAMP_HEADER} must be a unix time in seconds (digits only)"
    given = [part.strip() for part in signatures.split(",")]
    if len(given) > MAX_SIGNATURES:
        return f"{SIGNATURE_HEADER} lists more than {MAX_SIGNATURES} signatures"
    if any(_SIGNATURE.fullmatch(part) is None for part in given):
        return f"{SIGNATURE_HEADER} must be 'sha256=' and 64 lower-case hex digits"
    if not secrets:
        return "this connector has no shared secret yet; the operator must set one"
    skew = abs(now - int(timestamp))
    if skew > window_s:
        return (
            f"the timestamp is {skew:.0f} s away from the receiver's clock, outside the "
            f"{window_s} s replay window"
        )
    return None


def signature_refusal(
    secrets: Sequence[str], timestamp: str, signatures: str, payload: bytes
) -> str | None:
    """Whether one of the signatures (headers already passed ``header_refusal``) is the
    payload's under one of the secrets; every pair is compared, in constant time."""
    digests = []
    for part in signatures.split(","):
        match = _SIGNATURE.fullmatch(part.strip())
        if match is None:  # header_refusal says so first
            return f"{SIGNATURE_HEADER} must be 'sha256=' and 64 lower-case hex digits"
        digests.append(match.group(1).encode("ascii"))
    matched = False
    for secret in secrets:
        expected = signature(secret, timestamp, payload)[len("sha256=") :].encode("ascii")
        for digest in digests:
            matched |= hmac.compare_digest(expected, digest)
    if not matched:
        return "the signature does not match (check the shared secret and the signed bytes)"
    return None


def refusal(
    secrets: Sequence[str],
    timestamp: str | None,
    signatures: str | None,
    payload: bytes,
    *,
    now: float,
    window_s: int,
) -> str | None:
    """Why a request is not authentic, as a sentence naming the rule; None when it is: the
    header checks, then the signatures."""
    reason = header_refusal(secrets, timestamp, signatures, now=now, window_s=window_s)
    if reason is not None or timestamp is None or signatures is None:
        return reason
    return signature_refusal(secrets, timestamp, signatures, payload)
