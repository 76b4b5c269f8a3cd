"""Matrix encrypted attachments (the ``EncryptedFile`` object), encrypted and decrypted as streams.

The client-server spec ("Sending encrypted attachments") encrypts a file with AES-256-CTR under a
fresh random key, and describes it with an ``EncryptedFile`` object::

    {"url": "mxc://...", "v": "v2",
     "key": {"kty": "oct", "key_ops": ["encrypt", "decrypt"], "alg": "A256CTR",
             "k": <unpadded url-safe base64 of the 32-byte key>, "ext": true},
     "iv": <unpadded base64 of 16 bytes: 8 random bytes, then a 64-bit counter starting at 0>,
     "hashes": {"sha256": <unpadded base64 of the SHA-256 of the *ciphertext*>}}

Files can be hundreds of megabytes, so nothing here holds a whole file: :class:`Encryptor` and
:class:`Decryptor` turn one chunk into one chunk of the same size (CTR mode needs no padding and
no buffering), and the SHA-256 is computed as the chunks go by.

Keys never appear in log lines nor in error messages; the ``EncryptedFile`` dict itself carries
the key, so callers must not log it either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["AttachmentError", "Decryptor", "Encryptor", "decrypt_stream", "encrypt_stream"]

_KEY_SIZE = 32
_IV_SIZE = 16
_SHA256_SIZE = 32


class AttachmentError(Exception):
    """An ``EncryptedFile`` that cannot be used: malformed, unsupported, or failing its hash."""


def _b64encode(data: bytes, *, urlsafe: bool = False) -> str:
    """Unpadded base64, as the Matrix spec writes it."""
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode("ascii").rstrip("=")


def _b64decode(value: object, what: str) -> bytes:
    """Decode base64 that may be padded or not, in the standard or the url-safe alphabet.

    ``what`` names the field in the error message; the value itself is never quoted (it may be
    a key).
    """
    if not isinstance(value, str):
        raise AttachmentError(f"{what} is not a string")
    text = value.strip().rstrip("=")
    if len(text) % 4 == 1:
        raise AttachmentError(f"{what} is not valid base64 (bad length)")
    text = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise AttachmentError(f"{what} is not valid base64") from None


def _require(obj: Mapping[str, Any], field: str, wanted: str, what: str) -> None:
    value = obj.get(field)
    if value == wanted:
        return
    shown = "missing" if value is None else repr(value if isinstance(value, str) else type(value))
    raise AttachmentError(f"unsupported {what} {shown[:40]}: only {wanted!r} is supported")


class Encryptor:
    """Encrypts a stream chunk by chunk; after the last chunk, .file(url) gives the EncryptedFile.

    Each call to :meth:`update` returns exactly as many bytes as it was given; nothing is
    buffered.
    """

    def __init__(self) -> None:
        self._key = os.urandom(_KEY_SIZE)
        # 8 random bytes, then a 64-bit block counter starting at zero: the spec's layout, which
        # leaves 2**64 blocks before the counter could carry into the random half.
        self._iv = os.urandom(8) + b"\x00" * 8
        self._cipher = Cipher(algorithms.AES(self._key), modes.CTR(self._iv)).encryptor()
        self._sha256 = hashlib.sha256()
        self._digest: bytes | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} finished={self._digest is not None}>"

    def update(self, chunk: bytes) -> bytes:
        """Encrypt the next chunk of plaintext; returns ciphertext of the same length."""
        if self._digest is not None:
            raise RuntimeError("Encryptor.update() called after file()")
        encrypted = self._cipher.update(chunk)
        self._sha256.update(encrypted)
        return encrypted

    def file(self, url: str) -> dict[str, Any]:
        """The ``EncryptedFile`` for the ciphertext produced so far, stored at ``url``.

        Call it once every chunk went through :meth:`update`; the encryptor is then finished (a
        second call returns the same description, with the given url).
        """
        if self._digest is None:
            self._cipher.finalize()  # CTR: always b""
            self._digest = self._sha256.digest()
        return {
            "url": url,
            "v": "v2",
            "key": {
                "kty": "oct",
                "key_ops": ["encrypt", "decrypt"],
                "alg": "A256CTR",
                "k": _b64encode(self._key, urlsafe=True),
                "ext": True,
            },
            "iv": _b64encode(self._iv),
            "hashes": {"sha256": _b64encode(self._digest)},
        }


async def encrypt_stream(
    chunks: AsyncIterator[bytes], encryptor: Encryptor
) -> AsyncIterator[bytes]:
    """Yield the ciphertext of ``chunks``, one chunk out per non-empty chunk in, same sizes.

    Once the stream is exhausted (and the ciphertext uploaded), ``encryptor.file(url)`` gives
    the ``EncryptedFile`` to put in the event.
    """
    async for chunk in chunks:
        if chunk:
            yield encryptor.update(chunk)


class Decryptor:
    """Decrypts the ciphertext of one ``EncryptedFile`` chunk by chunk, checking its SHA-256.

    The constructor validates the ``EncryptedFile`` and raises :class:`AttachmentError` naming
    the problem. Only version ``v2`` is accepted (``v1`` and an absent ``v`` are refused:
    clients have sent ``v2`` since 2019), with a ``kty: oct``, ``alg: A256CTR`` key of 32 bytes,
    a 16-byte iv and a ``sha256`` hash.
    """

    def __init__(self, file: Mapping[str, Any]) -> None:
        if not isinstance(file, Mapping):
            raise AttachmentError("encrypted file is not an object")
        _require(file, "v", "v2", "encrypted file version")

        jwk = file.get("key")
        if not isinstance(jwk, Mapping):
            raise AttachmentError("key is missing or not an object")
        _require(jwk, "kty", "oct", "key type")
        _require(jwk, "alg", "A256CTR", "key algorithm")
        key = _b64decode(jwk.get("k"), "key 'k'")
        if len(key) != _KEY_SIZE:
            raise AttachmentError(f"key 'k' is {len(key)} bytes long, need {_KEY_SIZE}")

        iv = _b64decode(file.get("iv"), "iv")
        if len(iv) != _IV_SIZE:
            raise AttachmentError(f"iv is {len(iv)} bytes long, need {_IV_SIZE}")

        hashes = file.get("hashes")
        if not isinstance(hashes, Mapping) or "sha256" not in hashes:
            raise AttachmentError("hashes.sha256 is missing")
        expected = _b64decode(hashes["sha256"], "hashes.sha256")
        if len(expected) != _SHA256_SIZE:
            raise AttachmentError(
                f"hashes.sha256 is {len(expected)} bytes long, need {_SHA256_SIZE}"
            )

        self._expected = expected
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
        self._sha256 = hashlib.sha256()
        self._verified = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} verified={self._verified}>"

    def update(self, chunk: bytes) -> bytes:
        """Decrypt the next chunk of ciphertext; returns plaintext of the same length.

        The plaintext is not trustworthy until :meth:`verify` passed.
        """
        if self._verified:
            raise RuntimeError("Decryptor.update() called after verify()")
        self._sha256.update(chunk)
        return self._cipher.update(chunk)

    def verify(self) -> None:
        """After the last chunk: raise :class:`AttachmentError` unless the SHA-256 matches."""
        if not self._verified:
            self._cipher.finalize()  # CTR: always b""
            self._verified = True
        if not hmac.compare_digest(self._sha256.digest(), self._expected):
            raise AttachmentError("hash mismatch: the ciphertext does not match hashes.sha256")


async def decrypt_stream(
    chunks: AsyncIterator[bytes], file: Mapping[str, Any]
) -> AsyncIterator[bytes]:
    """Yield the plaintext of ``chunks`` (the ciphertext of ``file``), chunk for chunk.

    Raises :class:`AttachmentError` before yielding anything if ``file`` is malformed, and at the
    very end, after the last plaintext chunk, if the ciphertext does not match its SHA-256: the
    hash can only be checked once everything went by. Callers therefore must not commit what
    they streamed (publish a file, acknowledge a message) before the generator is exhausted, and
    treat an :class:`AttachmentError` as a failed delivery.
    """
    decryptor = Decryptor(file)
    async for chunk in chunks:
        if chunk:
            yield decryptor.update(chunk)
    decryptor.verify()
