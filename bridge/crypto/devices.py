"""The bridge's own devices: one for the bot, one for each ghost that takes part in an encrypted
room, each with its own Olm account and, for ghosts, its own cross-signing identity.

A native client sees every bridged message come from the ghost's own device, signed by the
ghost's self-signing key, itself signed by the ghost's master key: a verified sender, not one
shared bot device flagged "unverified" on every message (what clients enforcing MSC4153 refuse).

Created lazily and crash-safe: the account is stored (unpublished) before the homeserver hears
of the device; creating the device (``PUT /devices/{id}``, MSC4190) and uploading its keys are
idempotent, so a crash between steps is finished by the next call.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import vodozemac
from cachetools import LRUCache

from bridge.crypto.pickling import PickleKey
from bridge.crypto.signing import CrossSigning, sign_json, unpadded_b64
from bridge.db.crypto import CryptoStore, DeviceRow
from bridge.matrix.keys import KeysApi

log = logging.getLogger("eimis.crypto.devices")

OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"
SIGNED_CURVE25519 = "signed_curve25519"
DEVICE_NAME = "EIMIS bridge"
DEVICE_CACHE_SIZE = 10_000
"""Devices kept in memory (an Olm account is a few kilobytes; the least used go first)."""


DEVICE_PREFIX = "EIMIS"


def new_device_id() -> str:
    """A fresh device id. Stored before the homeserver hears of it, so a crash between the two
    creates the same device again; a database restored or lost means new devices (the old
    ones are deleted: their keys are gone with the database)."""
    return DEVICE_PREFIX + secrets.token_hex(5).upper()


class CrossSigningRefused(Exception):
    """The homeserver did not take a cross-signing signature; tried again at the next use."""


@dataclass
class OwnDevice:
    user_id: str
    device_id: str
    account: vodozemac.Account
    cross_signing: CrossSigning | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the account or one of this device's Olm sessions changes."""

    @property
    def curve25519(self) -> str:
        return str(self.account.curve25519_key.to_base64())

    @property
    def ed25519(self) -> str:
        return str(self.account.ed25519_key.to_base64())

    def sign(self, message: bytes) -> str:
        return str(self.account.sign(message).to_base64())

    def device_keys(self) -> dict[str, Any]:
        keys = {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": [OLM, MEGOLM],
            "keys": {
                f"curve25519:{self.device_id}": self.curve25519,
                f"ed25519:{self.device_id}": self.ed25519,
            },
        }
        return sign_json(keys, self.user_id, self.device_id, self.sign)

    def one_time_keys_body(self, keys: dict[str, Any], *, fallback: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for key_id, key in keys.items():
            content: dict[str, Any] = {"key": key.to_base64()}
            if fallback:
                content["fallback"] = True
            signed = sign_json(content, self.user_id, self.device_id, self.sign)
            body[f"{SIGNED_CURVE25519}:{key_id}"] = signed
        return body


class OwnDevices:
    def __init__(self, store: CryptoStore, keys: KeysApi, pickle_key: PickleKey) -> None:
        self.store = store
        self.keys = keys
        self.pickle_key = pickle_key
        self._devices: LRUCache[str, OwnDevice] = LRUCache(DEVICE_CACHE_SIZE)
        """Published devices, one object per device: every use of an account goes through the
        same object and its lock (two copies could each use, and save, a one-time key)."""
        self._locks: dict[str, asyncio.Lock] = {}

    def drop(self, user_id: str) -> None:
        """Forget the device held in memory (its rows were erased)."""
        self._devices.pop(user_id, None)

    async def get(self, user_id: str) -> OwnDevice | None:
        """The user's device if it exists (published or not), without creating one."""
        device = self._devices.get(user_id)
        if device is not None:
            return device
        row = await self.store.device(user_id)
        if row is None:
            return None
        device = self._devices.get(user_id)  # loaded meanwhile by another task
        if device is None:
            device = self._load(row)
            if row.published:
                self._devices[user_id] = device
        return device

    async def ensure(self, user_id: str, *, cross_sign: bool = True) -> OwnDevice:
        """The user's device, created and published first if needed."""
        device = self._devices.get(user_id)
        if device is not None:
            return device
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            device = self._devices.get(user_id)
            if device is not None:
                return device
            row = await self.store.device(user_id)
            if row is None:
                row = await self._new(user_id, cross_sign=cross_sign)
            device = self._load(row)
            if not row.published:
                await self._publish(device)
            self._devices[user_id] = device
            return device

    def _load(self, row: DeviceRow) -> OwnDevice:
        account = vodozemac.Account.from_pickle(row.account, self.pickle_key.raw)
        cross_signing = (
            CrossSigning.from_seeds(self.pickle_key.open(row.cross_signing, row.user_id))
            if row.cross_signing
            else None
        )
        return OwnDevice(row.user_id, row.device_id, account, cross_signing)

    async def _new(self, user_id: str, *, cross_sign: bool) -> DeviceRow:
        account = vodozemac.Account()
        cross_signing = CrossSigning.generate() if cross_sign else None
        row = DeviceRow(
            user_id,
            new_device_id(),
            account.pickle(self.pickle_key.raw),
            self.pickle_key.seal(cross_signing.to_seeds(), user_id) if cross_signing else None,
            published=False,
        )
        return await self.store.add_device(row)

    async def _publish(self, device: OwnDevice) -> None:
        """Create the device on the homeserver, upload its keys, cross-sign it (idempotent)."""
        await self.keys.create_device(device.user_id, device.device_id, DEVICE_NAME)
        for stale in await self.keys.device_ids(device.user_id):
            if stale != device.device_id and stale.startswith(DEVICE_PREFIX):
                # A device of this bridge whose keys are lost (a database restored or reset):
                # clients would go on encrypting for it.
                await self.keys.delete_device(device.user_id, stale)
                log.info("Deleted a stale bridge device of %s", device.user_id)
        async with device.lock:
            account = device.account
            account.generate_one_time_keys(account.max_number_of_one_time_keys // 2)
            account.generate_fallback_key()
            await self._save(device, published=False)
            body = {
                "device_keys": device.device_keys(),
                "one_time_keys": device.one_time_keys_body(account.one_time_keys, fallback=False),
                "fallback_keys": device.one_time_keys_body(account.fallback_key, fallback=True),
            }
            await self.keys.upload_keys(device.user_id, device.device_id, body)
            account.mark_keys_as_published()
            await self._save(device, published=False)
        if device.cross_signing is not None:
            await self._cross_sign(device, device.cross_signing)
        # Published only once cross-signed: a failure before is finished by the next call.
        async with device.lock:
            await self._save(device, published=True)
        log.info("Device %s of %s published", device.device_id, device.user_id)

    async def _cross_sign(self, device: OwnDevice, cross_signing: CrossSigning) -> None:
        """Upload the user's cross-signing keys and sign the device with the self-signing key."""
        await self.keys.upload_cross_signing(
            device.user_id, cross_signing.upload_body(device.user_id)
        )
        ssk = cross_signing.self_signing
        signed = sign_json(device.device_keys(), device.user_id, ssk.public, ssk.sign)
        signature = signed["signatures"][device.user_id][f"ed25519:{ssk.public}"]
        device_keys = device.device_keys()
        device_keys["signatures"][device.user_id][f"ed25519:{ssk.public}"] = signature
        answer = await self.keys.upload_signatures(
            device.user_id, {device.user_id: {device.device_id: device_keys}}
        )
        if answer.get("failures"):
            raise CrossSigningRefused(
                f"the homeserver refused the cross-signing signature of {device.user_id}'s device"
            )

    async def replenish(
        self,
        user_id: str,
        device_id: str,
        counts: dict[str, int],
        fallback_unused: list[str] | None,
    ) -> None:
        """Top the device's one-time keys up to half the account's capacity; a fallback key that
        was used is replaced (MSC3202 counts, or the answer of an upload)."""
        device = await self.get(user_id)
        if device is None or device.device_id != device_id:
            return
        async with device.lock:
            account = device.account
            target = account.max_number_of_one_time_keys // 2
            missing = target - int(counts.get(SIGNED_CURVE25519, 0))
            new_fallback = fallback_unused is not None and SIGNED_CURVE25519 not in fallback_unused
            if missing <= 0 and not new_fallback:
                return
            body: dict[str, Any] = {}
            if missing > 0:
                account.generate_one_time_keys(missing)
                body["one_time_keys"] = device.one_time_keys_body(
                    account.one_time_keys, fallback=False
                )
            if new_fallback:
                account.generate_fallback_key()
                body["fallback_keys"] = device.one_time_keys_body(
                    account.fallback_key, fallback=True
                )
            await self._save(device, published=False)
            await self.keys.upload_keys(user_id, device_id, body)
            account.mark_keys_as_published()
            await self._save(device, published=True)

    async def reload(self, device: OwnDevice) -> None:
        """Put the account back to its stored state (a change that was not persisted)."""
        row = await self.store.device(device.user_id)
        if row is not None:
            device.account = vodozemac.Account.from_pickle(row.account, self.pickle_key.raw)

    async def save(self, device: OwnDevice) -> None:
        """Persist the account after it changed (an inbound Olm session used a one-time key)."""
        await self._save(device, published=True)

    async def _save(self, device: OwnDevice, *, published: bool) -> None:
        await self.store.save_account(
            device.user_id, device.account.pickle(self.pickle_key.raw), published=published
        )


__all__ = ["OwnDevice", "OwnDevices", "new_device_id", "unpadded_b64"]
