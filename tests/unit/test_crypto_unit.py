"""End-to-bridge encryption (bridge/crypto) without a homeserver: signing, the pickle key, the
bridge's own devices, Olm and Megolm between two bridges (two databases) and hand-made native
clients (raw vodozemac), decryption errors, key requests and refused room keys.

The only fake is at the HTTP boundary: :class:`FakeKeyDirectory` replaces ``KeysApi`` with an
in-memory homeserver key directory (device keys, one-time and fallback keys, cross-signing keys
and signatures, ``/keys/query`` and ``/keys/claim`` as the Matrix specification describes them,
and the to-device messages sent). Bridge A runs on each database engine (the ``db`` fixture);
bridge B, when there is one, on its own SQLite file.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import vodozemac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from mautrix.util.async_db import Database

from bridge.config import DatabaseConfig
from bridge.crypto.devices import DEVICE_NAME, MEGOLM, OLM, OwnDevices
from bridge.crypto.machine import Crypto, KeysMissing, Undecryptable, room_encryption
from bridge.crypto.pickling import META_NAME, SEAL_CONTEXT, PickleKey, PickleKeyError
from bridge.crypto.signing import CrossSigning, SigningKey, sign_json, signable, verify_json
from bridge.db.crypto import CryptoStore, DeviceRow, OutboundRow
from bridge.db.database import open_database
from bridge.matrix.keys import KeysApi
from bridge.secrets import SecretBox, SecretsError, TamperedValue, UnknownKey

SIGNED_CURVE = "signed_curve25519"

BOT_A = "@bot:a.example"
GHOST = "@pl_ghost:a.example"
GHOST2 = "@pl_other:a.example"
BOT_B = "@bot:b.example"
BOB = "@bob:b.example"
ALICE = "@alice:c.example"
CAROL = "@carol:c.example"
MALLORY = "@mallory:evil.example"
ROOM = "!room:a.example"
OTHER_ROOM = "!elsewhere:a.example"


# --- Independent helpers (no bridge code) ---------------------------------------------------------


def canonical(obj: dict[str, Any]) -> bytes:
    """The specification's canonical JSON of what a signature covers, written out by hand."""
    stripped = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    return json.dumps(stripped, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def signed_by(obj: dict[str, Any], user_id: str, key_id: str, public: str) -> bool:
    """Whether ``obj`` carries a valid ``ed25519:key_id`` signature of ``user_id`` by
    ``public``, checked with vodozemac (independently of ``verify_json``)."""
    signature = obj.get("signatures", {}).get(user_id, {}).get(f"ed25519:{key_id}")
    if not isinstance(signature, str):
        return False
    try:
        vodozemac.Ed25519PublicKey.from_base64(public).verify_signature(
            canonical(obj), vodozemac.Ed25519Signature.from_base64(signature)
        )
    except vodozemac.SignatureException:
        return False
    return True


def only_key(keys: dict[str, Any]) -> Any:
    """The one value of a one-entry map (a key map, a claimed key)."""
    assert len(keys) == 1, keys
    return next(iter(keys.values()))


# --- The fake homeserver key directory ------------------------------------------------------------


class HomeserverError(Exception):
    """What the fake homeserver answers with an error status."""


@dataclass
class SentToDevice:
    sender: str
    sender_device: str
    event_type: str
    messages: dict[str, dict[str, dict[str, Any]]]
    txn_id: str


class FakeKeyDirectory(KeysApi):
    """An in-memory homeserver for the key APIs: what ``KeysApi`` calls over HTTP.

    Devices exist once created (``PUT /devices``); ``/keys/upload`` stores device keys (which
    must name that user and device, and may not change), one-time keys (an id uploaded again
    with another key is refused, as Synapse does) and fallback keys; ``/keys/claim`` hands out
    a one-time key, else the fallback key (then marked used); ``/keys/query`` answers device
    keys with the signatures uploaded since, and cross-signing keys; to-device messages are
    recorded (``drain`` turns them into the events the recipients' transactions would carry).
    """

    def __init__(self) -> None:  # no homeserver behind it: nothing of KeysApi.__init__
        self.created: dict[tuple[str, str], str] = {}
        self.deleted: list[tuple[str, str]] = []
        self.devices: dict[str, dict[str, dict[str, Any]]] = {}
        self.one_time_keys: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.uploaded_one_time_keys: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.fallback_keys: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.fallback_used: set[tuple[str, str]] = set()
        self.cross_signing: dict[str, dict[str, dict[str, Any]]] = {}
        self.calls: list[str] = []
        self.uploads: list[tuple[str, str, dict[str, Any]]] = []
        self.claims: list[dict[str, list[str]]] = []
        self.sent: list[SentToDevice] = []
        self.lose_next_upload_answer = False
        self.fail_next: set[str] = set()
        """Names of calls that fail once, before doing anything (a network error)."""
        self._txn_ids: set[tuple[str, str, str]] = set()
        self._drained = 0

    # Devices and keys --------------------------------------------------------------------------

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail_next:
            self.fail_next.discard(name)
            raise HomeserverError(f"{name}: connection refused")

    async def create_device(self, user_id: str, device_id: str, display_name: str) -> None:
        self._call("create_device")
        self.created[(user_id, device_id)] = display_name

    async def device_ids(self, user_id: str) -> list[str]:
        self._call("device_ids")
        return [device for user, device in self.created if user == user_id]

    async def delete_device(self, user_id: str, device_id: str) -> None:
        self._call("delete_device")
        self.deleted.append((user_id, device_id))
        self.created.pop((user_id, device_id), None)
        self.devices.get(user_id, {}).pop(device_id, None)
        self.one_time_keys.pop((user_id, device_id), None)
        self.fallback_keys.pop((user_id, device_id), None)

    async def to_device_inbox(
        self, user_id: str, device_id: str, since: str | None
    ) -> tuple[list[dict[str, Any]], str]:
        """Nothing kept back: every to-device message here is pushed (see ``drain``)."""
        self._call("to_device_inbox")
        return [], since or ""

    async def upload_keys(
        self, user_id: str, device_id: str, body: dict[str, Any]
    ) -> dict[str, int]:
        self._call("upload_keys")
        if (user_id, device_id) not in self.created:
            raise HomeserverError(f"M_UNKNOWN: no device {device_id} of {user_id}")
        device_keys = body.get("device_keys")
        if device_keys is not None:
            if device_keys.get("user_id") != user_id or device_keys.get("device_id") != device_id:
                raise HomeserverError("M_INVALID_PARAM: device keys of another device")
            held = self.devices.get(user_id, {}).get(device_id)
            if held is not None and canonical(held) != canonical(device_keys):
                raise HomeserverError("M_INVALID_PARAM: device keys changed")
            stored = copy.deepcopy(device_keys)
            if held is not None:
                for user, by_key in held.get("signatures", {}).items():
                    stored.setdefault("signatures", {}).setdefault(user, {}).update(by_key)
            self.devices.setdefault(user_id, {})[device_id] = stored
        history = self.uploaded_one_time_keys.setdefault((user_id, device_id), {})
        pool = self.one_time_keys.setdefault((user_id, device_id), {})
        for key_id, key in (body.get("one_time_keys") or {}).items():
            if key_id in history and history[key_id] != key:
                raise HomeserverError(f"M_INVALID_PARAM: one-time key {key_id} already exists")
            if key_id not in history:
                history[key_id] = key
                pool[key_id] = key
        fallback = body.get("fallback_keys")
        if fallback:
            self.fallback_keys[(user_id, device_id)] = copy.deepcopy(fallback)
            self.fallback_used.discard((user_id, device_id))
        self.uploads.append((user_id, device_id, copy.deepcopy(body)))
        if self.lose_next_upload_answer:
            self.lose_next_upload_answer = False
            raise HomeserverError("connection reset after the upload was stored")
        return self.counts(user_id, device_id)

    async def upload_cross_signing(self, user_id: str, body: dict[str, Any]) -> None:
        self._call("upload_cross_signing")
        for name in ("master_key", "self_signing_key", "user_signing_key"):
            if name in body:
                self.cross_signing.setdefault(user_id, {})[name] = copy.deepcopy(body[name])

    async def upload_signatures(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self._call("upload_signatures")
        failures: dict[str, dict[str, Any]] = {}
        for target, by_key in body.items():
            for key_id, signed in by_key.items():
                held = self.devices.get(target, {}).get(key_id)
                if held is None or canonical(held) != canonical(signed):
                    failures.setdefault(target, {})[key_id] = {"errcode": "M_INVALID_SIGNATURE"}
                    continue
                theirs = signed.get("signatures", {}).get(user_id, {})
                held.setdefault("signatures", {}).setdefault(user_id, {}).update(theirs)
        return {"failures": failures}

    async def query(self, as_user: str, user_ids: list[str]) -> dict[str, Any]:
        self._call("query")
        answer: dict[str, Any] = {
            "device_keys": {u: copy.deepcopy(self.devices.get(u, {})) for u in user_ids},
            "master_keys": {},
            "self_signing_keys": {},
            "failures": {},
        }
        for user in user_ids:
            keys = self.cross_signing.get(user, {})
            if "master_key" in keys:
                answer["master_keys"][user] = copy.deepcopy(keys["master_key"])
            if "self_signing_key" in keys:
                answer["self_signing_keys"][user] = copy.deepcopy(keys["self_signing_key"])
        return answer

    async def claim(
        self, as_user: str, devices: dict[str, list[str]], algorithm: str = SIGNED_CURVE
    ) -> dict[str, Any]:
        self._call("claim")
        self.claims.append(copy.deepcopy(devices))
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for user_id, device_ids in devices.items():
            for device_id in device_ids:
                pool = self.one_time_keys.get((user_id, device_id), {})
                key_id = next((k for k in pool if k.startswith(f"{algorithm}:")), None)
                if key_id is not None:
                    found.setdefault(user_id, {})[device_id] = {key_id: pool.pop(key_id)}
                    continue
                fallback = self.fallback_keys.get((user_id, device_id))
                if fallback:
                    self.fallback_used.add((user_id, device_id))
                    found.setdefault(user_id, {})[device_id] = copy.deepcopy(fallback)
        return {"one_time_keys": found, "failures": {}}

    async def send_to_device(
        self,
        user_id: str,
        device_id: str,
        event_type: str,
        messages: dict[str, dict[str, dict[str, Any]]],
        txn_id: str,
    ) -> None:
        self._call("send_to_device")
        if (user_id, device_id, txn_id) in self._txn_ids:
            return  # idempotent, as the specification says
        self._txn_ids.add((user_id, device_id, txn_id))
        self.sent.append(SentToDevice(user_id, device_id, event_type, messages, txn_id))

    # For the tests -----------------------------------------------------------------------------

    def counts(self, user_id: str, device_id: str) -> dict[str, int]:
        pool = self.one_time_keys.get((user_id, device_id), {})
        return {SIGNED_CURVE: sum(1 for k in pool if k.startswith(f"{SIGNED_CURVE}:"))}

    def device(self, user_id: str) -> dict[str, Any]:
        devices = self.devices.get(user_id, {})
        assert len(devices) == 1, devices
        return next(iter(devices.values()))

    def drain(self) -> list[dict[str, Any]]:
        """The to-device events sent since the last drain, as the recipients receive them (a
        message to device ``*`` reaches every device of that user)."""
        events: list[dict[str, Any]] = []
        for sent in self.sent[self._drained :]:
            for user_id, by_device in sent.messages.items():
                for device_id, content in by_device.items():
                    targets = (
                        list(self.devices.get(user_id, {})) if device_id == "*" else [device_id]
                    )
                    for target in targets:
                        events.append(
                            {
                                "to_user_id": user_id,
                                "to_device_id": target,
                                "sender": sent.sender,
                                "type": sent.event_type,
                                "content": copy.deepcopy(content),
                            }
                        )
        self._drained = len(self.sent)
        return events


# --- A native client, made by hand with vodozemac -------------------------------------------------


class NativeClient:
    """One device of a Matrix client: what Element or nio does, written with vodozemac alone."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.account = vodozemac.Account()
        self.olm: dict[str, list[vodozemac.Session]] = {}
        self.group: dict[tuple[str, str], vodozemac.InboundGroupSession] = {}
        self.received: list[dict[str, Any]] = []

    @property
    def curve(self) -> str:
        return str(self.account.curve25519_key.to_base64())

    @property
    def ed(self) -> str:
        return str(self.account.ed25519_key.to_base64())

    def _signed(self, obj: dict[str, Any]) -> dict[str, Any]:
        signature = self.account.sign(canonical(obj)).to_base64()
        return {**obj, "signatures": {self.user_id: {f"ed25519:{self.device_id}": signature}}}

    def device_keys(self) -> dict[str, Any]:
        return self._signed(
            {
                "user_id": self.user_id,
                "device_id": self.device_id,
                "algorithms": [OLM, MEGOLM],
                "keys": {
                    f"curve25519:{self.device_id}": self.curve,
                    f"ed25519:{self.device_id}": self.ed,
                },
            }
        )

    async def publish(self, hs: FakeKeyDirectory, one_time_keys: int = 5) -> None:
        await hs.create_device(self.user_id, self.device_id, "native client")
        await hs.upload_keys(self.user_id, self.device_id, {"device_keys": self.device_keys()})
        await self.upload_one_time_keys(hs, one_time_keys)

    async def upload_one_time_keys(self, hs: FakeKeyDirectory, count: int) -> None:
        self.account.generate_one_time_keys(count)
        otks = {
            f"{SIGNED_CURVE}:{key_id}": self._signed({"key": key.to_base64()})
            for key_id, key in self.account.one_time_keys.items()
        }
        await hs.upload_keys(self.user_id, self.device_id, {"one_time_keys": otks})
        self.account.mark_keys_as_published()

    def receive(self, event: dict[str, Any]) -> dict[str, Any]:
        """Decrypt a to-device ``m.room.encrypted`` and import the room key it carries."""
        assert event["type"] == "m.room.encrypted"
        content = event["content"]
        assert content["algorithm"] == OLM
        sender_key = content["sender_key"]
        mine = content["ciphertext"][self.curve]
        message = vodozemac.AnyOlmMessage.from_parts(int(mine["type"]), unb64(mine["body"]))
        plaintext: bytes | None = None
        for session in self.olm.get(sender_key, []):
            if mine["type"] == 0 and not session.session_matches(message.to_pre_key()):
                continue
            plaintext = bytes(session.decrypt(message))
            break
        if plaintext is None:
            session, raw = self.account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_base64(sender_key), message.to_pre_key()
            )
            self.olm.setdefault(sender_key, []).insert(0, session)
            plaintext = bytes(raw)
        payload: dict[str, Any] = json.loads(plaintext)
        assert payload["sender"] == event["sender"]
        assert payload["recipient"] == self.user_id
        assert payload["recipient_keys"] == {"ed25519": self.ed}
        inner = payload["content"]
        if payload["type"] == "m.room_key":
            session_key = vodozemac.SessionKey(inner["session_key"])
            group = vodozemac.InboundGroupSession(session_key)
            assert group.session_id == inner["session_id"]
            self.group[(inner["room_id"], group.session_id)] = group
        elif payload["type"] == "m.forwarded_room_key":
            exported = vodozemac.ExportedSessionKey(inner["session_key"])
            group = vodozemac.InboundGroupSession.import_session(exported)
            assert group.session_id == inner["session_id"]
            self.group[(inner["room_id"], group.session_id)] = group
        self.received.append(payload)
        return payload

    def decrypt(self, event: dict[str, Any]) -> dict[str, Any]:
        content = event["content"]
        assert content["algorithm"] == MEGOLM
        group = self.group[(event["room_id"], content["session_id"])]
        decrypted = group.decrypt(vodozemac.MegolmMessage.from_base64(content["ciphertext"]))
        plaintext: dict[str, Any] = json.loads(bytes(decrypted.plaintext))
        assert plaintext["room_id"] == event["room_id"]
        return plaintext

    async def olm_event(
        self,
        hs: FakeKeyDirectory,
        to_user: str,
        to_device: str,
        event_type: str,
        content: dict[str, Any],
        *,
        envelope_sender: str | None = None,
        claimed_ed25519: str | None = None,
        recipient: str | None = None,
    ) -> dict[str, Any]:
        """A to-device ``m.room.encrypted`` for one device, as the recipient would receive it.
        ``envelope_sender`` forges the sender the homeserver states (and the payload names);
        ``claimed_ed25519`` forges the signing key the payload claims; ``recipient`` names
        another recipient in the payload."""
        keys = (await hs.query(self.user_id, [to_user]))["device_keys"][to_user][to_device]
        curve = keys["keys"][f"curve25519:{to_device}"]
        ed = keys["keys"][f"ed25519:{to_device}"]
        sessions = self.olm.get(curve)
        if not sessions:
            claimed = (await hs.claim(self.user_id, {to_user: [to_device]}))["one_time_keys"]
            otk = only_key({k: v["key"] for k, v in claimed[to_user][to_device].items()})
            session = self.account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_base64(curve),
                vodozemac.Curve25519PublicKey.from_base64(otk),
            )
            sessions = self.olm[curve] = [session]
        sender = envelope_sender or self.user_id
        payload = {
            "type": event_type,
            "content": content,
            "sender": sender,
            "sender_device": self.device_id,
            "keys": {"ed25519": claimed_ed25519 or self.ed},
            "recipient": recipient or to_user,
            "recipient_keys": {"ed25519": ed},
        }
        message_type, body = sessions[0].encrypt(json.dumps(payload).encode()).to_parts()
        return {
            "to_user_id": to_user,
            "to_device_id": to_device,
            "sender": sender,
            "type": "m.room.encrypted",
            "content": {
                "algorithm": OLM,
                "sender_key": self.curve,
                "ciphertext": {curve: {"type": message_type, "body": b64(body)}},
            },
        }

    def room_key(self, room_id: str, session: vodozemac.GroupSession) -> dict[str, Any]:
        return {
            "algorithm": MEGOLM,
            "room_id": room_id,
            "session_id": session.session_id,
            "session_key": session.session_key.to_base64(),
        }

    def forwarded_key(self, room_id: str, session: vodozemac.GroupSession) -> dict[str, Any]:
        """An ``m.forwarded_room_key`` content for one of this device's own sessions."""
        inbound = vodozemac.InboundGroupSession(session.session_key)
        return {
            "algorithm": MEGOLM,
            "room_id": room_id,
            "sender_key": self.curve,
            "sender_claimed_ed25519_key": self.ed,
            "session_id": session.session_id,
            "session_key": inbound.export_at(inbound.first_known_index).to_base64(),
            "forwarding_curve25519_key_chain": [],
        }

    def megolm_event(
        self,
        room_id: str,
        session: vodozemac.GroupSession,
        content: dict[str, Any],
        *,
        plaintext_room: str | None = None,
        event_id: str = "$native",
    ) -> dict[str, Any]:
        plaintext = {
            "type": "m.room.message",
            "content": content,
            "room_id": plaintext_room or room_id,
        }
        return {
            "type": "m.room.encrypted",
            "event_id": event_id,
            "room_id": room_id,
            "sender": self.user_id,
            "content": {
                "algorithm": MEGOLM,
                "sender_key": self.curve,
                "ciphertext": session.encrypt(json.dumps(plaintext).encode()).to_base64(),
                "session_id": session.session_id,
                "device_id": self.device_id,
            },
        }


# --- Bridges --------------------------------------------------------------------------------------


@dataclass
class Bridge:
    """One bridge's crypto machine over its own database, talking to the fake directory."""

    server: str
    crypto: Crypto
    store: CryptoStore
    box: SecretBox
    members: dict[str, list[str]]
    keys_arrived: list[str] = field(default_factory=list)

    async def handle_all(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            await self.crypto.handle({"kind": "to_device", "event": event})


async def make_bridge(
    db: Database,
    hs: FakeKeyDirectory,
    server: str,
    bot: str,
    box: SecretBox | None = None,
    members: dict[str, list[str]] | None = None,
) -> Bridge:
    """A bridge's crypto machine; given the ``box`` (and rooms) of one, the same bridge
    restarted."""
    store = CryptoStore(db)
    box = box or SecretBox(os.urandom(32))
    pickle_key = await PickleKey.load(store, box)
    members = {} if members is None else members

    async def room_members(room_id: str, _who: str) -> list[str]:
        return list(members.get(room_id, []))

    crypto = Crypto(
        store,
        hs,
        pickle_key,
        bot_mxid=bot,
        members=room_members,
        is_ours=lambda user_id: user_id.endswith(f":{server}"),
    )
    bridge = Bridge(server, crypto, store, box, members)
    crypto.on_room_key = bridge.keys_arrived.append
    await crypto.start()
    return bridge


def event_of(
    sender: str, content: dict[str, Any], room_id: str = ROOM, n: int = 1
) -> dict[str, Any]:
    return {
        "type": "m.room.encrypted",
        "event_id": f"$event{n}",
        "room_id": room_id,
        "sender": sender,
        "origin_server_ts": 1_700_000_000_000 + n,
        "content": content,
    }


def bob_device(hs: FakeKeyDirectory) -> str:
    """The id of BOB's device (bridge B's), as the directory lists it."""
    return str(only_key({d: d for d in hs.devices[BOB]}))


def text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


def addressed_to(events: list[dict[str, Any]], user_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["to_user_id"] == user_id]


@pytest.fixture
def hs() -> FakeKeyDirectory:
    return FakeKeyDirectory()


@pytest.fixture
async def bridge_a(db: Database, hs: FakeKeyDirectory) -> Bridge:
    """The bridge whose ghosts send, on each database engine."""
    return await make_bridge(db, hs, "a.example", BOT_A)


@pytest.fixture
async def b_db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await open_database(DatabaseConfig(url=f"sqlite:{tmp_path / 'b' / 'bridge.db'}"))
    try:
        yield database
    finally:
        await database.stop()


@pytest.fixture
async def bridge_b(b_db: Database, hs: FakeKeyDirectory) -> Bridge:
    """A second bridge, on its own database: its device of BOB receives."""
    bridge = await make_bridge(b_db, hs, "b.example", BOT_B)
    await bridge.crypto.ensure_device(BOB)
    return bridge


@pytest.fixture
async def store(db: Database) -> CryptoStore:
    return CryptoStore(db)


async def encrypted_room(bridge: Bridge, members: list[str], **settings: Any) -> None:
    bridge.members[ROOM] = members
    assert await bridge.crypto.room_encrypted(ROOM, {"algorithm": MEGOLM, **settings})


# === 1. Signed JSON and cross-signing =============================================================


def test_sign_json_round_trip_verifies_and_leaves_the_input_untouched() -> None:
    key = SigningKey.generate()
    obj = {"user_id": "@u:x", "keys": {"a": "b"}, "n": 1}
    signed = sign_json(obj, "@u:x", "KEYID", key.sign)
    assert obj == {"user_id": "@u:x", "keys": {"a": "b"}, "n": 1}
    assert verify_json(signed, "@u:x", "KEYID", key.public)
    # The same signature checks out independently, over hand-written canonical JSON.
    assert signed_by(signed, "@u:x", "KEYID", key.public)
    Ed25519PublicKey.from_public_bytes(unb64(key.public)).verify(
        unb64(signed["signatures"]["@u:x"]["ed25519:KEYID"]), canonical(obj)
    )


def test_a_second_signature_keeps_the_first() -> None:
    first, second = SigningKey.generate(), SigningKey.generate()
    signed = sign_json({"a": 1}, "@u:x", "ONE", first.sign)
    both = sign_json(signed, "@v:y", "TWO", second.sign)
    assert verify_json(both, "@u:x", "ONE", first.public)
    assert verify_json(both, "@v:y", "TWO", second.public)


def test_a_changed_field_or_another_key_user_or_key_id_fails_verification() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    signed = sign_json({"a": 1, "b": {"c": "d"}}, "@u:x", "K", key.sign)
    changed = copy.deepcopy(signed)
    changed["b"]["c"] = "e"
    added = {**copy.deepcopy(signed), "extra": True}
    assert not verify_json(changed, "@u:x", "K", key.public)
    assert not verify_json(added, "@u:x", "K", key.public)
    assert not verify_json(signed, "@u:x", "K", other.public)
    assert not verify_json(signed, "@someone:x", "K", key.public)
    assert not verify_json(signed, "@u:x", "OTHER", key.public)
    forged = sign_json({"a": 1, "b": {"c": "d"}}, "@u:x", "K", other.sign)
    assert not verify_json(forged, "@u:x", "K", key.public)


def test_unsigned_and_signatures_are_not_covered_by_the_signature() -> None:
    key = SigningKey.generate()
    obj = {"a": 1, "unsigned": {"age": 5}}
    assert signable({**obj, "signatures": {"@x:y": {"ed25519:Z": "s"}}}) == canonical({"a": 1})
    signed = sign_json(obj, "@u:x", "K", key.sign)
    later = copy.deepcopy(signed)
    later["unsigned"] = {"age": 999, "device_display_name": "renamed"}
    later["signatures"]["@other:x"] = {"ed25519:O": "whatever"}
    assert verify_json(later, "@u:x", "K", key.public)
    del later["unsigned"]
    assert verify_json(later, "@u:x", "K", key.public)


@pytest.mark.parametrize(
    "signatures",
    [None, "text", {"@u:x": "text"}, {"@u:x": {"ed25519:K": 5}}, {"@u:x": {"ed25519:K": "%%"}}],
)
def test_malformed_signatures_fail_verification_without_raising(signatures: Any) -> None:
    key = SigningKey.generate()
    obj: dict[str, Any] = {"a": 1}
    if signatures is not None:
        obj["signatures"] = signatures
    assert not verify_json(obj, "@u:x", "K", key.public)
    good = sign_json({"a": 1}, "@u:x", "K", key.sign)
    assert not verify_json(good, "@u:x", "K", "not a key")


def test_cross_signing_upload_body_is_master_self_signed_and_subkeys_signed_by_master() -> None:
    identity = CrossSigning.generate()
    body = CrossSigning.upload_body(identity, "@g:a.example")
    master_pub = identity.master.public
    expected = {
        "master_key": ("master", identity.master.public),
        "self_signing_key": ("self_signing", identity.self_signing.public),
        "user_signing_key": ("user_signing", identity.user_signing.public),
    }
    for name, (usage, public) in expected.items():
        key = body[name]
        assert key["user_id"] == "@g:a.example"
        assert key["usage"] == [usage]
        assert key["keys"] == {f"ed25519:{public}": public}
        # Signed by the master key, and only by it (a subkey does not sign itself).
        assert list(key["signatures"]["@g:a.example"]) == [f"ed25519:{master_pub}"]
        assert signed_by(key, "@g:a.example", master_pub, master_pub)
        assert not signed_by(key, "@g:a.example", master_pub, identity.self_signing.public)
    assert len({public for _, public in expected.values()}) == 3


def test_cross_signing_seeds_round_trip() -> None:
    identity = CrossSigning.generate()
    again = CrossSigning.from_seeds(identity.to_seeds())
    assert again == identity
    assert again.master.public == identity.master.public
    message = b"same keys sign the same"
    assert again.self_signing.sign(message) == identity.self_signing.sign(message)


def test_cross_signing_repr_reveals_no_seed() -> None:
    identity = CrossSigning.generate()
    shown = repr(identity) + str(identity) + repr(identity.master) + repr(identity.user_signing)
    shown += f"{identity.self_signing!r} {identity.self_signing!s}"
    assert identity.to_seeds() not in shown
    for key in (identity.master, identity.self_signing, identity.user_signing):
        for form in (
            b64(key.seed),
            base64.b64encode(key.seed).decode(),
            base64.urlsafe_b64encode(key.seed).decode().rstrip("="),
            key.seed.hex(),
            repr(key.seed),
        ):
            assert form not in shown
    assert identity.master.public in repr(identity)


# === 2. The pickle key ============================================================================


async def test_pickle_key_is_made_once_and_stored_sealed(store: CryptoStore) -> None:
    box = SecretBox(os.urandom(32))
    key = await PickleKey.load(store, box)
    assert len(key.raw) == 32
    stored = await store.meta(META_NAME)
    assert stored is not None and stored.startswith(f"v1:{box.key_id}:")
    for form in (
        base64.b64encode(key.raw).decode(),
        b64(key.raw),
        base64.urlsafe_b64encode(key.raw).decode().rstrip("="),
        key.raw.hex(),
    ):
        assert form not in stored
    assert base64.b64decode(box.open(stored, SEAL_CONTEXT)) == key.raw
    rows = await store.db.fetch("SELECT name FROM crypto_meta")
    assert [row["name"] for row in rows] == [META_NAME]
    assert repr(key) == "PickleKey(...)" and b64(key.raw) not in repr(key)


async def test_pickle_key_load_again_returns_the_same_key_and_leaves_the_row(
    store: CryptoStore,
) -> None:
    box = SecretBox(os.urandom(32))
    first = await PickleKey.load(store, box)
    sealed = await store.meta(META_NAME)
    second = await PickleKey.load(CryptoStore(store.db), box)
    assert second.raw == first.raw
    assert await store.meta(META_NAME) == sealed


async def test_pickle_key_loaded_concurrently_is_one_key(store: CryptoStore) -> None:
    box = SecretBox(os.urandom(32))
    keys = await asyncio.gather(*(PickleKey.load(store, box) for _ in range(5)))
    assert len({key.raw for key in keys}) == 1


async def test_pickle_key_with_another_secrets_key_fails_clearly(store: CryptoStore) -> None:
    box = SecretBox(os.urandom(32))
    await PickleKey.load(store, box)
    sealed = await store.meta(META_NAME)
    with pytest.raises(UnknownKey, match="previous_key_files"):
        await PickleKey.load(store, SecretBox(os.urandom(32)))
    assert await store.meta(META_NAME) == sealed  # nothing overwritten
    # The stored value altered: refused too, never a different key.
    kind, kid, data = str(sealed).split(":")
    flipped = data[:-4] + ("AAAA" if data[-4:] != "AAAA" else "BBBB")
    await store.set_meta(META_NAME, f"{kind}:{kid}:{flipped}")
    with pytest.raises(TamperedValue):
        await PickleKey.load(store, box)
    assert issubclass(UnknownKey, SecretsError) and issubclass(TamperedValue, SecretsError)


async def test_pickle_key_opens_with_a_previous_secrets_key_and_is_resealed(
    store: CryptoStore,
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    key = await PickleKey.load(store, SecretBox(old))
    new_box = SecretBox(new, previous=[old])
    again = await PickleKey.load(store, new_box)
    assert again.raw == key.raw
    resealed = await store.meta(META_NAME)
    assert resealed is not None and resealed.startswith(f"v1:{new_box.key_id}:")
    # The old key can now be dropped from the configuration.
    assert (await PickleKey.load(store, SecretBox(new))).raw == key.raw


def test_pickle_key_seal_is_bound_to_its_context() -> None:
    key = PickleKey(os.urandom(32))
    sealed = key.seal("seeds", "@ghost:a.example")
    assert "seeds" not in sealed
    assert key.open(sealed, "@ghost:a.example") == "seeds"
    with pytest.raises(PickleKeyError):
        key.open(sealed, "@other:a.example")
    with pytest.raises(PickleKeyError):
        PickleKey(os.urandom(32)).open(sealed, "@ghost:a.example")
    blob = bytearray(base64.urlsafe_b64decode(sealed))
    blob[-1] ^= 1
    with pytest.raises(PickleKeyError):
        key.open(base64.urlsafe_b64encode(bytes(blob)).decode(), "@ghost:a.example")
    with pytest.raises(ValueError):
        PickleKey(os.urandom(16))


# === 3. The bridge's own devices ==================================================================


@pytest.fixture
async def own_devices(store: CryptoStore, hs: FakeKeyDirectory) -> OwnDevices:
    return OwnDevices(store, hs, await PickleKey.load(store, SecretBox(os.urandom(32))))


async def test_ensure_creates_and_publishes_a_device_once(
    own_devices: OwnDevices, store: CryptoStore, hs: FakeKeyDirectory
) -> None:
    device = await own_devices.ensure(GHOST)
    dev = device.device_id
    assert hs.created == {(GHOST, dev): DEVICE_NAME}
    assert hs.calls.count("create_device") == 1 and hs.calls.count("upload_keys") == 1
    half = device.account.max_number_of_one_time_keys // 2
    assert hs.counts(GHOST, dev) == {SIGNED_CURVE: half}
    assert len(hs.fallback_keys[(GHOST, dev)]) == 1
    row = await store.device(GHOST)
    assert row is not None and row.published and row.device_id == dev
    calls = list(hs.calls)

    assert await own_devices.ensure(GHOST) is device
    restarted = OwnDevices(store, hs, own_devices.pickle_key)
    again = await restarted.ensure(GHOST)
    assert (again.device_id, again.curve25519, again.ed25519) == (
        dev,
        device.curve25519,
        device.ed25519,
    )
    assert hs.calls == calls  # nothing created nor uploaded again
    assert (await own_devices.ensure(GHOST2)).device_id != dev  # each user has their own


async def test_ensure_called_concurrently_creates_one_device(
    own_devices: OwnDevices, hs: FakeKeyDirectory
) -> None:
    devices = await asyncio.gather(*(own_devices.ensure(GHOST) for _ in range(4)))
    assert len({id(d) for d in devices}) == 1
    assert hs.calls.count("create_device") == 1 and hs.calls.count("upload_keys") == 1


async def test_a_bridge_device_whose_keys_were_lost_is_deleted_and_others_kept(
    own_devices: OwnDevices, hs: FakeKeyDirectory
) -> None:
    # The database was restored from an old backup: the homeserver still lists a bridge device
    # of the ghost whose keys are gone, beside a device the user made with another client.
    lost = NativeClient(GHOST, "EIMISLOST001")
    await lost.publish(hs)
    other = NativeClient(GHOST, "OTHERCLIENT")
    await other.publish(hs)

    device = await own_devices.ensure(GHOST)

    assert hs.deleted == [(GHOST, "EIMISLOST001")]
    assert set(hs.devices[GHOST]) == {"OTHERCLIENT", device.device_id}


async def test_published_keys_are_self_signed_and_cross_signed_by_the_ghosts_own_keys(
    own_devices: OwnDevices, store: CryptoStore, hs: FakeKeyDirectory
) -> None:
    device = await own_devices.ensure(GHOST)
    dev = device.device_id
    keys = hs.devices[GHOST][dev]
    assert keys["keys"] == {
        f"curve25519:{dev}": device.curve25519,
        f"ed25519:{dev}": device.ed25519,
    }
    assert set(keys["algorithms"]) == {OLM, MEGOLM}
    assert signed_by(keys, GHOST, dev, device.ed25519)

    identity = hs.cross_signing[GHOST]
    master = only_key(identity["master_key"]["keys"])
    self_signing = only_key(identity["self_signing_key"]["keys"])
    assert signed_by(identity["master_key"], GHOST, master, master)
    assert signed_by(identity["self_signing_key"], GHOST, master, master)
    assert signed_by(identity["user_signing_key"], GHOST, master, master)
    assert signed_by(keys, GHOST, self_signing, self_signing)  # the device is cross-signed
    assert device.cross_signing is not None
    assert device.cross_signing.master.public == master
    assert device.cross_signing.self_signing.public == self_signing

    _, _, body = hs.uploads[0]
    for key in body["one_time_keys"].values():
        assert "fallback" not in key and signed_by(key, GHOST, dev, device.ed25519)
    for key in body["fallback_keys"].values():
        assert key["fallback"] is True and signed_by(key, GHOST, dev, device.ed25519)

    row = await store.device(GHOST)
    assert row is not None and row.cross_signing is not None
    seeds = device.cross_signing.to_seeds()
    assert seeds not in row.cross_signing and seeds not in row.account
    for part in seeds.split("."):
        assert part not in row.cross_signing and part not in row.account


async def test_a_device_without_cross_signing_uploads_no_cross_signing_keys(
    own_devices: OwnDevices, hs: FakeKeyDirectory
) -> None:
    device = await own_devices.ensure(BOT_A, cross_sign=False)
    assert device.cross_signing is None
    assert "upload_cross_signing" not in hs.calls and "upload_signatures" not in hs.calls
    assert signed_by(hs.device(BOT_A), BOT_A, device.device_id, device.ed25519)


async def test_ensure_after_a_crash_before_publishing_finishes_with_the_same_device(
    own_devices: OwnDevices, store: CryptoStore, hs: FakeKeyDirectory
) -> None:
    pickle_key = own_devices.pickle_key
    account = vodozemac.Account()
    identity = CrossSigning.generate()
    dev = "EIMISCRASHED"
    await store.add_device(
        DeviceRow(
            GHOST,
            dev,
            account.pickle(pickle_key.raw),
            pickle_key.seal(identity.to_seeds(), GHOST),
            published=False,
        )
    )

    device = await own_devices.ensure(GHOST)

    assert device.device_id == dev
    assert device.curve25519 == account.curve25519_key.to_base64()
    assert device.ed25519 == account.ed25519_key.to_base64()
    keys = hs.devices[GHOST][dev]
    assert keys["keys"][f"curve25519:{dev}"] == device.curve25519
    assert only_key(hs.cross_signing[GHOST]["master_key"]["keys"]) == identity.master.public
    ssk = identity.self_signing.public
    assert signed_by(keys, GHOST, ssk, ssk)
    row = await store.device(GHOST)
    assert row is not None and row.published


async def test_ensure_after_the_upload_answer_was_lost_publishes_again_without_conflict(
    own_devices: OwnDevices, store: CryptoStore, hs: FakeKeyDirectory
) -> None:
    hs.lose_next_upload_answer = True
    with pytest.raises(HomeserverError):
        await own_devices.ensure(GHOST)
    row = await store.device(GHOST)
    assert row is not None and not row.published
    first = canonical(hs.devices[GHOST][row.device_id])

    restarted = OwnDevices(store, hs, own_devices.pickle_key)
    device = await restarted.ensure(GHOST)  # the fake refuses changed keys: none changed

    assert device.device_id == row.device_id
    assert canonical(hs.devices[GHOST][row.device_id]) == first
    half = device.account.max_number_of_one_time_keys // 2
    assert hs.counts(GHOST, device.device_id)[SIGNED_CURVE] >= half
    ssk = only_key(hs.cross_signing[GHOST]["self_signing_key"]["keys"])
    assert signed_by(hs.devices[GHOST][row.device_id], GHOST, ssk, ssk)
    stored = await store.device(GHOST)
    assert stored is not None and stored.published


async def claim_n(hs: FakeKeyDirectory, user_id: str, device_id: str, n: int) -> None:
    for _ in range(n):
        await hs.claim(CAROL, {user_id: [device_id]})


async def test_replenish_tops_one_time_keys_up_to_half_capacity(
    own_devices: OwnDevices, store: CryptoStore, hs: FakeKeyDirectory
) -> None:
    device = await own_devices.ensure(GHOST)
    dev = device.device_id
    half = device.account.max_number_of_one_time_keys // 2
    await claim_n(hs, GHOST, dev, 20)
    assert hs.counts(GHOST, dev)[SIGNED_CURVE] == half - 20
    fallback = copy.deepcopy(hs.fallback_keys[(GHOST, dev)])
    uploads = len(hs.uploads)

    await own_devices.replenish(GHOST, dev, hs.counts(GHOST, dev), [SIGNED_CURVE])

    assert hs.counts(GHOST, dev)[SIGNED_CURVE] == half
    assert len(hs.uploads) == uploads + 1
    _, _, body = hs.uploads[-1]
    assert len(body["one_time_keys"]) == 20 and "fallback_keys" not in body
    assert "device_keys" not in body
    for key in body["one_time_keys"].values():
        assert signed_by(key, GHOST, dev, device.ed25519)
    assert hs.fallback_keys[(GHOST, dev)] == fallback
    # What was uploaded is stored as published: a restart does not upload the same keys again.
    reloaded = await OwnDevices(store, hs, own_devices.pickle_key).get(GHOST)
    assert reloaded is not None and reloaded.account.one_time_keys == {}


async def test_replenish_replaces_a_fallback_key_that_was_used(
    own_devices: OwnDevices, hs: FakeKeyDirectory
) -> None:
    device = await own_devices.ensure(GHOST)
    dev = device.device_id
    half = device.account.max_number_of_one_time_keys // 2
    old_fallback = copy.deepcopy(hs.fallback_keys[(GHOST, dev)])
    await claim_n(hs, GHOST, dev, half + 1)  # the last claim hands out the fallback key
    assert (GHOST, dev) in hs.fallback_used

    await own_devices.replenish(GHOST, dev, hs.counts(GHOST, dev), [])

    assert hs.counts(GHOST, dev)[SIGNED_CURVE] == half
    new_fallback = hs.fallback_keys[(GHOST, dev)]
    assert new_fallback != old_fallback and (GHOST, dev) not in hs.fallback_used
    key = only_key(new_fallback)
    assert key["fallback"] is True and signed_by(key, GHOST, dev, device.ed25519)


async def test_replenish_does_nothing_when_nothing_is_missing_or_the_device_is_not_ours(
    own_devices: OwnDevices, hs: FakeKeyDirectory
) -> None:
    device = await own_devices.ensure(GHOST)
    dev = device.device_id
    half = device.account.max_number_of_one_time_keys // 2
    uploads = len(hs.uploads)
    await own_devices.replenish(GHOST, dev, {SIGNED_CURVE: half}, [SIGNED_CURVE])
    await own_devices.replenish(GHOST, dev, {SIGNED_CURVE: half + 10}, None)
    await own_devices.replenish(GHOST, "OLDDEVICE", {SIGNED_CURVE: 0}, [])
    await own_devices.replenish(GHOST2, "EIMISNOTYET1", {SIGNED_CURVE: 0}, [])
    assert len(hs.uploads) == uploads
    assert all(user != GHOST2 for user, _ in hs.created)


# === 4. Olm and Megolm between machines ===========================================================


def test_room_encryption_settings_and_defaults() -> None:
    assert room_encryption({"algorithm": "m.unknown"}) is None
    settings = room_encryption(
        {"algorithm": MEGOLM, "rotation_period_ms": 1000, "rotation_period_msgs": 7}
    )
    assert settings is not None and (settings.rotation_ms, settings.rotation_msgs) == (1000, 7)
    defaults = room_encryption(
        {"algorithm": MEGOLM, "rotation_period_ms": -1, "rotation_period_msgs": "9"}
    )
    assert defaults is not None
    assert (defaults.rotation_ms, defaults.rotation_msgs) == (7 * 24 * 3600 * 1000, 100)


async def test_nothing_is_encrypted_in_a_room_without_encryption(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    assert not await bridge_a.crypto.room_encrypted(ROOM, {"algorithm": "m.unknown"})
    assert await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("hi")) is None
    assert all(user != GHOST for user, _ in hs.created)


async def test_a_ghost_message_decrypts_on_another_bridge(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOT_A, BOB])
    content = text("hello from the vendor")

    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", content)

    assert encrypted is not None
    ghost = await bridge_a.crypto.devices.get(GHOST)
    assert ghost is not None
    assert encrypted["algorithm"] == MEGOLM
    assert (encrypted["sender_key"], encrypted["device_id"]) == (ghost.curve25519, ghost.device_id)
    assert "hello" not in json.dumps(encrypted)
    events = hs.drain()
    # The room key went to BOB's device only: not to the bridge's own bot, and before the event.
    assert [(e["to_user_id"], e["to_device_id"], e["sender"], e["type"]) for e in events] == [
        (BOB, bob_device(hs), GHOST, "m.room.encrypted")
    ]
    assert "session_key" not in json.dumps(events)

    await bridge_b.handle_all(events)

    assert bridge_b.keys_arrived == [ROOM]
    event = event_of(GHOST, encrypted)
    decrypted = await bridge_b.crypto.decrypt(event)
    assert decrypted == {**event, "type": "m.room.message", "content": content}
    row = await bridge_b.store.inbound(ROOM, encrypted["session_id"])
    assert row is not None and not row.forwarded
    assert (row.sender, row.sender_key, row.signing_key) == (
        GHOST,
        ghost.curve25519,
        ghost.ed25519,
    )


async def test_a_native_client_reads_a_ghost_message(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    phone = NativeClient(ALICE, "ALICEPHONE")
    await phone.publish(hs)
    await encrypted_room(bridge_a, [GHOST, ALICE])
    content = text("bonjour")

    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", content)

    assert encrypted is not None
    ghost = await bridge_a.crypto.devices.get(GHOST)
    assert ghost is not None
    events = hs.drain()
    assert len(events) == 1
    payload = phone.receive(events[0])
    assert payload["type"] == "m.room_key"
    assert (payload["sender"], payload["sender_device"]) == (GHOST, ghost.device_id)
    assert payload["keys"] == {"ed25519": ghost.ed25519}
    assert payload["content"]["room_id"] == ROOM
    assert payload["content"]["session_id"] == encrypted["session_id"]
    assert phone.decrypt(event_of(GHOST, encrypted)) == {
        "type": "m.room.message",
        "content": content,
        "room_id": ROOM,
    }


async def test_a_relation_stays_in_clear_on_the_encrypted_content(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB])
    relation = {"rel_type": "m.replace", "event_id": "$original"}
    edit = {**text("* fixed"), "m.new_content": text("fixed"), "m.relates_to": relation}
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", edit)
    plain = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("no relation"))
    assert encrypted is not None and plain is not None
    assert encrypted["m.relates_to"] == relation
    assert "m.relates_to" not in plain
    await bridge_b.handle_all(hs.drain())
    decrypted = await bridge_b.crypto.decrypt(event_of(GHOST, encrypted))
    assert decrypted["content"] == edit


async def test_the_bridge_reads_what_its_own_ghosts_sent(bridge_a: Bridge) -> None:
    await encrypted_room(bridge_a, [GHOST])
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("mine"))
    assert encrypted is not None
    decrypted = await bridge_a.crypto.decrypt(event_of(GHOST, encrypted))
    assert decrypted["content"] == text("mine")


async def test_a_second_message_reuses_both_sessions_and_shares_nothing_again(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB])
    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("one"))
    await bridge_b.handle_all(hs.drain())
    assert len(hs.claims) == 1

    second = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("two"))

    assert first is not None and second is not None
    assert second["session_id"] == first["session_id"]
    assert hs.drain() == [] and len(hs.claims) == 1
    decrypted = await bridge_b.crypto.decrypt(event_of(GHOST, second, n=2))
    assert decrypted["content"] == text("two")


async def test_the_session_rotates_after_rotation_msgs_over_the_same_olm_session(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB], rotation_period_msgs=2)
    session_ids = []
    for n in range(1, 6):
        encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text(f"m{n}"))
        assert encrypted is not None
        session_ids.append(encrypted["session_id"])
        await bridge_b.handle_all(hs.drain())
        decrypted = await bridge_b.crypto.decrypt(event_of(GHOST, encrypted, n=n))
        assert decrypted["content"] == text(f"m{n}")
    assert session_ids[0] == session_ids[1] != session_ids[2] == session_ids[3] != session_ids[4]
    assert len(set(session_ids)) == 3
    assert len(hs.sent) == 3  # one room key per session
    assert len(hs.claims) == 1  # the Olm session made for the first carried the others


async def test_the_session_rotates_after_rotation_period(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB], rotation_period_ms=3_600_000)
    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("early"))
    row = await bridge_a.store.outbound(ROOM, GHOST)
    assert first is not None and row is not None
    await bridge_a.store.save_outbound(
        OutboundRow(
            row.room_id, row.user_id, row.session_id, row.pickle, row.created_at - 3_600_001, 1
        )
    )
    second = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("an hour later"))
    assert second is not None and second["session_id"] != first["session_id"]
    await bridge_b.handle_all(hs.drain())
    for n, encrypted in enumerate((first, second)):
        assert (await bridge_b.crypto.decrypt(event_of(GHOST, encrypted, n=n)))["content"]


async def test_a_member_leaving_forces_a_new_session_they_do_not_get(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    carol = NativeClient(CAROL, "CAROLDEV")
    await carol.publish(hs)
    await encrypted_room(bridge_a, [GHOST, BOB, CAROL])
    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("all three"))
    events = hs.drain()
    await bridge_b.handle_all(addressed_to(events, BOB))
    for event in addressed_to(events, CAROL):
        carol.receive(event)

    bridge_a.members[ROOM] = [GHOST, BOB]
    await bridge_a.crypto.member_left(ROOM)
    second = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("without carol"))

    assert first is not None and second is not None
    assert second["session_id"] != first["session_id"]
    events = hs.drain()
    assert {e["to_user_id"] for e in events} == {BOB}
    await bridge_b.handle_all(events)
    assert (await bridge_b.crypto.decrypt(event_of(GHOST, second)))["content"]
    assert carol.decrypt(event_of(GHOST, first))["content"] == text("all three")
    assert (ROOM, second["session_id"]) not in carol.group


async def test_a_new_member_alone_is_given_the_current_session(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    carol = NativeClient(CAROL, "CAROLDEV")
    await carol.publish(hs)
    await encrypted_room(bridge_a, [GHOST, BOB])
    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("before"))
    await bridge_b.handle_all(hs.drain())

    bridge_a.members[ROOM].append(CAROL)
    second = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("after"))

    assert first is not None and second is not None
    assert second["session_id"] == first["session_id"]
    events = hs.drain()
    assert [(e["to_user_id"], e["to_device_id"]) for e in events] == [(CAROL, "CAROLDEV")]
    carol.receive(events[0])
    assert carol.decrypt(event_of(GHOST, second, n=2))["content"] == text("after")
    # Given as of now: what was sent before she joined stays unreadable to her.
    with pytest.raises(vodozemac.MegolmDecryptionException):
        carol.decrypt(event_of(GHOST, first))


async def test_a_late_member_s_new_device_gets_no_more_than_the_member_had(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    """Carol joined mid-session: her next device is given the session as of the message she
    was first given it at, never its start (she was not entitled to what came before)."""
    laptop = NativeClient(CAROL, "LAPTOP")
    await laptop.publish(hs)
    await encrypted_room(bridge_a, [GHOST, BOB])
    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("before"))
    await bridge_b.handle_all(hs.drain())
    bridge_a.members[ROOM].append(CAROL)
    second = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("after"))
    assert first is not None and second is not None
    laptop.receive(hs.drain()[0])

    phone = NativeClient(CAROL, "PHONE")
    await phone.publish(hs)
    await bridge_a.crypto.handle({"kind": "device_lists", "changed": [CAROL], "left": []})
    [given] = hs.drain()
    assert (given["to_user_id"], given["to_device_id"]) == (CAROL, "PHONE")
    phone.receive(given)
    assert phone.decrypt(event_of(GHOST, second, n=2))["content"] == text("after")
    with pytest.raises(vodozemac.MegolmDecryptionException):
        phone.decrypt(event_of(GHOST, first))


async def test_a_new_device_of_a_member_is_given_the_sessions_that_member_had(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    laptop = NativeClient(ALICE, "LAPTOP")
    await laptop.publish(hs)
    await encrypted_room(bridge_a, [GHOST, ALICE])
    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("history"))
    assert first is not None
    sent = hs.drain()
    assert len(sent) == 1
    laptop.receive(sent[0])

    phone = NativeClient(ALICE, "PHONE")
    await phone.publish(hs)
    await bridge_a.crypto.handle({"kind": "device_lists", "changed": [ALICE], "left": []})

    events = hs.drain()
    assert [(e["to_user_id"], e["to_device_id"]) for e in events] == [(ALICE, "PHONE")]
    phone.receive(events[0])
    assert phone.decrypt(event_of(GHOST, first))["content"] == text("history")
    second = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("next"))
    assert second is not None and second["session_id"] == first["session_id"]
    assert hs.drain() == []  # both devices hold it already


async def test_a_device_list_change_of_a_stranger_changes_nothing(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    await bridge_a.crypto.handle(
        {"kind": "device_lists", "changed": [CAROL, GHOST], "left": [MALLORY]}
    )
    assert hs.drain() == [] and "query" not in hs.calls


async def test_low_key_counts_in_a_transaction_top_the_device_up(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    ghost = await bridge_a.crypto.ensure_device(GHOST)
    half = ghost.account.max_number_of_one_time_keys // 2
    await claim_n(hs, GHOST, ghost.device_id, 10)
    await bridge_a.crypto.handle(
        {
            "kind": "key_counts",
            "user_id": GHOST,
            "device_id": ghost.device_id,
            "counts": hs.counts(GHOST, ghost.device_id),
            "fallback": [SIGNED_CURVE],
        }
    )
    assert hs.counts(GHOST, ghost.device_id)[SIGNED_CURVE] == half


# === 5. Decryption errors =========================================================================


async def test_an_event_whose_key_never_came_raises_keys_missing_with_its_ids(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB])
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("lost key"))
    assert encrypted is not None
    hs.drain()  # never delivered
    with pytest.raises(KeysMissing) as missing:
        await bridge_b.crypto.decrypt(event_of(GHOST, encrypted))
    assert missing.value.room_id == ROOM
    assert missing.value.session_id == encrypted["session_id"]
    assert missing.value.sender_key == encrypted["sender_key"]


async def test_an_event_whose_sender_is_not_who_shared_its_session_is_undecryptable(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB])
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("mine"))
    assert encrypted is not None
    await bridge_b.handle_all(hs.drain())
    with pytest.raises(Undecryptable):
        await bridge_b.crypto.decrypt(event_of(GHOST2, encrypted))
    other_key = {**encrypted, "sender_key": NativeClient(ALICE, "X").curve}
    with pytest.raises(Undecryptable):
        await bridge_b.crypto.decrypt(event_of(GHOST, other_key))
    assert (await bridge_b.crypto.decrypt(event_of(GHOST, encrypted)))["content"] == text("mine")


async def test_a_plaintext_naming_another_room_is_undecryptable(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    session = vodozemac.GroupSession()
    room_key = await alice.olm_event(
        hs, BOB, bob_device(hs), "m.room_key", alice.room_key(ROOM, session)
    )
    await bridge_b.handle_all([room_key])
    assert bridge_b.keys_arrived == [ROOM]
    good = alice.megolm_event(ROOM, session, text("right room"))
    assert (await bridge_b.crypto.decrypt(good))["content"] == text("right room")

    replayed = alice.megolm_event(ROOM, session, text("moved"), plaintext_room=OTHER_ROOM)
    with pytest.raises(Undecryptable):
        await bridge_b.crypto.decrypt(replayed)


async def test_decrypt_returns_once_a_key_arriving_meanwhile_is_stored(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB])
    content = text("overtaken by its event")
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", content)
    assert encrypted is not None
    room_key = hs.drain()  # held back: the event is processed first

    looked: list[str] = []
    looked_twice = asyncio.Event()
    original = bridge_b.crypto.megolm.decrypt

    async def spy(event: dict[str, Any]) -> dict[str, Any]:
        try:
            result = await original(event)
        except KeysMissing:
            looked.append("missing")
            if len(looked) == 2:
                looked_twice.set()
            raise
        looked.append("decrypted")
        return result

    monkeypatch.setattr(bridge_b.crypto.megolm, "decrypt", spy)
    task = asyncio.create_task(bridge_b.crypto.decrypt(event_of(GHOST, encrypted), wait_s=3600))
    async with asyncio.timeout(30):  # a guard only: the condition comes at once
        await looked_twice.wait()
    assert not task.done()  # it waits for the key (its second look came before this resumed)

    await bridge_b.handle_all(room_key)

    async with asyncio.timeout(30):  # a guard only: it must not wait the hour
        decrypted = await task
    assert decrypted["content"] == content
    assert looked == ["missing", "missing", "decrypted"]


async def test_decrypt_with_a_wait_raises_keys_missing_when_no_key_comes(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB])
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("later"))
    assert encrypted is not None
    room_key = hs.drain()
    event = event_of(GHOST, encrypted)
    with pytest.raises(KeysMissing) as missing:
        await bridge_b.crypto.decrypt(event, wait_s=0.01)
    assert missing.value.session_id == encrypted["session_id"]
    await bridge_b.handle_all(room_key)  # the key that comes late still serves
    assert (await bridge_b.crypto.decrypt(event))["content"] == text("later")


# === 6. Key requests ==============================================================================


def key_request(
    ghost_device: Any, sender: str, device_id: str, session_id: str, room_id: str = ROOM
) -> dict[str, Any]:
    """A ``m.room_key_request`` to-device event, as a client sends it to a ghost's device."""
    return {
        "to_user_id": ghost_device.user_id,
        "to_device_id": ghost_device.device_id,
        "sender": sender,
        "type": "m.room_key_request",
        "content": {
            "action": "request",
            "body": {
                "algorithm": MEGOLM,
                "room_id": room_id,
                "sender_key": ghost_device.curve25519,
                "session_id": session_id,
            },
            "requesting_device_id": device_id,
            "request_id": f"req-{device_id}-{session_id[:8]}",
        },
    }


async def test_a_new_device_of_a_member_that_asks_is_given_the_key(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    laptop = NativeClient(ALICE, "LAPTOP")
    await laptop.publish(hs)
    await encrypted_room(bridge_a, [GHOST, ALICE])
    old = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("old message"))
    assert old is not None
    laptop.receive(hs.drain()[0])
    phone = NativeClient(ALICE, "PHONE")
    await phone.publish(hs)  # no device list notice: the phone has to ask
    ghost = await bridge_a.crypto.devices.get(GHOST)

    await bridge_a.handle_all([key_request(ghost, ALICE, "PHONE", old["session_id"])])

    events = hs.drain()
    assert [(e["to_user_id"], e["to_device_id"]) for e in events] == [(ALICE, "PHONE")]
    payload = phone.receive(events[0])
    assert payload["type"] in ("m.room_key", "m.forwarded_room_key")
    assert payload["content"]["session_id"] == old["session_id"]
    assert phone.decrypt(event_of(GHOST, old))["content"] == text("old message")


async def test_a_key_of_a_rotated_session_is_still_given_to_a_member_that_had_it(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    laptop = NativeClient(ALICE, "LAPTOP")
    await laptop.publish(hs)
    await encrypted_room(bridge_a, [GHOST, ALICE], rotation_period_msgs=1)
    old = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("first session"))
    new = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("second session"))
    assert old is not None and new is not None and old["session_id"] != new["session_id"]
    await bridge_a.crypto.member_left(ROOM)  # someone else left: no session is current
    hs.drain()
    phone = NativeClient(ALICE, "PHONE")
    await phone.publish(hs)
    ghost = await bridge_a.crypto.devices.get(GHOST)

    await bridge_a.handle_all([key_request(ghost, ALICE, "PHONE", old["session_id"])])

    events = hs.drain()
    assert [(e["to_user_id"], e["to_device_id"]) for e in events] == [(ALICE, "PHONE")]
    phone.receive(events[0])
    assert phone.decrypt(event_of(GHOST, old))["content"] == text("first session")


async def test_a_bridge_asks_for_a_lost_key_and_reads_with_the_answer(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOT_B])
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("again"))
    assert encrypted is not None
    await bridge_b.handle_all(hs.drain())
    await bridge_b.store.db.execute(
        "DELETE FROM crypto_inbound_group WHERE session_id = $1", encrypted["session_id"]
    )  # lost (restored from a backup taken before it came)
    event = event_of(GHOST, encrypted)
    with pytest.raises(KeysMissing) as missing:
        await bridge_b.crypto.decrypt(event)

    await bridge_b.crypto.request_key(event, missing.value)
    await bridge_b.crypto.request_key(event, missing.value)  # asked once only

    requests = hs.drain()
    bot_b = await bridge_b.crypto.devices.get(BOT_B)
    assert bot_b is not None
    assert [(e["to_user_id"], e["sender"], e["type"]) for e in requests] == [
        (GHOST, BOT_B, "m.room_key_request")
    ]
    body = requests[0]["content"]["body"]
    assert (body["room_id"], body["session_id"]) == (ROOM, encrypted["session_id"])
    assert requests[0]["content"]["requesting_device_id"] == bot_b.device_id

    await bridge_a.handle_all(requests)
    answers = hs.drain()
    assert [(e["to_user_id"], e["to_device_id"]) for e in answers] == [(BOT_B, bot_b.device_id)]
    await bridge_b.handle_all(answers)

    assert (await bridge_b.crypto.decrypt(event))["content"] == text("again")


async def test_a_key_request_of_a_user_never_given_the_session_gets_nothing(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    laptop = NativeClient(ALICE, "LAPTOP")
    await laptop.publish(hs)
    carol = NativeClient(CAROL, "CAROLDEV")
    await carol.publish(hs)
    await encrypted_room(bridge_a, [GHOST, ALICE])
    old = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("not for carol"))
    assert old is not None
    hs.drain()
    ghost = await bridge_a.crypto.devices.get(GHOST)

    await bridge_a.handle_all([key_request(ghost, CAROL, "CAROLDEV", old["session_id"])])
    bridge_a.members[ROOM].append(CAROL)  # joining later does not entitle her to it either
    await bridge_a.handle_all([key_request(ghost, CAROL, "CAROLDEV", old["session_id"])])

    assert hs.drain() == []
    assert all(CAROL not in claim for claim in hs.claims)


async def test_a_key_request_for_a_session_that_is_not_this_ghosts_gets_nothing(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    laptop = NativeClient(ALICE, "LAPTOP")
    await laptop.publish(hs)
    await encrypted_room(bridge_a, [GHOST, GHOST2, ALICE])
    theirs = await bridge_a.crypto.encrypt(GHOST2, ROOM, "m.room.message", text("ghost 2"))
    ghost = await bridge_a.crypto.ensure_device(GHOST)
    assert theirs is not None
    # A session Alice made and gave to the ghost: the bridge holds it, but it is not its own.
    alice_session = vodozemac.GroupSession()
    await bridge_a.handle_all(
        [
            await laptop.olm_event(
                hs, GHOST, ghost.device_id, "m.room_key", laptop.room_key(ROOM, alice_session)
            )
        ]
    )
    assert await bridge_a.store.inbound(ROOM, alice_session.session_id) is not None
    hs.drain()
    phone = NativeClient(ALICE, "PHONE")
    await phone.publish(hs)

    for session_id in (theirs["session_id"], alice_session.session_id, "no-such-session"):
        await bridge_a.handle_all([key_request(ghost, ALICE, "PHONE", session_id)])
    # The right session asked for in another room than its own: nothing either.
    await bridge_a.handle_all(
        [key_request(ghost, ALICE, "PHONE", theirs["session_id"], room_id=OTHER_ROOM)]
    )

    assert hs.drain() == []


# === 7. Room keys from devices that are not the sender's ==========================================


async def test_a_room_key_from_a_device_of_someone_else_than_the_sender_is_refused(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    mallory = NativeClient(MALLORY, "EVIL")
    await mallory.publish(hs)
    await bridge_b.crypto.peers.refresh(BOB, [MALLORY])  # the bridge even knows that device
    session = vodozemac.GroupSession()
    forged = await mallory.olm_event(
        hs,
        BOB,
        bob_device(hs),
        "m.room_key",
        mallory.room_key(ROOM, session),
        envelope_sender=ALICE,
    )

    await bridge_b.handle_all([forged])

    assert await bridge_b.store.inbound(ROOM, session.session_id) is None
    assert bridge_b.keys_arrived == []
    event = {**mallory.megolm_event(ROOM, session, text("I am Alice")), "sender": ALICE}
    with pytest.raises(KeysMissing):
        await bridge_b.crypto.decrypt(event)


async def test_a_room_key_claiming_another_signing_key_is_refused_the_genuine_one_kept(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    other = NativeClient(MALLORY, "EVIL")
    bob_dev = bob_device(hs)
    spoofed_session, genuine_session = vodozemac.GroupSession(), vodozemac.GroupSession()
    spoofed = await alice.olm_event(
        hs,
        BOB,
        bob_dev,
        "m.room_key",
        alice.room_key(ROOM, spoofed_session),
        claimed_ed25519=other.ed,
    )
    genuine = await alice.olm_event(
        hs, BOB, bob_dev, "m.room_key", alice.room_key(ROOM, genuine_session)
    )

    await bridge_b.handle_all([spoofed, genuine])

    assert await bridge_b.store.inbound(ROOM, spoofed_session.session_id) is None
    row = await bridge_b.store.inbound(ROOM, genuine_session.session_id)
    assert row is not None and (row.sender, row.sender_key, row.signing_key) == (
        ALICE,
        alice.curve,
        alice.ed,
    )
    assert bridge_b.keys_arrived == [ROOM]
    event = alice.megolm_event(ROOM, genuine_session, text("really Alice"))
    assert (await bridge_b.crypto.decrypt(event))["content"] == text("really Alice")


async def test_a_to_device_event_for_another_device_id_is_ignored(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    session = vodozemac.GroupSession()
    event = await alice.olm_event(
        hs, BOB, bob_device(hs), "m.room_key", alice.room_key(ROOM, session)
    )
    await bridge_b.handle_all([{**event, "to_device_id": "REPLACEDDEVICE"}])
    await bridge_b.handle_all([{**event, "to_user_id": CAROL}])
    assert await bridge_b.store.inbound(ROOM, session.session_id) is None


# === More: crash safety, both directions, restarts, claims ========================================


async def test_ensure_after_cross_signing_failed_cross_signs_on_the_next_call(
    own_devices: OwnDevices, store: CryptoStore, hs: FakeKeyDirectory
) -> None:
    hs.fail_next.add("upload_cross_signing")
    with pytest.raises(HomeserverError):
        await own_devices.ensure(GHOST)

    device = await OwnDevices(store, hs, own_devices.pickle_key).ensure(GHOST)

    assert GHOST in hs.cross_signing
    ssk = only_key(hs.cross_signing[GHOST]["self_signing_key"]["keys"])
    assert signed_by(hs.devices[GHOST][device.device_id], GHOST, ssk, ssk)


async def test_ensure_after_the_device_signature_failed_cross_signs_on_the_next_call(
    own_devices: OwnDevices, store: CryptoStore, hs: FakeKeyDirectory
) -> None:
    hs.fail_next.add("upload_signatures")
    with pytest.raises(HomeserverError):
        await own_devices.ensure(GHOST)

    device = await OwnDevices(store, hs, own_devices.pickle_key).ensure(GHOST)

    ssk = only_key(hs.cross_signing[GHOST]["self_signing_key"]["keys"])
    assert signed_by(hs.devices[GHOST][device.device_id], GHOST, ssk, ssk)


async def test_two_bridges_talk_both_ways_over_one_olm_session(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB], rotation_period_msgs=1)
    await encrypted_room(bridge_b, [GHOST, BOB], rotation_period_msgs=1)
    to_bob = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("ping"))
    await bridge_b.handle_all(hs.drain())

    to_ghost = await bridge_b.crypto.encrypt(BOB, ROOM, "m.room.message", text("pong"))

    events = hs.drain()
    assert [(e["to_user_id"], e["sender"]) for e in events] == [(GHOST, BOB)]
    ghost_curve = events[0]["content"]["ciphertext"]
    assert only_key(ghost_curve)["type"] == 1  # a reply in the session the ghost opened
    await bridge_a.handle_all(events)
    assert to_bob is not None and to_ghost is not None
    assert (await bridge_a.crypto.decrypt(event_of(BOB, to_ghost)))["content"] == text("pong")

    again = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("ping 2"))
    events = hs.drain()
    assert len(events) == 1 and only_key(events[0]["content"]["ciphertext"])["type"] == 1
    await bridge_b.handle_all(events)
    assert again is not None
    assert (await bridge_b.crypto.decrypt(event_of(GHOST, again)))["content"] == text("ping 2")
    assert len(hs.claims) == 1


async def test_sessions_survive_a_restart_of_both_bridges(
    db: Database, b_db: Database, bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB], rotation_period_msgs=1)
    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("before"))
    await bridge_b.handle_all(hs.drain())
    created = hs.calls.count("create_device")

    a = await make_bridge(db, hs, "a.example", BOT_A, bridge_a.box, bridge_a.members)
    b = await make_bridge(b_db, hs, "b.example", BOT_B, bridge_b.box, bridge_b.members)
    second = await a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("after"))
    await b.handle_all(hs.drain())

    assert first is not None and second is not None
    assert second["session_id"] != first["session_id"]
    assert len(hs.claims) == 1  # the Olm session was kept
    assert hs.calls.count("create_device") == created  # and the devices
    for n, (encrypted, body) in enumerate(((first, "before"), (second, "after"))):
        assert (await b.crypto.decrypt(event_of(GHOST, encrypted, n=n)))["content"] == text(body)
        assert (await a.crypto.decrypt(event_of(GHOST, encrypted, n=n)))["content"] == text(body)


async def test_a_device_with_no_one_time_key_left_is_reached_through_its_fallback_key(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    bob_dev = bob_device(hs)
    await claim_n(hs, BOB, bob_dev, hs.counts(BOB, bob_dev)[SIGNED_CURVE])
    await encrypted_room(bridge_a, [GHOST, BOB])

    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("fallback"))

    assert (BOB, bob_dev) in hs.fallback_used
    await bridge_b.handle_all(hs.drain())
    assert encrypted is not None
    assert (await bridge_b.crypto.decrypt(event_of(GHOST, encrypted)))["content"]


async def test_a_device_with_nothing_to_claim_is_skipped_then_given_the_key_later(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    carol = NativeClient(CAROL, "CAROLDEV")
    await carol.publish(hs, one_time_keys=0)
    await encrypted_room(bridge_a, [GHOST, BOB, CAROL])

    first = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("one"))
    assert {e["to_user_id"] for e in hs.drain()} == {BOB}

    await carol.upload_one_time_keys(hs, 2)
    second = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("two"))

    events = hs.drain()
    assert [(e["to_user_id"], e["to_device_id"]) for e in events] == [(CAROL, "CAROLDEV")]
    carol.receive(events[0])
    assert first is not None and second is not None
    assert carol.decrypt(event_of(GHOST, second, n=2))["content"] == text("two")


async def test_a_device_whose_keys_are_not_self_signed_gets_no_room_key(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    laptop = NativeClient(ALICE, "LAPTOP")
    await laptop.publish(hs)
    intruder = NativeClient(MALLORY, "EVIL")
    # The homeserver slips a key of its own under Alice's device.
    hs.devices[ALICE]["LAPTOP"]["keys"]["curve25519:LAPTOP"] = intruder.curve
    await encrypted_room(bridge_a, [GHOST, ALICE])

    assert await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("x")) is not None

    assert hs.drain() == [] and hs.claims == []


async def test_a_claimed_one_time_key_not_signed_by_its_device_is_not_used(
    bridge_a: Bridge, hs: FakeKeyDirectory
) -> None:
    laptop = NativeClient(ALICE, "LAPTOP")
    await laptop.publish(hs, one_time_keys=1)
    intruder = NativeClient(MALLORY, "EVIL")
    for key in hs.one_time_keys[(ALICE, "LAPTOP")].values():
        key["key"] = intruder.curve  # replaced by the homeserver; the signature no longer holds
    await encrypted_room(bridge_a, [GHOST, ALICE])

    assert await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("x")) is not None

    assert len(hs.claims) == 1 and hs.drain() == []


async def test_a_to_device_message_naming_another_recipient_is_refused(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    session = vodozemac.GroupSession()
    misdirected = await alice.olm_event(
        hs,
        BOB,
        bob_device(hs),
        "m.room_key",
        alice.room_key(ROOM, session),
        recipient=BOT_B,
    )
    await bridge_b.handle_all([misdirected])
    assert await bridge_b.store.inbound(ROOM, session.session_id) is None


async def test_a_room_key_delivered_twice_is_kept_once(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    session = vodozemac.GroupSession()
    room_key = await alice.olm_event(
        hs, BOB, bob_device(hs), "m.room_key", alice.room_key(ROOM, session)
    )
    await bridge_b.handle_all([room_key, copy.deepcopy(room_key)])
    assert bridge_b.keys_arrived == [ROOM]
    event = alice.megolm_event(ROOM, session, text("once"))
    assert (await bridge_b.crypto.decrypt(event))["content"] == text("once")


@pytest.mark.parametrize("failing", ["keys_query", "storing"])
async def test_a_room_key_whose_handling_failed_is_kept_when_the_inbox_retries(
    bridge_b: Bridge, hs: FakeKeyDirectory, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    session = vodozemac.GroupSession()
    room_key = await alice.olm_event(
        hs, BOB, bob_device(hs), "m.room_key", alice.room_key(ROOM, session)
    )
    if failing == "keys_query":
        hs.fail_next.add("query")  # the homeserver is restarting: Alice's devices unknown yet
    else:
        original = bridge_b.store.add_inbound
        failures = [RuntimeError("database went away")]

        async def add_inbound(*args: Any, **kwargs: Any) -> bool:
            if failures:
                raise failures.pop()
            return await original(*args, **kwargs)

        monkeypatch.setattr(bridge_b.store, "add_inbound", add_inbound)
    with pytest.raises((HomeserverError, RuntimeError)):
        await bridge_b.handle_all([room_key])  # the inbox item stays pending

    await bridge_b.handle_all([room_key])  # and is processed again

    assert await bridge_b.store.inbound(ROOM, session.session_id) is not None


async def test_a_forwarded_key_the_bridge_asked_for_is_kept_and_decrypts(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    alice = NativeClient(ALICE, "ALICEDEV")
    await alice.publish(hs)
    bot_b = await bridge_b.crypto.devices.get(BOT_B)
    assert bot_b is not None
    session = vodozemac.GroupSession()
    forwarded = alice.forwarded_key(ROOM, session)  # from the first message on
    event = alice.megolm_event(ROOM, session, text("asked for"))
    with pytest.raises(KeysMissing) as missing:
        await bridge_b.crypto.decrypt(event)

    await bridge_b.crypto.request_key(event, missing.value)
    requests = hs.drain()
    assert [(e["to_user_id"], e["to_device_id"]) for e in requests] == [(ALICE, "ALICEDEV")]
    answer = await alice.olm_event(hs, BOT_B, bot_b.device_id, "m.forwarded_room_key", forwarded)
    await bridge_b.handle_all([answer])

    row = await bridge_b.store.inbound(ROOM, session.session_id)
    assert row is not None and row.forwarded
    assert (await bridge_b.crypto.decrypt(event))["content"] == text("asked for")


async def test_a_forwarded_key_nobody_asked_for_is_not_kept(
    bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    mallory = NativeClient(MALLORY, "EVIL")
    await mallory.publish(hs)
    bot_b = await bridge_b.crypto.devices.get(BOT_B)
    assert bot_b is not None
    session = vodozemac.GroupSession()
    pushed = await mallory.olm_event(
        hs, BOT_B, bot_b.device_id, "m.forwarded_room_key", mallory.forwarded_key(ROOM, session)
    )
    await bridge_b.handle_all([pushed])
    assert await bridge_b.store.inbound(ROOM, session.session_id) is None


async def test_a_ciphertext_replayed_under_another_event_id_is_refused(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    await encrypted_room(bridge_a, [GHOST, BOB])
    encrypted = await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("pay 100"))
    assert encrypted is not None
    await bridge_b.handle_all(hs.drain())
    original = event_of(GHOST, encrypted, n=1)
    assert (await bridge_b.crypto.decrypt(original))["content"] == text("pay 100")
    assert (await bridge_b.crypto.decrypt(original))["content"]  # the same event again: fine

    with pytest.raises(Undecryptable):
        await bridge_b.crypto.decrypt(event_of(GHOST, encrypted, n=2))


async def test_forgetting_a_ghost_erases_its_device_and_keys(
    bridge_a: Bridge, bridge_b: Bridge, hs: FakeKeyDirectory
) -> None:
    """The right to erasure reaches the crypto layer: the ghost's device is deleted on the
    homeserver and its account and sessions in the database; a new one is made if it returns."""
    own = await bridge_a.crypto.ensure_device(GHOST)
    await bridge_a.crypto.room_encrypted(ROOM, {"algorithm": MEGOLM})
    await bridge_a.crypto.encrypt(GHOST, ROOM, "m.room.message", text("avant"))
    assert await bridge_a.store.outbound(ROOM, GHOST) is not None

    await bridge_a.crypto.forget(GHOST)

    assert (GHOST, own.device_id) in hs.deleted
    assert await bridge_a.store.device(GHOST) is None
    assert await bridge_a.store.outbound(ROOM, GHOST) is None
    again = await bridge_a.crypto.ensure_device(GHOST)
    assert again.device_id != own.device_id and again.curve25519 != own.curve25519


async def test_replay_records_go_with_the_audit_retention(bridge_a: Bridge) -> None:
    store = bridge_a.store
    assert await store.first_event_at("S", 0, "$a") == "$a"
    assert await store.first_event_at("S", 0, "$b") == "$a"  # a replay, refused by the caller
    assert await store.purge_message_indexes(before_ms=0) == 0  # nothing that old
    assert await store.purge_message_indexes(before_ms=2**62) == 1
    assert await store.first_event_at("S", 0, "$b") == "$b"
