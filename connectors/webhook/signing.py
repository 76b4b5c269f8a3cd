"""The webhook contract's headers: request signatures (HMAC-SHA256 over ``<timestamp>.<payload>``,
the same rule both directions, see ``connectors.kit.signing``), file uploads, idempotency."""

from __future__ import annotations

from connectors.kit.signing import MAX_SIGNATURES, SignedWebhook

TIMESTAMP_HEADER = "X-Eimis-Timestamp"
SIGNATURE_HEADER = "X-Eimis-Signature"
DIGEST_HEADER = "X-Eimis-Content-SHA256"
FILENAME_HEADER = "X-Eimis-Filename"
IDEMPOTENCY_HEADER = "Idempotency-Key"

SIGNATURES = SignedWebhook(TIMESTAMP_HEADER, SIGNATURE_HEADER, max_signatures=MAX_SIGNATURES)
"""How the bridge signs its calls to the vendor and checks the vendor's pushes."""
