"""Signed webhooks: HMAC-SHA256 over ``<timestamp>.<body>``, as both vendors and the webhook
contract use it.

A request carries a unix time in seconds in one header and ``sha256=<hex HMAC-SHA256(secret,
"<timestamp>.<body>")>`` in another (during a secret rotation, several such values separated by
commas, the current secret's first). The receiver accepts it when one listed value is the
body's under one of its accepted secrets (every pair compared in constant time) and the
timestamp is within its replay window. Only the header names differ between vendors: a
``SignedWebhook`` names them.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_SIGNATURES = 5
"""Signatures read from one header (a rotation needs two); more is refused, so a request cannot
make the receiver compute hundreds of HMACs."""

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"sha256=([0-9a-f]{64})")


def sign(secret: str, timestamp: str, payload: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<payload>")>``."""
    stamp = timestamp.encode("utf-8", "surrogateescape")
    mac = hmac.new(secret.encode("utf-8"), stamp + b"." + payload, "sha256")
    return "sha256=" + mac.hexdigest()


@dataclass(frozen=True)
class SignedWebhook:
    """One vendor's signature headers, and the rules for reading them.

    ``max_signatures``: values one signature header may list (1 for a vendor whose header holds
    exactly one)."""

    timestamp_header: str
    signature_header: str
    max_signatures: int = MAX_SIGNATURES

    # Signing --------------------------------------------------------------------------------

    def signature_value(self, secrets: Sequence[str], timestamp: str, payload: bytes) -> str:
        """The signature header's value: one signature per secret, the current one first."""
        return ", ".join(sign(secret, timestamp, payload) for secret in secrets)

    def headers(self, secrets: Sequence[str], payload: bytes, now: float) -> dict[str, str]:
        """Both headers of a request signed at ``now`` (unix seconds)."""
        timestamp = str(int(now))
        return {
            self.timestamp_header: timestamp,
            self.signature_header: self.signature_value(secrets, timestamp, payload),
        }

    # Verifying ------------------------------------------------------------------------------

    def header_refusal(
        self,
        secrets: Sequence[str],
        timestamp: str | None,
        signatures: str | None,
        *,
        now: float,
        window_s: int,
    ) -> str | None:
        """Why a request cannot be authentic from its headers alone (missing, malformed,
        outside the replay window, no secret to check with), as a sentence naming the rule;
        None when its signature is worth checking. Needs no body: a request refused here is
        refused unread."""
        if not timestamp or not signatures:
            return f"the {self.timestamp_header} and {self.signature_header} headers are required"
        if not _TIMESTAMP.fullmatch(timestamp):
            return f"{self.timestamp_header} must be a unix time in seconds (digits only)"
        given = signatures.split(",")
        if len(given) > self.max_signatures:
            return f"{self.signature_header} lists more than {self.max_signatures} signatures"
        if any(_SIGNATURE.fullmatch(part.strip()) is None for part in given):
            return self._malformed()
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
        self, secrets: Sequence[str], timestamp: str, signatures: str, payload: bytes
    ) -> str | None:
        """Whether one of the signatures (headers already passed ``header_refusal``) is the
        payload's under one of the secrets; every pair is compared, in constant time."""
        digests = []
        for part in signatures.split(","):
            match = _SIGNATURE.fullmatch(part.strip())
            if match is None:  # header_refusal says so first
                return self._malformed()
            digests.append(match.group(1).encode("ascii"))
        matched = False
        for secret in secrets:
            expected = sign(secret, timestamp, payload)[len("sha256=") :].encode("ascii")
            for digest in digests:
                matched |= hmac.compare_digest(expected, digest)
        if not matched:
            return "the signature does not match (check the shared secret and the signed bytes)"
        return None

    def refusal(
        self,
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
        reason = self.header_refusal(secrets, timestamp, signatures, now=now, window_s=window_s)
        if reason is not None or timestamp is None or signatures is None:
            return reason
        return self.signature_refusal(secrets, timestamp, signatures, payload)

    def _malformed(self) -> str:
        return f"{self.signature_header} must be 'sha256=' and 64 lower-case hex digits"
