"""Other users' devices: their identity keys, from ``/keys/query``, kept until the homeserver
says they changed (MSC3202 ``device_lists`` in the appservice transactions).

A device's keys are used only if the device signed them itself: a homeserver cannot slip in a
key of its own under a member's device id.
"""

from __future__ import annotations

import logging
from typing import Any

from bridge.crypto.signing import verify_json
from bridge.db.crypto import CryptoStore
from bridge.matrix.keys import KeysApi

log = logging.getLogger("eimis.crypto.peers")

DeviceKeys = dict[tuple[str, str], tuple[str, str]]
"""(user, device) -> (curve25519, ed25519)."""


class PeerDevices:
    def __init__(self, store: CryptoStore, keys: KeysApi) -> None:
        self.store = store
        self.keys = keys

    async def of(self, as_user: str, user_ids: list[str]) -> DeviceKeys:
        """The devices of ``user_ids``, asking the homeserver for those not known or outdated."""
        outdated = await self.store.outdated(user_ids)
        if outdated:
            await self.refresh(as_user, outdated)
        return await self.store.devices_of(user_ids)

    async def refresh(self, as_user: str, user_ids: list[str]) -> None:
        answer = await self.keys.query(as_user, user_ids)
        failures = answer.get("failures") or {}
        if failures:
            log.warning("Device keys unavailable from %d server(s)", len(failures))
        by_user = answer.get("device_keys")
        if not isinstance(by_user, dict):
            return
        for user_id in user_ids:
            devices = by_user.get(user_id)
            if not isinstance(devices, dict):
                continue  # that user's server did not answer: keep what we had
            await self.store.replace_devices(user_id, _valid_devices(user_id, devices))

    async def changed(self, user_ids: list[str]) -> None:
        await self.store.mark_outdated(user_ids)


def _valid_devices(user_id: str, devices: dict[str, Any]) -> dict[str, tuple[str, str]]:
    valid: dict[str, tuple[str, str]] = {}
    for device_id, keys in devices.items():
        if not isinstance(keys, dict):
            continue
        key_map = keys.get("keys") if isinstance(keys.get("keys"), dict) else {}
        curve = key_map.get(f"curve25519:{device_id}")
        ed = key_map.get(f"ed25519:{device_id}")
        if (
            keys.get("user_id") == user_id
            and keys.get("device_id") == device_id
            and isinstance(curve, str)
            and isinstance(ed, str)
            and verify_json(keys, user_id, device_id, ed)
        ):
            valid[device_id] = (curve, ed)
        else:
            log.warning("Ignored a device of %s whose keys are not self-signed", user_id)
    return valid
