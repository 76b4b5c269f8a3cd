"""The crypto pickle key: what every Olm account, Olm session and Megolm session is pickled
(encrypted) under before it reaches the database.

The key is random, made once per bridge, and stored in the database sealed under the operator's
secrets key (``secrets.key_file``, bridge/secrets.py): the database alone opens nothing, and
rotating the secrets key reseals this one value (``eimis-bridge secrets rotate``) without
touching the pickles.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.db.crypto import CryptoStore
from bridge.secrets import SecretBox, sealed_key_id

META_NAME = "pickle_key"
SEAL_CONTEXT = "crypto pickle key"
_NONCE = 12


class PickleKeyError(Exception):
    """A value sealed under the pickle key does not open (altered, or moved)."""


class PickleKey:
    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError("a pickle key is 32 bytes")
        self.raw = raw
        self._aead = AESGCM(raw)

    @classmethod
    async def load(cls, store: CryptoStore, box: SecretBox) -> PickleKey:
        """The bridge's pickle key, made and stored sealed on first use."""
        sealed = await store.meta(META_NAME)
        if sealed is None:
            fresh = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
            sealed = await store.put_meta_once(META_NAME, box.seal(fresh, SEAL_CONTEXT))
        key = cls(base64.b64decode(box.open(sealed, SEAL_CONTEXT)))
        if box.needs_resealing(sealed):
            await store.set_meta(
                META_NAME, box.seal(base64.b64encode(key.raw).decode(), SEAL_CONTEXT)
            )
        return key

    @staticmethod
    async def reseal(store: CryptoStore, box: SecretBox) -> str | None:
        """``secrets rotate``: seal the stored pickle key again with the current key (nothing
        else changes). Returns the id of the key that had sealed it, None when there is none."""
        sealed = await store.meta(META_NAME)
        if sealed is None:
            return None
        was = sealed_key_id(sealed)
        if box.needs_resealing(sealed):
            await store.set_meta(META_NAME, box.seal(box.open(sealed, SEAL_CONTEXT), SEAL_CONTEXT))
        else:
            box.open(sealed, SEAL_CONTEXT)  # proves it opens
        return was

    def seal(self, value: str, context: str) -> str:
        """A small value (cross-signing seeds) encrypted for ``context`` (its owner)."""
        nonce = secrets.token_bytes(_NONCE)
        data = self._aead.encrypt(nonce, value.encode(), context.encode())
        return base64.urlsafe_b64encode(nonce + data).decode("ascii")

    def open(self, sealed: str, context: str) -> str:
        blob = base64.urlsafe_b64decode(sealed)
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], context.encode()).decode()
        except InvalidTag:
            raise PickleKeyError(f"a value sealed for {context} does not open") from None

    def __repr__(self) -> str:
        return "PickleKey(...)"
