"""Secrets at rest: values sealed with AES-256-GCM under the operator's key, so the database
alone reveals none of them.

A sealed value reads ``v1:<key id>:<base64url(nonce | ciphertext | tag)>``. The key id (a short
hash of the key, which reveals nothing usable about it) says which key sealed it, so keys being
rotated out (``secrets.previous_key_files``) still open what they sealed while everything is
sealed again under the new one (``eimis-bridge secrets rotate``). Each value is bound to its
place (``context``: e.g. a connector id and a field name) as associated data: a sealed value
copied into another row or field does not open there.

Keys and plain values never appear in a log line, an error message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.config import ConfigError, SecretsConfig

log = logging.getLogger("eimis.secrets")

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = "v1"
_KEY_ID_LABEL = b"eimis-bridge secrets key id"
_AD_LABEL = "eimis-bridge sealed"
GENERATE_HINT = "create one with 'eimis-bridge secrets generate-key --out FILE'"


class SecretsError(Exception):
    """A value cannot be sealed or opened; the message says why and what to do."""


class KeyUnavailable(SecretsError, ConfigError):
    """No usable key is configured (missing, unreadable, or not 32 bytes of base64)."""


class UnknownKey(SecretsError):
    """The value was sealed with a key that is not configured (neither current nor previous)."""


class NotSealed(SecretsError):
    """The text is not a sealed value (wrong format or version)."""


class TamperedValue(SecretsError):
    """The value does not open: altered, or moved from the place it was sealed for."""


def generate_key() -> str:
    """A new key: 32 random bytes, base64-encoded (what a key file or the env variable holds)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> str:
    """The short public name of a key: 8 hex digits of a keyed hash, never the key."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:8]


def sealed_key_id(sealed: str) -> str:
    """The id of the key that sealed this value (no key needed); NotSealed if it is none."""
    return _split(sealed)[0]


def is_sealed(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        _split(value)
    except NotSealed:
        return False
    return True


def parse_key(text: str, where: str) -> bytes:
    """The key written as base64 (standard or URL-safe alphabet, surrounding spaces ignored)."""
    cleaned = "".join(text.split())
    if not cleaned:
        raise KeyUnavailable(f"{where} is empty; {GENERATE_HINT}")
    try:
        key = base64.b64decode(
            cleaned.replace("-", "+").replace("_", "/") + "=" * (-len(cleaned) % 4),
            validate=True,
        )
    except (binascii.Error, ValueError):
        raise KeyUnavailable(f"{where} is not base64; {GENERATE_HINT}") from None
    if len(key) != KEY_BYTES:
        raise KeyUnavailable(
            f"{where} holds {len(key)} bytes; a key is {KEY_BYTES} random bytes in base64 "
            f"(AES-256); {GENERATE_HINT}"
        )
    return key


def read_key_file(path: Path, setting: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyUnavailable(f"{setting}: {path} does not exist; {GENERATE_HINT}") from None
    except OSError as error:
        raise KeyUnavailable(f"{setting}: cannot read {path} ({error.strerror})") from None
    except UnicodeDecodeError:
        raise KeyUnavailable(f"{setting}: {path} is not a base64 key; {GENERATE_HINT}") from None
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: %s is readable by other users; chmod 600 it", setting, path)
    return parse_key(text, f"{setting} ({path})")


def configured_box(
    config: SecretsConfig, environ: Mapping[str, str] | None = None
) -> SecretBox | None:
    """The box of the configured key, None when no key is configured at all (neither
    ``key_file`` nor the ``key_env`` variable); KeyUnavailable when one is, but unusable."""
    environ = os.environ if environ is None else environ
    if config.key_file is None and not environ.get(config.key_env):
        return None
    return SecretBox.from_config(config, environ)


class SecretBox:
    """Seals with the current key; opens with it or any previous key."""

    def __init__(self, key: bytes, previous: Sequence[bytes] = ()) -> None:
        for candidate in (key, *previous):
            if len(candidate) != KEY_BYTES:
                raise KeyUnavailable(f"a key is {KEY_BYTES} bytes, not {len(candidate)}")
        self.key_id = key_id(key)
        self._sealer = AESGCM(key)
        self._openers: dict[str, AESGCM] = {key_id(k): AESGCM(k) for k in previous}
        self._openers[self.key_id] = self._sealer

    @classmethod
    def from_config(
        cls, config: SecretsConfig, environ: Mapping[str, str] | None = None
    ) -> SecretBox:
        """The key of ``secrets.key_file``, else of the ``secrets.key_env`` variable, plus the
        ``previous_key_files``; KeyUnavailable says what is missing and how to make a key."""
        environ = os.environ if environ is None else environ
        if config.key_file is not None:
            key = read_key_file(config.key_file, "secrets.key_file")
        elif environ.get(config.key_env):
            key = parse_key(environ[config.key_env], f"the environment variable {config.key_env}")
        else:
            raise KeyUnavailable(
                "no key to seal secrets at rest: set secrets.key_file, or the environment "
                f"variable {config.key_env}, to a key; {GENERATE_HINT}"
            )
        previous = [
            read_key_file(path, f"secrets.previous_key_files[{index}]")
            for index, path in enumerate(config.previous_key_files)
        ]
        return cls(key, previous)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key this box opens with, the current one first."""
        return (self.key_id, *(k for k in self._openers if k != self.key_id))

    def seal(self, value: str, context: str) -> str:
        """``value`` sealed for ``context`` (its place: the same context opens it)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        data = self._sealer.encrypt(nonce, value.encode("utf-8"), _ad(self.key_id, context))
        token = base64.urlsafe_b64encode(nonce + data).decode("ascii").rstrip("=")
        return f"{VERSION}:{self.key_id}:{token}"

    def open(self, sealed: str, context: str) -> str:
        kid, blob = _split(sealed)
        opener = self._openers.get(kid)
        if opener is None:
            raise UnknownKey(
                f"a value was sealed with key {kid}, which is not configured (current key "
                f"{self.key_id}); put that key's file in secrets.previous_key_files"
            )
        try:
            plain = opener.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _ad(kid, context))
        except InvalidTag:
            raise TamperedValue(
                f"a value sealed for {context} does not open: it was altered or copied from "
                "another place"
            ) from None
        return plain.decode("utf-8")

    def needs_resealing(self, sealed: str) -> bool:
        """Sealed with a previous key (``secrets rotate`` seals it again with the current)."""
        return sealed_key_id(sealed) != self.key_id

    def __repr__(self) -> str:
        return f"SecretBox(key {self.key_id}, {len(self._openers) - 1} previous)"


def _ad(kid: str, context: str) -> bytes:
    return f"{_AD_LABEL}|{VERSION}|{kid}|{context}".encode()


def _split(sealed: str) -> tuple[str, bytes]:
    parts = sealed.split(":")
    if len(parts) != 3 or parts[0] != VERSION or len(parts[1]) != 8:
        raise NotSealed(f"not a sealed value (expected {VERSION}:<key id>:<data>)")
    try:
        blob = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
    except (binascii.Error, ValueError):
        raise NotSealed("a sealed value's data is not base64") from None
    if len(blob) < NONCE_BYTES + 16:
        raise NotSealed("a sealed value is too short to hold a nonce and a tag")
    return parts[1], blob
