"""Olm: the one-to-one encrypted channel between one of the bridge's devices and another
device, used to hand over Megolm room keys (to-device ``m.room.encrypted`` events).

Sessions are made on demand: a one-time key of the other device is claimed (its signature by
that device checked), an outbound session created, and every session change is persisted before
what it encrypted leaves the bridge.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import vodozemac

from bridge.crypto.devices import OLM, SIGNED_CURVE25519, OwnDevice, OwnDevices
from bridge.crypto.peers import DeviceKeys
from bridge.crypto.pickling import PickleKey
from bridge.crypto.signing import b64decode, unpadded_b64, verify_json
from bridge.db.crypto import CryptoStore
from bridge.matrix.keys import KeysApi

log = logging.getLogger("eimis.crypto.olm")


class OlmError(Exception):
    """A to-device message could not be decrypted or was not meant for us; says why."""


class OlmChannel:
    def __init__(
        self, store: CryptoStore, keys: KeysApi, devices: OwnDevices, pickle_key: PickleKey
    ) -> None:
        self.store = store
        self.keys = keys
        self.devices = devices
        self.pickle_key = pickle_key

    # Sending -----------------------------------------------------------------------------------

    async def send(
        self, own: OwnDevice, targets: DeviceKeys, event_type: str, content: dict[str, Any]
    ) -> set[tuple[str, str]]:
        """Send an encrypted to-device event to each target device; returns those reached
        (a device without a one-time key to claim, and no session, is skipped and logged)."""
        if not targets:
            return set()
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        async with own.lock:
            sessions = await self._sessions_for(own, targets)
            for (user_id, device_id), session in sessions.items():
                curve, ed = targets[(user_id, device_id)]
                payload = {
                    "type": event_type,
                    "content": content,
                    "sender": own.user_id,
                    "sender_device": own.device_id,
                    "keys": {"ed25519": own.ed25519},
                    "recipient": user_id,
                    "recipient_keys": {"ed25519": ed},
                }
                message_type, body = session.encrypt(json.dumps(payload).encode()).to_parts()
                await self.store.save_olm_session(
                    own.user_id, curve, session.session_id, session.pickle(self.pickle_key.raw)
                )
                messages.setdefault(user_id, {})[device_id] = {
                    "algorithm": OLM,
                    "sender_key": own.curve25519,
                    "ciphertext": {curve: {"type": message_type, "body": unpadded_b64(body)}},
                }
        if messages:
            await self.keys.send_to_device(
                own.user_id, own.device_id, "m.room.encrypted", messages, uuid.uuid4().hex
            )
        return {(u, d) for u, ds in messages.items() for d in ds}

    async def _sessions_for(
        self, own: OwnDevice, targets: DeviceKeys
    ) -> dict[tuple[str, str], vodozemac.Session]:
        sessions: dict[tuple[str, str], vodozemac.Session] = {}
        missing: dict[str, list[str]] = {}
        for (user_id, device_id), (curve, _) in targets.items():
            held = await self.store.olm_sessions(own.user_id, curve)
            if held:
                sessions[(user_id, device_id)] = vodozemac.Session.from_pickle(
                    held[0][1], self.pickle_key.raw
                )
            else:
                missing.setdefault(user_id, []).append(device_id)
        if missing:
            answer = await self.keys.claim(own.user_id, missing)
            claimed = answer.get("one_time_keys") if isinstance(answer, dict) else None
            for user_id, device_ids in missing.items():
                for device_id in device_ids:
                    curve, ed = targets[(user_id, device_id)]
                    key = _claimed_key(claimed, user_id, device_id, ed)
                    if key is None:
                        log.warning("No one-time key to claim for a device of %s", user_id)
                        continue
                    session = own.account.create_outbound_session(
                        vodozemac.Curve25519PublicKey.from_base64(curve),
                        vodozemac.Curve25519PublicKey.from_base64(key),
                    )
                    sessions[(user_id, device_id)] = session
        return sessions

    # Receiving ---------------------------------------------------------------------------------

    async def decrypt(
        self,
        own: OwnDevice,
        sender: str,
        content: dict[str, Any],
        handle: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Decrypt a to-device ``m.room.encrypted`` sent to ``own`` and ``handle`` its payload;
        OlmError if it cannot be read or was not meant for this device.

        The ratchet's step (and a one-time key used up) is persisted only once ``handle`` has
        succeeded: a failure leaves the message decryptable again, so the inbox's retry still
        gets the room key it carries."""
        if content.get("algorithm") != OLM:
            raise OlmError(f"unsupported algorithm {content.get('algorithm')!r}")
        sender_key = content.get("sender_key")
        ciphertext = content.get("ciphertext")
        if not isinstance(sender_key, str) or not isinstance(ciphertext, dict):
            raise OlmError("no sender_key or ciphertext")
        mine = ciphertext.get(own.curve25519)
        if not isinstance(mine, dict) or mine.get("type") not in (0, 1):
            raise OlmError("no ciphertext for this device")
        try:
            body = b64decode(str(mine.get("body")))
            message = vodozemac.AnyOlmMessage.from_parts(int(mine["type"]), body)
        except Exception:
            raise OlmError("malformed ciphertext") from None
        async with own.lock:
            plaintext, session, new_session = self._decrypt(
                own, sender_key, message, await self.store.olm_sessions(own.user_id, sender_key)
            )
            try:
                payload = _payload(plaintext, sender, sender_key, own)
                await handle(payload)
            except BaseException:
                # The account in memory may have lost the one-time key: back to what is stored.
                await self.devices.reload(own)
                raise
            await self.store.save_olm_session(
                own.user_id, sender_key, session.session_id, session.pickle(self.pickle_key.raw)
            )
            if new_session:
                await self.devices.save(own)

    def _decrypt(
        self, own: OwnDevice, sender_key: str, message: Any, held: list[tuple[str, str]]
    ) -> tuple[bytes, vodozemac.Session, bool]:
        """(plaintext, the session that decrypted it, whether that session is new)."""
        for _, pickle in held:
            session = vodozemac.Session.from_pickle(pickle, self.pickle_key.raw)
            if message.to_parts()[0] == 0 and not session.session_matches(message.to_pre_key()):
                continue
            try:
                return bytes(session.decrypt(message)), session, False
            except Exception:
                continue
        if message.to_parts()[0] != 0:
            raise OlmError("no session decrypts it (a normal message needs an existing session)")
        try:
            session, plaintext = own.account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_base64(sender_key), message.to_pre_key()
            )
        except Exception:
            raise OlmError("no new session could be made from it") from None
        return bytes(plaintext), session, True


def _payload(plaintext: bytes, sender: str, sender_key: str, own: OwnDevice) -> dict[str, Any]:
    try:
        payload = json.loads(plaintext)
    except ValueError:
        raise OlmError("the plaintext is not JSON") from None
    if not isinstance(payload, dict):
        raise OlmError("the plaintext is not a JSON object")
    recipient_keys = payload.get("recipient_keys")
    if (
        payload.get("sender") != sender
        or payload.get("recipient") != own.user_id
        or not isinstance(recipient_keys, dict)
        or recipient_keys.get("ed25519") != own.ed25519
    ):
        raise OlmError("sender or recipient do not match the envelope")
    payload["sender_key"] = sender_key
    return payload


def _claimed_key(claimed: Any, user_id: str, device_id: str, ed25519: str) -> str | None:
    if not isinstance(claimed, dict):
        return None
    by_device = (
        claimed.get(user_id, {}).get(device_id) if isinstance(claimed.get(user_id), dict) else None
    )
    if not isinstance(by_device, dict):
        return None
    for key_id, value in by_device.items():
        if not str(key_id).startswith(f"{SIGNED_CURVE25519}:") or not isinstance(value, dict):
            continue
        if verify_json(value, user_id, device_id, ed25519) and isinstance(value.get("key"), str):
            return str(value["key"])
        log.warning("A claimed one-time key of %s is not signed by its device", user_id)
    return None
