"""Signed JSON (the Matrix specification's "Signing JSON") and cross-signing keys.

A device signs its keys with its Olm account (vodozemac); a user's cross-signing keys (master,
self-signing, user-signing) are plain Ed25519 keys, held here with ``cryptography``, since
vodozemac exposes no standalone signing key.
"""

from __future__ import annotations

import base64
import binascii
import copy
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from canonicaljson import encode_canonical_json
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ED25519 = "ed25519"


def unpadded_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not (Matrix uses unpadded standard base64)."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)


def signable(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON a signature covers: without ``signatures`` and ``unsigned``."""
    stripped = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    return encode_canonical_json(stripped)


def sign_json(
    obj: dict[str, Any], user_id: str, key_id: str, sign: Callable[[bytes], str]
) -> dict[str, Any]:
    """``obj`` with one more signature (``sign`` returns unpadded base64)."""
    signed = copy.deepcopy(obj)
    signature = sign(signable(obj))
    signed.setdefault("signatures", {}).setdefault(user_id, {})[f"{ED25519}:{key_id}"] = signature
    return signed


def verify_json(obj: Mapping[str, Any], user_id: str, key_id: str, public_key: str) -> bool:
    """Whether ``obj`` carries a valid signature by ``user_id``'s Ed25519 key ``key_id``."""
    signatures = obj.get("signatures")
    if not isinstance(signatures, Mapping):
        return False
    by_user = signatures.get(user_id)
    signature = by_user.get(f"{ED25519}:{key_id}") if isinstance(by_user, Mapping) else None
    if not isinstance(signature, str):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(b64decode(public_key))
        key.verify(b64decode(signature), signable(obj))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 key of a user's cross-signing identity; its public key is also its id."""

    seed: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(secrets.token_bytes(32))

    @property
    def public(self) -> str:
        raw = Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes_raw()
        return unpadded_b64(raw)

    def sign(self, message: bytes) -> str:
        return unpadded_b64(Ed25519PrivateKey.from_private_bytes(self.seed).sign(message))

    def __repr__(self) -> str:
        return f"SigningKey({self.public})"


@dataclass(frozen=True)
class CrossSigning:
    """A user's three cross-signing keys."""

    master: SigningKey
    self_signing: SigningKey
    user_signing: SigningKey

    @classmethod
    def generate(cls) -> CrossSigning:
        return cls(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())

    def to_seeds(self) -> str:
        return ".".join(
            unpadded_b64(k.seed) for k in (self.master, self.self_signing, self.user_signing)
        )

    @classmethod
    def from_seeds(cls, text: str) -> CrossSigning:
        master, self_signing, user_signing = (SigningKey(b64decode(p)) for p in text.split("."))
        return cls(master, self_signing, user_signing)

    def upload_body(self, user_id: str) -> dict[str, Any]:
        """The body of ``/keys/device_signing/upload``: each key signed by the master key."""

        def key(usage: str, signing: SigningKey) -> dict[str, Any]:
            return {
                "user_id": user_id,
                "usage": [usage],
                "keys": {f"{ED25519}:{signing.public}": signing.public},
            }

        master = sign_json(
            key("master", self.master), user_id, self.master.public, self.master.sign
        )
        return {
            "master_key": master,
            "self_signing_key": sign_json(
                key("self_signing", self.self_signing),
                user_id,
                self.master.public,
                self.master.sign,
            ),
            "user_signing_key": sign_json(
                key("user_signing", self.user_signing),
                user_id,
                self.master.public,
                self.master.sign,
            ),
        }

    def __repr__(self) -> str:
        return f"CrossSigning(master {self.master.public})"
